"""`shoal report`: the HTML page opened in headless Chromium (Debian's package), as a person's browser would."""

from __future__ import annotations

import json
import subprocess

import pytest

from shoal import check
from shoal.config import load_config

from conftest import REPO, need_system, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def browser() -> str:
    """Headless Chromium, found before any run is trained for it."""
    return need_system("chromium", "chromium-browser", "chromium-headless-shell")


def chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
    ]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("rror" in line or "Uncaught" in line)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run with an alert (a start far above ln C) and a check report beside it."""
    from shoal.worker import run_worker

    run = tmp_path_factory.mktemp("report") / "run"
    extra = {
        "train.max_steps": 60,
        "train.eval_every": 30,
        "model.init": "normal",
        "model.init_std": 3.0,
        "log.every": 5,
    }
    cfg = load_config(QUICKSTART, tiny_overrides(run, **extra))
    run_worker(cfg)
    check.run(cfg, run / "check", say=lambda line: None)
    return run


def test_report_opens_in_chromium_with_its_curves_alerts_and_findings(browser, run_dir, tmp_path):
    r = shoal_cli("report", str(run_dir))
    assert r.returncode == 0, r.stderr
    page = run_dir / "report.html"
    assert "<script src=" not in page.read_text()  # self-contained: nothing fetched from the network
    shown = chromium(browser, "--dump-dom", page.as_uri())
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = shown.stdout
    assert console_errors(shown.stderr) == []
    assert dom.count("js-plotly-plot") >= 6 and dom.count("main-svg") >= 6  # the curves were drawn by plotly
    assert dom.count('<li class="alert">') >= 1 and "initial_loss" in dom and "Remedies:" in dom
    assert 'id="findings"' in dom and "initial_loss_high" in dom  # shoal check's finding of the same start
    assert 'id="checkpoints"' in dom and "step-000060" in dom
    assert 'id="config"' in dom and "init_std: 3.0" in dom
    shot = tmp_path / "shot.png"
    chromium(browser, "--hide-scrollbars", "--window-size=1300,1800", f"--screenshot={shot}", page.as_uri())
    from PIL import Image

    img = Image.open(shot).convert("RGB").resize((260, 360))
    colours = img.getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 40  # curves and text, not a blank page
    blue = sum(n for n, (r_, g, b) in colours if b > 180 and r_ < 140)  # plotly's first trace colour
    assert blue > 20


def test_report_of_a_directory_without_a_run_exits_2(tmp_path):
    r = shoal_cli("report", str(tmp_path))
    assert r.returncode == 2 and "metrics.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_compare_page_lists_both_strategies(browser, tmp_path):
    """The comparison page from a comparison's own files (shoal compare's report.json and per-strategy metrics)."""
    base = tmp_path / "cmp"
    for name, losses in (("allreduce", [2.0, 1.0, 0.5]), ("async_ps", [2.1, 1.4, 0.9])):
        d = base / "compare" / name
        d.mkdir(parents=True)
        lines = [{"step": 10 * (i + 1), "loss": v, "elapsed_s": 0.5 * (i + 1)} for i, v in enumerate(losses)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = {
        "budget": "30",
        "target_loss": 0.9,
        "strategies": {
            "allreduce": {"samples_per_s": 900.0, "train_loss": 0.5, "time_to_target_s": 1.2},
            "async_ps": {"samples_per_s": 700.0, "train_loss": 0.9, "time_to_target_s": 1.5},
        },
    }
    (base / "compare" / "report.json").write_text(json.dumps(report))
    assert shoal_cli("report", str(base)).returncode == 0
    shown = chromium(browser, "--dump-dom", (base / "report.html").as_uri())
    assert console_errors(shown.stderr) == []
    assert 'id="results"' in shown.stdout and "async_ps" in shown.stdout and shown.stdout.count("main-svg") >= 1
