"""MLflow through its client (MlflowClient), in the background."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from shoal.config import JobConfig
from shoal.errors import ShoalError
from shoal.tracking.runinfo import FLUSH_DOWN_S, FLUSH_TIMEOUT_S, flatten, read_ids, save_id, tags
from shoal.tracking.sender import Sender, unanswered

log = logging.getLogger("shoal")
BATCH = 900  # metrics per log_batch call (MLflow takes up to 1000)


def _client(uri: str | None) -> Any:
    # a down server must fail a call in seconds, not after MLflow's default minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the Sender retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.tracking import MlflowClient  # an optional extra (shoal[mlflow])
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
    """The run is created by the first call that reaches the server (the start of training, or any later one if the
    server was down then); every call before it waits in the sender, so nothing is lost meanwhile."""

    def __init__(self, cfg: JobConfig, run_dir: Path, world_size: int, resumed: bool):
        c = cfg.log.mlflow
        assert c is not None
        self.cfg, self.c, self.run_dir, self.world_size = cfg, c, run_dir, world_size
        self.client = _client(c.tracking_uri)
        self.run_id: str | None = read_ids(run_dir).get("mlflow_run_id") if resumed else None
        self.resuming = self.run_id is not None  # a resumed run continues its tracked run, set back to RUNNING
        self.tags: dict[str, str] | None = None  # taken when the run starts (the commit then), sent at creation
        self.params: list[Any] = []  # the config, not yet sent
        self.sender = Sender("log.mlflow", f"the tracking server {c.tracking_uri or '(default)'} did not answer")
        self.sender.put(self._ready, droppable=False, what="the run's creation")

    def _ready(self) -> str:
        """The run's id, after creating the run (or setting a resumed one RUNNING) and sending the config, if that has
        not happened yet. Runs in the sender's thread only, so calls never race."""
        if self.tags is None:
            self.tags = self._run_tags()
        if self.run_id is None:
            self._create_run()
        elif self.resuming:
            self.client.update_run(self.run_id, status="RUNNING")
            self.resuming = False
        self._send_params()
        return self.run_id

    def _run_tags(self) -> dict[str, str]:
        """The run's tags, with MLflow's own names for the parent run and the commit."""
        run_tags = tags(self.cfg, self.world_size)
        if self.c.parent_run_id:
            run_tags["mlflow.parentRunId"] = self.c.parent_run_id
        if "git.commit" in run_tags:
            run_tags["mlflow.source.git.commit"] = run_tags["git.commit"]
        return run_tags

    def _create_run(self) -> None:
        """Creates the run, saves its id in the run directory and queues the config as params."""
        from mlflow.entities import Param  # optional, as in _client

        run = self.client.create_run(
            _experiment(self.client, self.c.experiment), run_name=self.c.run_name or self.cfg.name, tags=self.tags
        )
        self.run_id = run.info.run_id
        save_id(self.run_dir, "mlflow_run_id", self.run_id)
        self.params = [Param(k, str(v)) for k, v in flatten(self.cfg.to_dict()).items()]

    def _send_params(self) -> None:
        """The config's params not yet sent, 100 a call; given up (one warning) when the server refuses them."""
        while self.params:
            try:
                self.client.log_batch(self.run_id, params=self.params[:100])
            except Exception as e:
                if unanswered(e):
                    raise  # tried again with this call
                log.warning("log.mlflow: the config was not logged as params (%s: %s)", type(e).__name__, e)
                self.params = []
                break
            del self.params[:100]

    def log(self, step: int, numbers: dict[str, float]) -> None:
        from mlflow.entities import Metric  # optional, as in _client

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numbers.items()]
        sent = 0

        def send() -> None:
            nonlocal sent
            run_id = self._ready()
            while sent < len(metrics):
                self.client.log_batch(run_id, metrics=metrics[sent : sent + BATCH])
                sent += BATCH

        self.sender.put(send)

    def finish(self, summary: dict[str, Any] | None, run_dir: Path, files: list[tuple[Path, str]]) -> None:
        """Queue the artifacts and the run's end (close waits for them)."""
        status = "FINISHED" if summary is not None and summary.get("status") in ("completed", "preempted") else "FAILED"
        uploads = [(str(path), folder or None) for path, folder in files]
        checkpoints = run_dir / "checkpoints"
        if self.c.log_checkpoints and checkpoints.is_dir():
            for path in sorted(p for p in checkpoints.rglob("*") if p.is_file()):
                uploads.append((str(path), str(Path("checkpoints") / path.parent.relative_to(checkpoints))))

        def send() -> None:  # one file at a time: a retry goes on from the first one not sent
            run_id = self._ready()
            while uploads:
                self.client.log_artifact(run_id, *uploads[0])
                uploads.pop(0)
            self.client.set_terminated(run_id, status)

        self.sender.put(send, droppable=False, what="the artifacts and the run's end")

    def close(self, start: float | None = None) -> bool:
        return self.sender.close(FLUSH_TIMEOUT_S, FLUSH_DOWN_S, start)
