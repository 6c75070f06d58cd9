"""A real one-node Slurm cluster on this machine, for the launcher tests (needs root).

Installs Debian's slurm-wlm and munge when missing (.ci/install_slurm.sh), then starts munged with a
fresh key, slurmctld and slurmd from a slurm.conf generated in a temporary folder with unused ports,
and tears everything down again. Clients (sbatch, squeue, ...) find it through SLURM_CONF.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, free_port

TOOLS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo", "slurmctld", "slurmd", "munged")


def _have_tools() -> bool:
    return all(shutil.which(t) or Path("/usr/sbin", t).exists() for t in TOOLS)


def ensure_installed() -> None:
    if _have_tools():
        return
    if os.geteuid() != 0:
        raise RuntimeError("Slurm is not installed and installing it needs root: run .ci/install_slurm.sh")
    subprocess.run(["bash", str(REPO_ROOT / ".ci" / "install_slurm.sh")], check=True, timeout=600)
    if not _have_tools():
        raise RuntimeError(f"after .ci/install_slurm.sh some of {TOOLS} are still missing")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class SlurmCluster:
    """munged + slurmctld + slurmd for this host, all state under one temporary folder."""

    def __init__(self, cpus: int | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="rae_scale_slurm_"))
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._pidfiles = [self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "SlurmCluster":
        ensure_installed()
        if os.geteuid() != 0:
            raise RuntimeError("the test Slurm cluster runs its daemons as root")
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        subprocess.run(["munged", "--force", f"--socket={self.socket}", f"--key-file={key}",
                        f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                        f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                        f"--log-file={self.root / 'log' / 'munged.log'}"], check=True, timeout=30)
        _wait_for(self.socket.exists, 20, "the munge socket")
        self.conf.write_text(self._slurm_conf())
        subprocess.run(["slurmctld", "-c"], env=self.env, check=True, timeout=60)
        subprocess.run(["slurmd"], env=self.env, check=True, timeout=60)
        _wait_for(self._node_idle, 60, f"node {self.node} to be idle (logs in {self.root / 'log'})")
        return self

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--quiet", f"--nodelist={self.node}"], env=self.env,
                       check=False, timeout=30, capture_output=True)
        for pidfile in self._pidfiles:
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                continue
            for _ in range(40):  # wait until it is gone (it is not our child: no wait() possible)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.25)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --------------------------------------------------------------------------------------- helpers
    def _slurm_conf(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=raescale",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=30",
            "MinJobAge=600",
            "InactiveLimit=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def run(self, *cmd: str, check: bool = True) -> str:
        """Run a Slurm client command against this cluster and return its stdout."""
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    def job_field(self, job_id: str, field: str) -> str | None:
        """One field of `scontrol show job` (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        for token in out.split():
            key, _, value = token.partition("=")
            if key == field:
                return value
        return None

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        found: list[str] = []

        def reached() -> bool:
            state = self.job_field(job_id, "JobState")
            found[:] = [state or "?"]
            return state in states

        _wait_for(reached, timeout, f"job {job_id} to reach {sorted(states)} (last: {found})")
        return found[0]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm cluster; SLURM_CONF points at it while the session lasts."""
    cluster = SlurmCluster()
    cluster.start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()
