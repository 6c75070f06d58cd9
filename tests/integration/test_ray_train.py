"""A local two-node Ray cluster (`ray start` head + worker on this machine): the real stage-2 trainer
submitted through the Jobs API with 2 workers survives the SIGKILL of one worker by restarting from
its newest committed checkpoint, and ends with the trajectory of one process trained start to finish
(the session's shared uninterrupted 5-step single-process run)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO_ROOT
from real_training import (CONFIG, SLOW, assert_same_trajectory, checkpoint_meta, committed_steps,  # noqa: F401
                           read_losses, resumed_at, run_overrides, tiny_stage2_data, train_env)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from train_cli import STAGE2_5_STEPS, reference_run, step_metric  # noqa: E402

from launchers.ray_jobs import LocalRayNode, ray_auth_env, submit  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 5, 2  # the session's shared uninterrupted 5-step run is the reference


@pytest.fixture
def two_node_ray(monkeypatch):
    import shutil
    import tempfile

    for key, value in ray_auth_env().items():  # the test process is a client of this cluster
        monkeypatch.setenv(key, value)

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    # joinable: a head that another node joins listens on the host's address (see LocalRayNode)
    head = LocalRayNode(num_cpus=1, temp_dir=temp_dir, joinable=True).start()
    worker = LocalRayNode(head_address=head.gcs_address, num_cpus=1).start()
    try:
        yield head, worker
    finally:
        worker.stop()
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_nodes(address: str, count: int, timeout: float = 120) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120)
        if out.stdout.strip() == str(count):
            return
        time.sleep(2)
    raise TimeoutError(f"Ray cluster at {address} never had {count} live nodes")


def _train_workers(node: LocalRayNode) -> list[psutil.Process]:
    """The Ray Train worker processes running on `node` (its raylet's descendants)."""
    found = []
    for proc in psutil.Process(node.proc.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_killed_worker_restarts_from_newest_checkpoint(two_node_ray, tiny_stage2_data, tmp_path):  # noqa: F811
    from ray.job_submission import JobSubmissionClient

    head, worker_node = two_node_ray
    _wait_nodes(head.gcs_address, 2)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "launchers.ray_train", "--stage=stage2", "--num-workers=2",
               "--cpus-per-worker=1", "--max-failures=2", str(REPO_ROOT / CONFIG),
               *run_overrides(tiny_stage2_data, run_dir, steps=STEPS, every=EVERY), *SLOW]
    env_vars = {k: v for k, v in train_env().items() if k in ("PYTHONPATH", "OMP_NUM_THREADS", "RAE_SCALE_PROGRESS",
                                                               "WANDB_MODE")}
    job = submit(head.dashboard_url, command, runtime_env={"env_vars": env_vars}, follow_logs=False)
    client = JobSubmissionClient(head.dashboard_url)

    def logs() -> str:
        return client.get_job_logs(job["job_id"])

    deadline = time.monotonic() + 600
    while not committed_steps(run_dir):  # a checkpoint to come back to
        assert time.monotonic() < deadline, logs()[-6000:]
        assert str(client.get_job_status(job["job_id"])).split(".")[-1] in ("PENDING", "RUNNING"), logs()[-6000:]
        time.sleep(0.5)
    newest_at_kill = committed_steps(run_dir)[-1]
    assert checkpoint_meta(run_dir, newest_at_kill)["world_size"] == 2  # two Ray Train workers, one group
    victims = _train_workers(worker_node)
    assert len(victims) == 1, victims
    victims[0].send_signal(signal.SIGKILL)

    deadline = time.monotonic() + 600
    while (status := str(client.get_job_status(job["job_id"])).split(".")[-1]) not in ("SUCCEEDED", "FAILED",
                                                                                         "STOPPED"):
        assert time.monotonic() < deadline, logs()[-6000:]
        time.sleep(1)
    text = logs()
    assert status == "SUCCEEDED", text[-6000:]
    assert not victims[0].is_running()

    # the restarted group resumed from a checkpoint at least as new as the newest one at the kill
    resumes = sorted(set(resumed_at(text)))
    assert resumes and resumes[0] >= newest_at_kill and max(resumes) < STEPS, (resumes, text[-6000:])
    assert committed_steps(run_dir)[-1] == STEPS
    assert checkpoint_meta(run_dir, STEPS)["world_size"] == 2
    # ... and ended with the trajectory of one process trained start to finish
    single = step_metric(reference_run(tiny_stage2_data, "stage2", STAGE2_5_STEPS))
    assert_same_trajectory(read_losses(run_dir), single, rel=1e-5)
