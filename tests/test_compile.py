"""train.compile on real 2-rank gloo groups: compiled runs give the eager losses under allreduce (the whole model),
and fsdp (each block, activation-checkpointed, compiled before sharding); a
checkpoint moves from a compiled run to an eager one and back; checkpoints and exports keep the eager model's keys;
the first step's compile time reaches the start-up marks; without a compiler, validate and train say what to install.

Each configuration is compiled once per module (torch.compile takes tens of seconds per model on a small CPU);
the tests share those runs, all six trained one after another by one spawned pair of ranks (one start of the
processes and of torch for them all), each as in a fresh process: TorchDynamo's caches and timers cleared first. Losses agree within TOLERANCE: inductor fuses and reorders float32 arithmetic, so
compiled and eager differ in the last bits, and 20 AdamW steps carry that no further than the loss's 7th digit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shoal.cli import main
from shoal.config import JobConfig, config_from_dict

from _ranks import spawn_sequence
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
    time, a figure for a duration) and how long torch.compile worked for it. The run starts as it would in a
    fresh process: TorchDynamo's compiled frames and its timers (compile_seconds) of earlier runs are cleared
    (inductor's caches on disk stay, as a user's next run finds them)."""
    import torch._dynamo

    from shoal.models import compile_seconds
    from shoal.run import Hooks, Run
    from shoal.worker import run_worker

    torch._dynamo.reset()
    torch._dynamo.utils.cumulative_time_spent_ns.clear()  # what compile_seconds sums: this run's alone
    marks: list[tuple[str, float | None]] = []
    hooks = Hooks(mark=lambda name, seconds=None: marks.append((name, seconds)))
    summary = run_worker(Run(config_from_dict(cfg_dict), hooks=hooks))
    return {"summary": summary, "marks": marks, "compile_s": compile_seconds()}


def trained(*cfg_dicts: dict) -> list[dict]:
    """2-rank runs, one after another on one spawned pair of ranks: rank 0's result of each, with the losses of
    every step it took."""
    out = []
    for cfg_dict, ranks in zip(cfg_dicts, spawn_sequence([(train_on_rank, (c,)) for c in cfg_dicts], 2, 900)):
        run_dir = Path(cfg_dict["run"]["dir"])
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out.append({**ranks[0], "dir": run_dir, "losses": [r["loss"] for r in records if "loss" in r]})
    return out


def step_10(run_dir: Path) -> str:
    return str(run_dir / "checkpoints" / f"step-{STEPS // 2:06d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """allreduce: eager and compiled (model), and each resumed at step 10 from the other's checkpoint;
    fsdp: eager and compiled (blocks), every block activation-checkpointed."""
    need_system("g++")
    root = tmp_path_factory.mktemp("runs")
    checkpointed = {"train.activation_checkpointing": "full"}
    names = ["eager", "compiled", "to_eager", "to_compiled", "fsdp_eager", "fsdp_compiled"]
    done = trained(
        job(root / "eager", "allreduce", False),
        job(root / "compiled", "allreduce", "model"),
        job(root / "to-eager", "allreduce", False, **{"checkpoint.resume_from": step_10(root / "compiled")}),
        job(root / "to-compiled", "allreduce", "model", **{"checkpoint.resume_from": step_10(root / "eager")}),
        job(root / "fsdp-eager", "fsdp", False, **checkpointed),
        job(root / "fsdp-compiled", "fsdp", "blocks", **checkpointed),
    )
    return dict(zip(names, done, strict=True))


@pytest.fixture(scope="module")
def allreduce(runs) -> dict:
    return {name: runs[name] for name in ("eager", "compiled", "to_eager", "to_compiled")}


@pytest.fixture(scope="module")
def fsdp(runs) -> dict:
    return {"eager": runs["fsdp_eager"], "compiled": runs["fsdp_compiled"]}


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
        assert main(["export", str(run["dir"]), str(tmp_path / f"{name}.pt")]) == 0  # `shoal export`, in here
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


def error_line_here(capsys, *args: str) -> str:
    """The one error line of a command refused in this process (exit 2; an exception would fail the test)."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err[-1500:]
    lines = [line for line in err.splitlines() if line.startswith("shoal: error")]
    assert len(lines) == 1 and "Traceback" not in err, err[-1500:]
    return lines[0]


def test_without_a_compiler_validate_and_train_say_what_to_install(tmp_path, capsys, monkeypatch):
    args = [str(QUICKSTART), *tiny_overrides(tmp_path / "run", **{"train.compile": "blocks", "train.max_steps": 2})]
    env = {"CXX": str(tmp_path / "no-such-g++")}  # the compiler inductor would call, named and absent
    said = error_line(shoal_cli("train", *args, env=env))  # a real command: exit 2, no traceback, no Ray process
    assert "train.compile: torch.compile needs a C++ compiler (g++)" in said and "apt-get install g++" in said
    monkeypatch.setenv("CXX", env["CXX"])
    assert error_line_here(capsys, "validate", *args) == said
    assert error_line_here(capsys, "worker", *args) == said  # a rank by torchrun checks it too


def test_compiling_the_whole_model_under_pipeline_stages_is_a_config_error(tmp_path):
    overrides = {"train.compile": "model", "parallel.pipeline_stages": 2}
    said = error_line(shoal_cli("validate", str(QUICKSTART), *tiny_overrides(tmp_path / "run", **overrides)))
    assert "train.compile: model compiles the model's whole forward" in said and "use train.compile: blocks" in said
