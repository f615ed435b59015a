"""An asynchronous worker: pull parameters, compute gradients with the engine's own step pieces
(precision, local accumulation, clipping), push them with the version they were computed on.
It never waits for the other workers, only for its own round trip to the servers."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from shoal.config import config_from_dict
from shoal.dist import WorldInfo
from shoal.ps.sharding import TensorSpec, flatten


class PSWorker:
    def __init__(self, rank: int, world_size: int, cfg: dict[str, Any], servers: list[Any], shards: list[list[int]], specs: list[TensorSpec]):
        self.rank, self.world_size = rank, world_size
        self.cfg = config_from_dict(cfg)
        self.servers, self.shards, self.specs = servers, shards, specs
        self.step = 0

    def __repr__(self) -> str:  # Ray prefixes forwarded log lines with this
        return f"ps worker {self.rank}"

    def run(self, cwd: str, sys_path: list[str]) -> dict[str, Any]:
        """Train until the servers say done; returns this worker's counts."""
        import sys

        import ray
        import torch

        from shoal.engine import build_job, compute_gradients, evaluate

        if os.path.isdir(cwd):
            os.chdir(cwd)
        sys.path[:0] = [p for p in sys_path if p not in sys.path]
        torch.set_num_threads(self.cfg.scaling.threads_per_worker or max(1, int(self.cfg.scaling.cpus_per_worker)))
        job = build_job(self.cfg, WorldInfo(rank=self.rank, world_size=self.world_size), torch.device("cpu"))
        params = job.params
        shard_params = [[params[i] for i in idx] for idx in self.shards]
        every = self.cfg.train.eval_every
        replies = ray.get([s.push_pull.remote(None, -1, None) for s in self.servers])
        pushes = 0
        next_eval = every
        while True:
            self._load(shard_params, [r[0] for r in replies])
            versions = [r[1] for r in replies]
            if replies[0][2]:  # shard 0 says when the job is done
                break
            if self.rank == 0 and every and versions[0] >= next_eval:
                self.servers[0].report_eval.remote(versions[0], evaluate(job))
                next_eval = (versions[0] // every + 1) * every
            g = compute_gradients(job)
            if job.precision.scaler is not None:
                job.precision.scaler.update()
            grads = [flatten([p.grad.detach().cpu().numpy() for p in ps]) if g.ok else None for ps in shard_params]
            job.optimizer.zero_grad(set_to_none=True)
            stats = {"loss_sum": float(g.loss_sum), "count": g.count, "samples": g.rows, "grad_norm": float(g.grad_norm), "ok": g.ok}
            replies = ray.get([s.push_pull.remote(gr, v, stats if k == 0 else None) for k, (s, gr, v) in enumerate(zip(self.servers, grads, versions))])
            pushes += 1
            self.step = pushes
        final = evaluate(job) if self.rank == 0 else {}
        if final:
            self.servers[0].report_eval.remote(versions[0], final)
        return {"pushes": pushes, "final_eval": final, "version": versions[0], "time": time.time()}

    @staticmethod
    def _load(shard_params: list[list[Any]], flats: list[np.ndarray]) -> None:
        import torch

        import warnings

        for ps, flat in zip(shard_params, flats):
            with warnings.catch_warnings():  # Ray hands out read-only buffers; we only read them
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(flat)
            o = 0
            for p in ps:
                n = p.numel()
                p.data.copy_(t[o : o + n].view_as(p))
                o += n

    def progress(self) -> int:
        return self.step
