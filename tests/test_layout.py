"""Packaging rules: platform/ is a source folder, the quickstart ships inside the package."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_platform_is_not_a_package_and_stdlib_platform_still_imports():
    assert not (REPO / "platform" / "__init__.py").exists()
    import platform

    assert callable(platform.system)


def test_bundled_quickstart_is_the_repository_file():
    from shoal.config import quickstart_path

    assert quickstart_path().read_text() == (REPO / "configs" / "quickstart.yaml").read_text()


def test_importing_shoal_and_the_launcher_does_not_load_torch():
    code = "import sys, shoal.cli, shoal.config, shoal.launcher, shoal.preflight, shoal.cluster; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


def test_every_config_in_configs_validates():
    from shoal.config import load_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    blocks = readme.split("Run the tests:")[1].split("```bash\n")[1].split("\n```")[0].strip()
    assert blocks.count("\n") == 0, "the README's test command is one line"
    assert blocks in (REPO / ".ci" / "run").read_text().splitlines()
    assert "pytest" in blocks and "torch==2.13.0" in blocks


def test_a_missing_system_package_skips_with_what_to_install_unless_ci_requires_it(tmp_path):
    """The README's test command passes without Chromium or Slurm (those tests skip, saying what to install);
    with SHOAL_REQUIRE_SYSTEM_DEPS=1, as .ci/run sets it, the same run fails."""
    import os

    (tmp_path / "test_needs.py").write_text(
        "from conftest import need_system\n\ndef test_browser():\n    need_system('shoal-no-such-browser')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("SHOAL_REQUIRE_SYSTEM_DEPS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path / "test_needs.py")]
    plain = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stdout
    assert "SKIPPED" in plain.stdout and "needs shoal-no-such-browser on PATH: install" in plain.stdout
    strict = subprocess.run(
        cmd, cwd=tmp_path, env={**env, "SHOAL_REQUIRE_SYSTEM_DEPS": "1"}, capture_output=True, text=True, timeout=120
    )
    assert strict.returncode == 1 and "SHOAL_REQUIRE_SYSTEM_DEPS=1 makes this a failure" in strict.stdout


def test_ci_requires_the_system_packages_it_installs():
    ci = (REPO / ".ci" / "run").read_text()
    assert "export SHOAL_REQUIRE_SYSTEM_DEPS=1" in ci
    assert "chromium" in ci and "slurmctld" in ci and "install -y -qq --no-install-recommends g++" in ci
