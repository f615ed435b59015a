"""MLflow through its client (MlflowClient), in the background."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from shoal.config import JobConfig
from shoal.errors import ShoalError
from shoal.tracking import FLUSH_TIMEOUT_S, flatten, read_ids, save_id, tags
from shoal.tracking.sender import Sender

log = logging.getLogger("shoal")
BATCH = 900  # metrics per log_batch call (MLflow takes up to 1000)


def _client(uri: str | None) -> Any:
    # a down server must fail a call in seconds, not after MLflow's default minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the Sender retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ShoalError("log.mlflow needs the mlflow package: pip install 'shoal[mlflow]'") from None
    return MlflowClient(tracking_uri=uri)


def _experiment(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def parent_run(cfg: JobConfig, name: str) -> str | None:
    """A parent run for a sweep or comparison (None, with a warning, when the server cannot be reached)."""
    c = cfg.log.mlflow
    assert c is not None
    try:
        client = _client(c.tracking_uri)
        run = client.create_run(_experiment(client, c.experiment), run_name=name, tags={"shoal.group": name})
        return run.info.run_id
    except ShoalError:
        raise
    except Exception as e:
        log.warning("log.mlflow: no parent run for %s (%s); the runs are logged ungrouped", name, e)
        return None


class MLflowBackend:
    def __init__(self, cfg: JobConfig, run_dir: Path, world_size: int, resumed: bool):
        c = cfg.log.mlflow
        assert c is not None
        self.cfg, self.c, self.run_dir = cfg, c, run_dir
        self.client = _client(c.tracking_uri)
        self.run_id: str | None = read_ids(run_dir).get("mlflow_run_id") if resumed else None
        self.sender = Sender("log.mlflow", f"the tracking server {c.tracking_uri or '(default)'} did not answer")
        self.sender.put(lambda: self._open(world_size), droppable=False)

    def _open(self, world_size: int) -> None:
        from mlflow.entities import Param

        if self.run_id is not None:  # a resumed run continues its tracked run
            self.client.update_run(self.run_id, status="RUNNING")
            return
        extra = tags(self.cfg, world_size)
        if self.c.parent_run_id:
            extra["mlflow.parentRunId"] = self.c.parent_run_id
        if "git.commit" in extra:
            extra["mlflow.source.git.commit"] = extra["git.commit"]
        run = self.client.create_run(
            _experiment(self.client, self.c.experiment), run_name=self.c.run_name or self.cfg.name, tags=extra
        )
        self.run_id = run.info.run_id
        save_id(self.run_dir, "mlflow_run_id", self.run_id)
        params = [Param(k, str(v)) for k, v in flatten(self.cfg.to_dict()).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, numbers: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numbers.items()]

        def send() -> None:
            assert self.run_id is not None, "the run is opened first"
            for i in range(0, len(metrics), BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])

        self.sender.put(send)

    def finish(self, summary: dict[str, Any] | None, run_dir: Path, files: list[tuple[Path, str]]) -> None:
        status = "FINISHED" if summary is not None and summary.get("status") in ("completed", "preempted") else "FAILED"

        def send() -> None:
            assert self.run_id is not None
            for path, folder in files:
                self.client.log_artifact(self.run_id, str(path), folder or None)
            if self.c.log_checkpoints and (run_dir / "checkpoints").is_dir():
                self.client.log_artifacts(self.run_id, str(run_dir / "checkpoints"), "checkpoints")
            self.client.set_terminated(self.run_id, status)

        self.sender.put(send, droppable=False)
        self.sender.close(FLUSH_TIMEOUT_S)
