"""Real one-node Slurm: a job launched through launchers.slurm finishes; a preempted one requeues,
resumes from its saved step and ends with the loss trajectory of the uninterrupted job."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)
from tiny_ddp_train import TRAINING, read_events, read_losses

from launchers.slurm import render_sbatch, submit_sbatch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROGRAM, CONFIG, SLOW = TRAINING


def _submit(run_dir: Path, log_dir: Path, name: str, extra: tuple[str, ...] = ()) -> str:
    script = render_sbatch("stage2", config=CONFIG, overrides=[f"run.dir={run_dir}", *extra], nodes=1,
                           gpus_per_node=0, cpus_per_task=os.cpu_count() or 1, partition=None, time="20:00",
                           signal_seconds=120, job_name=name, log_dir=str(log_dir), nproc_per_node=2,
                           entry=PROGRAM, workdir=str(REPO_ROOT))
    return submit_sbatch(script, dry_run=False)


def _log(log_dir: Path, name: str, job_id: str) -> str:
    path = log_dir / f"{name}-{job_id}.log"
    return path.read_text() if path.exists() else f"<no log at {path}>"


@pytest.fixture(scope="module")
def finished_job(slurm_cluster, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("slurm_plain")
    job_id = _submit(tmp / "run", tmp / "logs", "plain")
    state = slurm_cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    return job_id, state, tmp


def test_job_finishes_with_a_checkpoint(slurm_cluster, finished_job):  # noqa: F811
    job_id, state, tmp = finished_job
    log = _log(tmp / "logs", "plain", job_id)
    assert state == "COMPLETED", log
    assert slurm_cluster.job_field(job_id, "ExitCode") == "0:0"
    losses = read_losses(tmp / "run")
    assert sorted(losses) == list(range(1, max(losses) + 1)) and len(losses) >= 10
    assert (tmp / "run" / "checkpoints" / f"step_{max(losses):06d}.pt").exists()
    events = read_events(tmp / "run")
    assert [e["event"] for e in events] == ["start", "done"] and events[0]["world_size"] == 2
    assert "job step finished with exit code 0" in log


def test_preempted_job_requeues_and_resumes(slurm_cluster, finished_job, tmp_path):  # noqa: F811
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    job_id = _submit(run_dir, log_dir, "preempt", SLOW)

    deadline = time.monotonic() + 300
    while len(read_losses(run_dir)) < 2:  # training has started and made progress
        assert time.monotonic() < deadline, _log(log_dir, "preempt", job_id)
        assert slurm_cluster.job_field(job_id, "JobState") in ("PENDING", "RUNNING"), _log(log_dir, "preempt", job_id)
        time.sleep(0.5)
    # what Slurm does signal_seconds before the time limit: USR2 to the batch shell only
    slurm_cluster.run("scancel", "--signal=USR2", "--batch", job_id)

    deadline = time.monotonic() + 300
    while int(slurm_cluster.job_field(job_id, "Restarts") or 0) < 1:
        assert time.monotonic() < deadline, _log(log_dir, "preempt", job_id)
        time.sleep(0.5)
    # Slurm holds a requeued batch job back ~2 minutes (BeginTime); release it now to keep the test short
    while slurm_cluster.job_field(job_id, "JobState") == "PENDING":
        slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        time.sleep(1)
    state = slurm_cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    log = _log(log_dir, "preempt", job_id)
    assert state == "COMPLETED", log

    events = read_events(run_dir)
    assert [e["event"] for e in events] == ["start", "preempted", "start", "done"], (events, log)
    stopped_at = events[1]["step"]
    assert 2 <= stopped_at < max(read_losses(run_dir))
    assert events[2]["resume_step"] == stopped_at
    assert events[2]["slurm_restart_count"] == "1"
    assert (run_dir / "checkpoints" / f"step_{stopped_at:06d}.pt").exists()
    assert "exited with 75 (preempted): requeueing" in log
    # the resumed run ends with exactly the uninterrupted run's loss trajectory
    assert read_losses(run_dir) == read_losses(finished_job[2] / "run")


def test_cli_dry_run_prints_the_multinode_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rae_scale.cli", "launch", "--nodes", "4",
                          "--gpus-per-node", "8", "--partition", "gpu", "--time", "2-00:00:00", "--dry-run",
                          "slurm", "stage2", "configs/stage2/tiny_cpu.yaml", "training.max_steps=10"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --requeue", "#SBATCH --signal=B:USR2@300",
                 "--nproc-per-node=8", "--rdzv-backend=c10d",
                 "-m rae_scale.cli train stage2 configs/stage2/tiny_cpu.yaml training.max_steps=10",
                 "scontrol requeue"):
        assert line in script, line
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
