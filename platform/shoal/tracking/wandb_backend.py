"""Weights & Biases through its SDK (online, or offline under RUN_DIR/wandb), in the background."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shoal.config import JobConfig
from shoal.errors import ShoalError
from shoal.tracking.runinfo import FLUSH_DOWN_S, FLUSH_TIMEOUT_S, flatten, read_ids, save_id, tags
from shoal.tracking.sender import Sender


class WandbBackend:
    def __init__(self, cfg: JobConfig, run_dir: Path, world_size: int, resumed: bool):
        c = cfg.log.wandb
        assert c is not None
        try:
            import wandb  # an optional extra (shoal[wandb])
        except ImportError:
            raise ShoalError("log.wandb needs the wandb package: pip install 'shoal[wandb]'") from None
        self.wandb, self.cfg, self.c, self.run_dir = wandb, cfg, c, run_dir
        self.run: Any = None
        known = read_ids(run_dir).get("wandb_id") if resumed else None
        self.sender = Sender("log.wandb", "W&B did not answer")
        self.sender.put(lambda: self._open(world_size, known), droppable=False, what="the run's creation")

    def _open(self, world_size: int, known: str | None) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        extra = tags(self.cfg, world_size)
        self.run = self.wandb.init(
            project=self.c.project,
            entity=self.c.entity,
            mode=self.c.mode,
            name=self.c.run_name or self.cfg.name,
            group=self.c.group,
            tags=[*self.c.tags, f"strategy:{self.cfg.strategy}"],
            dir=str(self.run_dir),
            id=known,
            resume="allow" if known else None,
            config={**flatten(self.cfg.to_dict()), **{f"tag.{k}": v for k, v in extra.items()}},
            settings=self.wandb.Settings(console="off"),
        )
        save_id(self.run_dir, "wandb_id", self.run.id)

    def log(self, step: int, numbers: dict[str, float]) -> None:
        self.sender.put(lambda: self.run.log(numbers, step=step))

    def finish(self, summary: dict[str, Any] | None, run_dir: Path, files: list[tuple[Path, str]]) -> None:
        """Queue the summary, the files and the run's end (close waits for them)."""
        failed = summary is None or summary.get("status") not in ("completed", "preempted")

        def send() -> None:
            if summary is not None:
                self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            for path, _ in files:
                self.run.save(str(path), base_path=str(run_dir), policy="now")
            if self.c.log_checkpoints and (run_dir / "checkpoints").is_dir():
                self.run.save(str(run_dir / "checkpoints" / "*" / "*"), base_path=str(run_dir), policy="now")
            self.run.finish(exit_code=1 if failed else 0)

        self.sender.put(send, droppable=False, what="the files and the run's end")

    def close(self, start: float | None = None) -> bool:
        return self.sender.close(FLUSH_TIMEOUT_S, FLUSH_DOWN_S, start)
