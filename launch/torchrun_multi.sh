#!/usr/bin/env bash
# Several machines, torchrun with c10d rendezvous. Run the same command on every node:
#   HEAD=node0.example NNODES=2 NPROC=4 launch/torchrun_multi.sh CONFIG [KEY=VALUE ...]
# HEAD:PORT must be reachable from every node; JOB_ID names the rendezvous (any string shared by the nodes).
# Set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME if the nodes have several network interfaces.
set -euo pipefail
exec torchrun --nnodes="${NNODES:?set NNODES}" --nproc_per_node="${NPROC:-1}" \
  --rdzv_backend=c10d --rdzv_endpoint="${HEAD:?set HEAD}:${PORT:-29500}" --rdzv_id="${JOB_ID:-shoal}" \
  --max_restarts="${MAX_RESTARTS:-0}" -m shoal worker "$@"
