"""Config: loading, overrides, every bad-input case (exit 2, one line naming file and key), reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shoal.config import JobConfig, config_reference, load_config, parse_override
from shoal.errors import ConfigError

from conftest import REPO

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_quickstart_loads_and_overrides_apply():
    cfg = load_config(
        QUICKSTART, ["train.max_steps=200", "optim.lr=0.1", "model.freeze=[layers.0.*]", "scaling.address=auto"]
    )
    assert cfg.train.max_steps == 200
    assert cfg.optim.lr == pytest.approx(0.1)
    assert cfg.model.freeze == ["layers.0.*"]
    assert cfg.scaling.address == "auto"
    assert cfg.name == "quickstart"


def test_none_path_is_the_bundled_quickstart():
    assert load_config(None) == load_config(QUICKSTART)


def test_defaults_fill_missing_sections(tmp_path):
    cfg = load_config(write(tmp_path, "name: tiny\n"))
    assert cfg.train == JobConfig().train
    assert cfg.name == "tiny"


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=hello") == ("a", "hello")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(QUICKSTART, ["optim.lr=0.5"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(
    "text, overrides, needles",
    [
        (
            "train:\n  max_stepz: 3\n",
            [],
            ["job.yaml:2", "train.max_stepz", "unknown key", "did you mean 'train.max_steps'"],
        ),
        ("optimizer:\n  lr: 1\n", [], ["optimizer", "unknown key", "did you mean 'optim'"]),
        ("train:\n  grad_accum_steps: 0\n", [], ["train.grad_accum_steps", ">= 1", "got 0"]),
        ("optim:\n  lr: 0\n", [], ["optim.lr", "> 0", "got 0"]),
        ("optim:\n  lr: -1\n", [], ["optim.lr", "> 0"]),
        ("optim:\n  lr: fast\n", [], ["optim.lr", "fast"]),
        ("train:\n  precision: fp8\n", [], ["train.precision", "'fp32', 'bf16', 'fp16'", "fp8"]),
        ("train:\n  precision: fp16\n", [], ["train.precision", "fp16 needs CUDA"]),
        ("train:\n  clip_grad_norm: 1\n  clip_grad_value: 1\n", [], ["train.clip_grad_value", "not both"]),
        ("schedule:\n  name: multistep\n", [], ["schedule.milestones"]),
        ("model:\n  target: not a path\n", [], ["model.target", "package.module:factory"]),
        ("ddp:\n  static_graph: true\ntrain:\n  grad_accum_steps: 2\n", [], ["ddp.static_graph", "grad_accum_steps"]),
        ("", ["optim.lrr=0.1"], ["optim.lrr", "did you mean 'optim.lr'"]),
        ("", ["scaling.num_workers=0"], ["scaling.num_workers", ">= 1"]),
        ("", ["name=Bad Name!"], ["name", "must match"]),
        ("", ["scaling.min_workers=3"], ["scaling.min_workers", "more than scaling.num_workers=2"]),
        ("", ["scaling.min_workers=1"], ["scaling.min_workers", "scaling.max_failures >= 1"]),
        (
            "parallel:\n  pipeline_stages: 2\nscaling:\n  min_workers: 1\n  max_failures: 1\n",
            [],
            ["scaling.min_workers", "pipelines cannot resize"],
        ),
        (
            "strategy: async_ps\nscaling:\n  min_workers: 1\n  max_failures: 1\n",
            [],
            ["scaling.min_workers", "async_ps"],
        ),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    with pytest.raises(ConfigError, match=r"job\.yaml:3:\d+: YAML syntax error"):
        load_config(write(tmp_path, "train:\n  max_steps: 3\n bad: [1\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_config("nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    assert start in readme and end in readme, "README lacks the generated config reference"
    current = readme.split(start)[1].split(end)[0].strip()
    assert current == config_reference().strip(), (
        "README config reference is stale: run `shoal config-reference --update README.md`"
    )


def test_every_field_is_documented():
    missing = [line for line in config_reference().splitlines() if re.match(r"\| `[^`]+` \| .* \|  \|$", line)]
    assert not missing, f"fields without a docstring: {missing}"
