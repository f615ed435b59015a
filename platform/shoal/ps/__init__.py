"""strategy: async_ps. Parameter-server actors own balanced slices of the parameters; worker ranks
push gradients without waiting for each other. Same outputs as AllReduce mode: metrics.jsonl,
TensorBoard, summary.json (plus updates/s and staleness), checkpoints, --resume.

A "step" in this mode is one update applied by the servers (one worker's micro-batches), so
train.max_steps, checkpoint.every_steps, log.every and train.eval_every count updates.

group.py: the driver's side (servers and worker ranks, one group under the controller);
client.py: a worker rank (rank 0 also keeps the record); server.py: a server; sharding.py: pure.
"""
