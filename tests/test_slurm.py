"""Slurm: launch/slurm_torchrun.sbatch and launch/slurm_ray.sbatch on a real one-node Slurm cluster.

The fixture starts munged, slurmctld and slurmd as children of this test, with a generated
slurm.conf and all their state in a fresh temporary directory (SLURM_CONF points the commands at
it), so nothing of the machine's own Slurm or munge setup is used or touched. Jobs are submitted
with `sbatch --wait`, exactly as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import DIST_ENV, REPO, free_ports, need_system, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"
VENV_BIN = Path(sys.executable).parent  # torchrun, ray and shoal of this environment
INSTALL = "install slurmctld slurmd slurm-client munge from Debian's packages (apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge)"


def _binary(name: str) -> str:
    """Slurm and munge daemons live in /usr/sbin, which is not on every user's PATH."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail(f"sbatch is installed but {name} is not: {INSTALL}")
    return found


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no file)"


class SlurmCluster:
    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> None:
        out = open(self.root / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        out.close()

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs(name)}")

    def logs(self, name: str) -> str:
        return f"--- {name}.out\n{_tail(self.root / f'{name}.out')}\n--- {name}.log\n{_tail(self.root / f'{name}.log')}"

    def cmd(self, *argv: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(argv), env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw
        )

    def stop(self) -> None:
        """Cancel our jobs (their slurmstepd processes outlive slurmd), then end exactly our daemons."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.cmd("scancel", "--partition=debug", timeout=15)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.cmd("squeue", "-h", timeout=15).stdout.strip():
                    time.sleep(1)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):  # reverse start order
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _slurm_conf(root: Path, host: str, ctld_port: int, slurmd_port: int) -> str:
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    return f"""\
ClusterName=shoaltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
# sbatch --wait polls every 2 s while that is under MinJobAge / 2 (else 2, 8, 32 s: a 15 s job took 42 s)
MinJobAge=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={int(mem_kb / 1024 * 0.9)} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm():
    """A one-node Slurm cluster (munged, slurmctld, slurmd) in a fresh temporary directory."""
    need_system("sbatch")
    if os.geteuid() != 0:
        pytest.fail("Slurm is installed, but this test starts slurmd and munged, which must run as root")
    munged, slurmctld, slurmd = _binary("munged"), _binary("slurmctld"), _binary("slurmd")
    root = Path(tempfile.mkdtemp(prefix="shoal-slurm-"))  # short: unix socket paths live under it
    root.chmod(0o755)
    host = socket.gethostname().split(".")[0]  # slurmd registers as `hostname -s`
    ctld_port, slurmd_port = free_ports(2)
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(mode=0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "plugstack.conf").write_text("")  # not /etc/slurm's
    (root / "slurm.conf").write_text(_slurm_conf(root, host, ctld_port, slurmd_port))
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("SLURM")}
    env["SLURM_CONF"] = str(root / "slurm.conf")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    cluster = SlurmCluster(root, env)
    try:
        cluster.start(
            "munged",
            [
                munged,
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={root}/munge/munge.socket",
                f"--pid-file={root}/munge/munged.pid",
                f"--log-file={root}/munged.log",
                f"--seed-file={root}/munge/munged.seed",
            ],
        )
        deadline = time.monotonic() + 20
        while not (root / "munge" / "munge.socket").exists():
            cluster.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"munged did not create its socket in 20 s\n{cluster.logs('munged')}")
            time.sleep(0.1)
        cluster.start("slurmctld", [slurmctld, "-D", "-i"])
        cluster.start("slurmd", [slurmd, "-D"])
        deadline = time.monotonic() + 60
        state = ""
        while state != "idle":
            cluster.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"node {host} not idle in 60 s (sinfo: {state!r})\n{cluster.logs('slurmctld')}\n{cluster.logs('slurmd')}"
                )
            time.sleep(0.5)
            state = cluster.cmd("sinfo", "-h", "-N", "-o", "%T").stdout.strip()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _sbatch(
    cluster: SlurmCluster, script: str, args: list[str], env: dict[str, str], timeout: float
) -> tuple[int, str, str]:
    """`sbatch --wait` a launch script from the repository root: exit status, job output, a report."""
    log = cluster.root / f"{Path(script).stem}-%j.out"
    proc = cluster.cmd(
        "sbatch",
        "--wait",
        "--parsable",
        f"--chdir={REPO}",
        f"--output={log}",
        str(REPO / "launch" / script),
        *args,
        env={**cluster.env, **env},
        timeout=timeout,
    )
    job_id = proc.stdout.strip().split(";")[0]
    job_log = Path(str(log).replace("%j", job_id)) if job_id else None
    output = job_log.read_text(errors="replace") if job_log and job_log.exists() else ""
    tail = "\n".join(output.splitlines()[-60:])
    return (
        proc.returncode,
        output,
        f"sbatch exit {proc.returncode}: {proc.stdout}{proc.stderr}\njob output (tail):\n{tail}",
    )


def _check_summary(run_dir: Path, report: str) -> None:
    assert (run_dir / "summary.json").exists(), report
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", report
    assert summary["world_size"] == 2, report
    assert summary["val_accuracy"] >= 0.95, report


def test_torchrun_sbatch_trains_the_quickstart(slurm, tmp_path):
    rc, output, report = _sbatch(
        slurm,
        "slurm_torchrun.sbatch",
        [str(QUICKSTART), *tiny_overrides(tmp_path / "run")],
        {"TORCHRUN": str(VENV_BIN / "torchrun"), "PORT": str(free_ports(1)[0])},
        timeout=240,
    )
    assert rc == 0, report
    _check_summary(tmp_path / "run", report)
    assert "2 rank(s) on cpu" in output, report


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def test_ray_sbatch_trains_the_quickstart_and_stops_its_ray(slurm, tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir=slurm.root))  # Ray's sockets: keep the path short
    port, dashboard, client, agent = free_ports(4)
    rc, output, report = _sbatch(
        slurm,
        "slurm_ray.sbatch",
        [str(QUICKSTART), *tiny_overrides(tmp_path / "run")],
        {
            "RAY": str(VENV_BIN / "ray"),
            "SHOAL": str(VENV_BIN / "shoal"),
            "RAY_TMPDIR": str(ray_tmp),
            "PORT": str(port),
            "DASHBOARD_PORT": str(dashboard),
            "CLIENT_PORT": str(client),
            "AGENT_PORT": str(agent),
        },
        timeout=280,
    )
    assert rc == 0, report
    _check_summary(tmp_path / "run", report)
    assert "Ray runtime started" in output, report
    # the job stopped the Ray cluster it started: no process runs from its temp dir any more
    deadline = time.monotonic() + 15
    while (left := _processes_mentioning(str(ray_tmp))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
