"""strategy: async_ps as a group under the controller: ps.num_shards server actors, and the worker
ranks (rank actors in a placement group, on the devices they reserve) that push to them. The
driver creates the servers empty and never loads torch; PS rank 0 fills them."""

from __future__ import annotations

from shoal.config import JobConfig
from shoal.controller.failure import RankStatus
from shoal.controller.worker_group import WorkerGroup, check_resources
from shoal.ps.server import ParameterServer


def check_ps_resources(cfg: JobConfig) -> None:
    """Workers and servers must fit the cluster (fail at once, as for AllReduce)."""
    servers = cfg.ps.num_shards * cfg.ps.cpus_per_server
    check_resources(cfg, extra_cpus=servers, extra_what=f"{cfg.ps.num_shards} servers x {cfg.ps.cpus_per_server:g} CPU")


class PSGroup:
    def __init__(self, cfg: JobConfig):
        import ray  # after cluster.connect set its env (token), as in controller

        self.cfg = cfg
        server = ray.remote(ParameterServer)
        self.servers = [
            server.options(num_cpus=cfg.ps.cpus_per_server).remote(k, cfg.to_dict()) for k in range(cfg.ps.num_shards)
        ]
        self.workers = WorkerGroup(cfg, entry="shoal.ps.client:run_ps_worker")
        self.size = self.workers.size

    def start(self, resume: bool) -> None:
        self.workers.start(resume, extra={"servers": self.servers})

    def poll(self) -> list[RankStatus]:
        return self.workers.poll()

    def request_stop(self) -> None:
        """Every worker's next push is answered "done"; rank 0 then saves and sums up."""
        for s in self.servers:
            s.stop.remote()
        self.workers.request_stop()

    def kill(self) -> None:
        import ray  # as in __init__

        self.workers.kill()
        for s in self.servers:
            ray.kill(s, no_restart=True)
