"""Real one-node Slurm running the real stage-2 trainer: a job launched through launchers.slurm finishes
with a committed checkpoint; a preempted one requeues, resumes from its saved step and ends with the
loss trajectory of the uninterrupted job."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from real_training import (CONFIG, SLOW, checkpoint_meta, committed_steps, read_losses, resumed_at,  # noqa: F401
                           run_overrides, tiny_stage2_data)
from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

from launchers.slurm import render_sbatch, submit_sbatch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 10, 3
_SAVED = re.compile(r"stop signal received: saved step (\d+)")


def _submit(data_root: Path, run_dir: Path, log_dir: Path, name: str, extra: tuple[str, ...] = ()) -> str:
    overrides = [*run_overrides(data_root, run_dir, steps=STEPS, every=EVERY), *extra]
    script = render_sbatch("stage2", config=CONFIG, overrides=overrides, nodes=1, gpus_per_node=0,
                           cpus_per_task=os.cpu_count() or 1, partition=None, time="20:00", signal_seconds=120,
                           job_name=name, log_dir=str(log_dir), nproc_per_node=2, workdir=str(REPO_ROOT))
    return submit_sbatch(script, dry_run=False)


def _log(log_dir: Path, name: str, job_id: str) -> str:
    path = log_dir / f"{name}-{job_id}.log"
    return path.read_text(errors="replace") if path.exists() else f"<no log at {path}>"


@pytest.fixture(scope="module")
def finished_job(slurm_cluster, tiny_stage2_data, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("slurm_plain")
    job_id = _submit(tiny_stage2_data, tmp / "run", tmp / "logs", "plain")
    state = slurm_cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    return job_id, state, tmp


def test_job_finishes_with_a_checkpoint(slurm_cluster, finished_job):  # noqa: F811
    job_id, state, tmp = finished_job
    log = _log(tmp / "logs", "plain", job_id)
    assert state == "COMPLETED", log[-6000:]
    assert slurm_cluster.job_field(job_id, "ExitCode") == "0:0"
    assert sorted(read_losses(tmp / "run")) == list(range(1, STEPS + 1))
    assert committed_steps(tmp / "run") == list(range(EVERY, STEPS + 1, EVERY)) + [STEPS]
    assert checkpoint_meta(tmp / "run", STEPS)["world_size"] == 2  # torchrun under srun: two ranks
    assert resumed_at(log) == []
    assert "job step finished with exit code 0" in log


def test_preempted_job_requeues_and_resumes(slurm_cluster, finished_job, tiny_stage2_data, tmp_path):  # noqa: F811
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    job_id = _submit(tiny_stage2_data, run_dir, log_dir, "preempt", SLOW)

    deadline = time.monotonic() + 400
    while not committed_steps(run_dir):  # training has saved a checkpoint and goes on
        assert time.monotonic() < deadline, _log(log_dir, "preempt", job_id)[-6000:]
        assert slurm_cluster.job_field(job_id, "JobState") in ("PENDING", "RUNNING"), \
            _log(log_dir, "preempt", job_id)[-6000:]
        time.sleep(0.5)
    # what Slurm does signal_seconds before the time limit: USR2 to the batch shell only
    slurm_cluster.run("scancel", "--signal=USR2", "--batch", job_id)

    deadline = time.monotonic() + 300
    while int(slurm_cluster.job_field(job_id, "Restarts") or 0) < 1:
        assert time.monotonic() < deadline, _log(log_dir, "preempt", job_id)[-6000:]
        time.sleep(0.5)
    # Slurm holds a requeued batch job back ~2 minutes (BeginTime); release it early to keep the test
    # short, but not within a second or two of the first run's end: slurmd revokes the job's credentials
    # when it ends and refuses a launch whose credential is not newer ("already killed, do not launch").
    while slurm_cluster.job_field(job_id, "JobState") != "PENDING":
        time.sleep(0.5)
    time.sleep(3)
    while slurm_cluster.job_field(job_id, "JobState") == "PENDING":
        slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        time.sleep(1)
    state = slurm_cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    log = _log(log_dir, "preempt", job_id)
    assert state == "COMPLETED", (log[-6000:], (slurm_cluster.root / "log" / "slurmd.log").read_text()[-3000:])

    saved = sorted({int(s) for s in _SAVED.findall(log)})  # every rank logs the step they agreed on
    assert len(saved) == 1 and EVERY <= saved[0] < STEPS, (saved, log[-6000:])  # stopped mid-way
    assert "exited with 75 (preempted): requeueing" in log
    assert "(restart 1)" in log  # the requeued run of the same job
    assert resumed_at(log) == saved  # ... resumed from the step the preempted one saved
    assert saved[0] in committed_steps(run_dir)
    assert checkpoint_meta(run_dir, STEPS)["world_size"] == 2
    # the resumed run ends with exactly the uninterrupted run's loss trajectory (same world size)
    assert read_losses(run_dir) == read_losses(finished_job[2] / "run")


def test_cli_dry_run_prints_the_multinode_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rae_scale.commands.cli", "launch", "--nodes", "4",
                          "--gpus-per-node", "8", "--partition", "gpu", "--time", "2-00:00:00", "--dry-run",
                          "slurm", "stage2", "configs/stage2/tiny_cpu.yaml", "training.max_steps=10"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --requeue", "#SBATCH --signal=B:USR2@300",
                 "--nproc-per-node=8", "--rdzv-backend=c10d",
                 "-m rae_scale.commands.cli train stage2 configs/stage2/tiny_cpu.yaml training.max_steps=10",
                 "scontrol requeue"):
        assert line in script, line
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
