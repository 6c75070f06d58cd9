"""A run folder is never silently mixed up: resume=never into an old run, resume with another
architecture, two trainings at once, and ranks orphaned by `kill -9` of their launcher.

Real `rae-scale train` processes on the tiny stage-2 config; the folder of the session's 5-step
reference run is copied, so only refusals (which stop before training) and one 2-rank run are paid for.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time

import psutil
import pytest
from train_cli import REPO, STAGE2_5_STEPS, data_overrides, logged_step, reference_run, train_cmd, train_env

pytestmark = [pytest.mark.slow]

FIVE_STEPS = STAGE2_5_STEPS


def _run(overrides, nproc=1):
    return subprocess.run(train_cmd("stage2", overrides, nproc), cwd=REPO, env=train_env(), capture_output=True,
                          text=True, timeout=600)


def _committed(run_dir):
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/COMMITTED"))


def test_old_run_is_refused_unless_overwritten_and_architecture_must_match(tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run(tiny_data, "stage2", FIVE_STEPS), run, ignore=shutil.ignore_patterns("LEASE.json"))
    before = (run / "config.yaml").read_bytes(), _committed(run)
    common = data_overrides(tiny_data) + FIVE_STEPS + [f"run.dir={run}"]

    never = _run(common + ["checkpoint.resume=never"])
    assert never.returncode == 2, never.stderr[-3000:]
    assert "checkpoint.resume=never, but run.dir" in never.stderr and "checkpoint.overwrite=true" in never.stderr
    other_arch = _run(common + ["dit.use_pos_embed=false"])
    assert other_arch.returncode == 2, other_arch.stderr[-3000:]
    assert "dit.use_pos_embed: True in the checkpoint, False now" in other_arch.stderr
    # a refused start changes nothing: same config, same checkpoints
    assert ((run / "config.yaml").read_bytes(), _committed(run)) == before

    fresh = _run(common + ["checkpoint.resume=never", "checkpoint.overwrite=true", "training.max_steps=2"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert _committed(run) == ["step-00000002"], "overwrite did not start a new run in the folder"
    assert logged_step(run) == 2


def test_second_training_is_refused_and_ranks_die_with_their_launcher(tiny_data, tmp_path):
    run = tmp_path / "run"
    overrides = data_overrides(tiny_data) + [f"run.dir={run}", "training.max_steps=100000",
                                             "checkpoint.every_steps=100000"]
    launcher = subprocess.Popen(train_cmd("stage2", overrides, 2), cwd=REPO, env=train_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        deadline = time.time() + 300
        while logged_step(run) < 2 and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        assert logged_step(run) >= 2, "the 2-rank run did not start training"
        second = _run(data_overrides(tiny_data) + [f"run.dir={run}", "training.max_steps=3"])
        assert second.returncode == 2, second.stderr[-3000:]
        assert "is in use by another training (host" in second.stderr and "pid" in second.stderr

        ranks = psutil.Process(launcher.pid).children(recursive=True)
        assert len(ranks) >= 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=120)
        assert not alive, f"ranks still running after kill -9 of their launcher: {[p.pid for p in alive]}"
    finally:  # never leave processes behind, whatever failed
        for p in [*ranks, launcher]:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
    # they stopped through the preemption path: the step they reached is saved and resumable
    assert _committed(run), "the orphaned ranks did not save before exiting"
