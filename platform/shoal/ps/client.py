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
from shoal.ps.sharding import TensorSpec


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
        # gradients accumulate straight into one flat buffer per shard: pushed without a gather
        grad_bufs = [torch.zeros(sum(p.numel() for p in ps)) for ps in shard_params]
        for ps, buf in zip(shard_params, grad_bufs):
            o = 0
            for p in ps:
                p.grad = buf[o : o + p.numel()].view_as(p)
                o += p.numel()
        every = self.cfg.train.eval_every
        replies = ray.get([s.push_pull.remote(None, -1, None) for s in self.servers])
        overlap = self.cfg.ps.overlap
        pending = None  # the push in flight while the next gradient is computed (ps.overlap)
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
            grads = [buf.numpy() if g.ok else None for buf in grad_bufs]
            stats = {"loss_sum": float(g.loss_sum), "count": g.count, "samples": g.rows, "grad_norm": float(g.grad_norm), "ok": g.ok}
            refs = [s.push_pull.remote(gr, v, stats if k == 0 else None) for k, (s, gr, v) in enumerate(zip(self.servers, grads, versions))]
            for buf in grad_bufs:  # the calls above already copied the gradients into the object store
                buf.zero_()
            pushes += 1
            self.step = pushes
            if overlap:
                # compute the next gradient while this push travels; it starts from the previous reply
                if pending is None:
                    pending = refs
                    continue
                replies, pending = ray.get(pending), refs
            else:
                replies = ray.get(refs)
        if pending is not None:
            ray.get(pending)
        job.data.train.close()
        final = evaluate(job) if self.rank == 0 else {}
        if final:
            self.servers[0].report_eval.remote(versions[0], final)
        return {"pushes": pushes, "final_eval": final, "version": versions[0], "time": time.time()}

    @staticmethod
    def _load(shard_params: list[list[Any]], flats: list[np.ndarray]) -> None:
        """Point the parameters at the servers' buffers (zero-copy: the worker never writes them)."""
        import warnings

        import torch

        for ps, flat in zip(shard_params, flats):
            with warnings.catch_warnings():  # Ray hands out read-only shared memory; the worker only reads it
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(flat)
            o = 0
            for p in ps:
                n = p.numel()
                p.data = t[o : o + n].view_as(p)
                o += n

    def progress(self) -> int:
        return self.step
