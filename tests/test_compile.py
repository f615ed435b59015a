"""train.compile on real 2-rank gloo groups: compiled runs give the eager losses under allreduce (the whole model),
and fsdp (each block, activation-checkpointed, compiled before sharding); a
checkpoint moves from a compiled run to an eager one and back; checkpoints and exports keep the eager model's keys;
the first step's compile time reaches the start-up marks; without a compiler, validate and train say what to install.

Each configuration is compiled once per module (torch.compile takes tens of seconds per model on a small CPU);
the tests share those runs. Losses agree within TOLERANCE: inductor fuses and reorders float32 arithmetic, so
compiled and eager differ in the last bits, and 20 AdamW steps carry that no further than the loss's 7th digit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shoal.config import JobConfig, config_from_dict

from _ranks import spawn_ranks
from conftest import REPO, need_system, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"
STEPS = 20
TOLERANCE = {"rel": 1e-5, "abs": 1e-6}  # per step, compiled against eager; measured here: at most 2e-7 relative
LM = {
    "data.dataset": "synthetic",
    "data.task": "lm",
    "data.vocab_size": 17,
    "data.seq_len": 16,
    "data.num_samples": 512,
    "data.batch_size": 8,
    "model.name": "transformer_lm",
    "model.width": 32,
    "model.depth": 2,
    "model.heads": 2,
    "model.tie_embeddings": False,  # untied, the head starts small: the loss starts near ln(vocab)
}
# a module's first test builds its runs (minutes on a small shared CPU)
pytestmark = pytest.mark.timeout(900)


def job(run_dir: Path, strategy: str, compile: str | bool, **updates) -> dict:
    base = {
        **LM,
        "strategy": strategy,
        "train.compile": compile,
        "optim.name": "adamw",
        "optim.lr": 0.03,
        "optim.implementation": "foreach",  # the same update kernels whatever the layout
        "train.max_steps": STEPS,
        "train.eval_every": 0,
        "log.every": 1,
        "log.tensorboard": False,
        "checkpoint.every_steps": STEPS // 2,
        "run.dir": str(run_dir),
    }
    return JobConfig().replace({**base, **updates}).to_dict()


def train_on_rank(cfg_dict: dict) -> dict:
    """One rank's run: its summary, its start-up marks as the controller gets them (name, seconds: None for a
    time, a figure for a duration) and how long torch.compile worked in this process."""
    from shoal.models import compile_seconds
    from shoal.run import Hooks, Run
    from shoal.worker import run_worker

    marks: list[tuple[str, float | None]] = []
    hooks = Hooks(mark=lambda name, seconds=None: marks.append((name, seconds)))
    summary = run_worker(Run(config_from_dict(cfg_dict), hooks=hooks))
    return {"summary": summary, "marks": marks, "compile_s": compile_seconds()}


def trained(cfg_dict: dict) -> dict:
    """A 2-rank run: rank 0's result, with the losses of every step it took."""
    result = spawn_ranks(train_on_rank, 2, cfg_dict, timeout_s=900)[0]
    run_dir = Path(cfg_dict["run"]["dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {**result, "dir": run_dir, "losses": [r["loss"] for r in records if "loss" in r]}


def step_10(run: dict) -> str:
    return str(run["dir"] / "checkpoints" / f"step-{STEPS // 2:06d}")


@pytest.fixture(scope="module")
def allreduce(tmp_path_factory) -> dict:
    """Eager and compiled (model), and each resumed at step 10 from the other's checkpoint."""
    need_system("g++")
    root = tmp_path_factory.mktemp("allreduce")
    eager = trained(job(root / "eager", "allreduce", False))
    compiled = trained(job(root / "compiled", "allreduce", "model"))
    to_eager = trained(job(root / "to-eager", "allreduce", False, **{"checkpoint.resume_from": step_10(compiled)}))
    to_compiled = trained(job(root / "to-compiled", "allreduce", "model", **{"checkpoint.resume_from": step_10(eager)}))
    return {"eager": eager, "compiled": compiled, "to_eager": to_eager, "to_compiled": to_compiled}


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> dict:
    """Eager and compiled (blocks) under fsdp, every block activation-checkpointed."""
    need_system("g++")
    root = tmp_path_factory.mktemp("fsdp")
    checkpointed = {"train.activation_checkpointing": "full"}
    return {
        "eager": trained(job(root / "eager", "fsdp", False, **checkpointed)),
        "compiled": trained(job(root / "compiled", "fsdp", "blocks", **checkpointed)),
    }


# Pipeline stages with `blocks` give the eager losses too (checked by hand: 1.6e-7 at most); they are left out
# here because compiling both stages' graphs takes minutes on this machine, more than the rest of this file.
def test_compiled_runs_give_the_eager_losses_under_allreduce_and_fsdp(allreduce, fsdp):
    for runs in (allreduce, fsdp):
        eager, compiled = runs["eager"], runs["compiled"]
        assert len(eager["losses"]) == len(compiled["losses"]) == STEPS
        assert compiled["losses"] == pytest.approx(eager["losses"], **TOLERANCE)
        assert max(eager["losses"]) - min(eager["losses"]) > 100 * TOLERANCE["rel"]  # the steps moved the loss
        assert compiled["compile_s"] > 0 and not eager["compile_s"]  # compiled, and only where asked


def test_a_checkpoint_moves_from_a_compiled_run_to_an_eager_one_and_back(allreduce):
    to_eager, to_compiled = allreduce["to_eager"], allreduce["to_compiled"]
    assert to_eager["summary"]["resumed_from"].endswith("step-000010")
    assert to_compiled["summary"]["resumed_from"].endswith("step-000010")
    # steps 11-20 continue the run the checkpoint came from
    assert to_eager["losses"] == pytest.approx(allreduce["compiled"]["losses"][10:], **TOLERANCE)
    assert to_compiled["losses"] == pytest.approx(allreduce["eager"]["losses"][10:], **TOLERANCE)


def bare_model(cfg_dict: dict) -> torch.nn.Module:
    from shoal.data.loaders import open_splits
    from shoal.losses import Loss
    from shoal.models import build_model

    cfg = config_from_dict(cfg_dict)
    spec = open_splits(cfg)[0].spec
    return build_model(cfg.model, spec, Loss(cfg.train, spec, "model.name").out_features())


def test_checkpoints_and_exports_of_compiled_runs_have_the_eager_models_keys(allreduce, fsdp, tmp_path):
    from shoal.checkpoint import export, find_latest

    for name, run in (("allreduce", allreduce["compiled"]), ("fsdp", fsdp["compiled"])):
        model = bare_model(job(tmp_path / "x", name, False))
        out = export(find_latest(run["dir"]), tmp_path / f"{name}-state.pt")  # the checkpoint's own keys
        state = torch.load(out, weights_only=True)
        assert sorted(state) == sorted(model.state_dict()) and not any("_orig_mod" in k for k in state)
        proc = shoal_cli("export", str(run["dir"]), str(tmp_path / f"{name}.pt"))
        assert proc.returncode == 0, proc.stderr[-1500:]
        model.load_state_dict(torch.load(tmp_path / f"{name}.pt", weights_only=True))  # strict: every key


def test_the_first_steps_compile_time_is_marked_before_the_first_step(allreduce):
    """compile_s reaches the rank's marks (the controller writes rank 0's to startup.json) ahead of first_step."""
    from shoal.startup import Startup

    marks = allreduce["compiled"]["marks"]
    assert [name for name, _ in marks] == ["torch_imported", "process_group", "built", "compile_s", "first_step"]
    assert dict(marks)["compile_s"] > 0 and dict(marks)["first_step"] is None  # a duration; the stages are times
    assert [name for name, _ in allreduce["eager"]["marks"]] == [
        "torch_imported",
        "process_group",
        "built",
        "first_step",
    ]
    startup = Startup()
    startup.add_rank(0, {"first_step": startup.origin + 5.0, "compile_s": 3.5})
    assert startup.as_dict()["ranks"]["0"] == {"first_step": 5.0, "compile_s": 3.5}  # a duration stays one


def error_line(proc) -> str:
    """The one error line of a refused command (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("shoal: error")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    return lines[0]


def test_without_a_compiler_validate_and_train_say_what_to_install(tmp_path):
    args = [str(QUICKSTART), *tiny_overrides(tmp_path / "run", **{"train.compile": "blocks", "train.max_steps": 2})]
    env = {"CXX": str(tmp_path / "no-such-g++")}  # the compiler inductor would call, named and absent
    said = error_line(shoal_cli("validate", *args, env=env))
    assert "train.compile: torch.compile needs a C++ compiler (g++)" in said and "apt-get install g++" in said
    assert error_line(shoal_cli("train", *args, env=env)) == said  # before any Ray process
    assert error_line(shoal_cli("worker", *args, env=env)) == said  # a rank by torchrun checks it too


def test_compiling_the_whole_model_under_pipeline_stages_is_a_config_error(tmp_path):
    overrides = {"train.compile": "model", "parallel.pipeline_stages": 2}
    said = error_line(shoal_cli("validate", str(QUICKSTART), *tiny_overrides(tmp_path / "run", **overrides)))
    assert "train.compile: model compiles the model's whole forward" in said and "use train.compile: blocks" in said
