"""A local two-node Ray cluster (`ray start` head + worker on 127.0.0.1): a tiny run submitted through
the Jobs API with 2 workers survives the SIGKILL of one worker by restarting from its newest checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from tiny_ddp_train import TRAINING, read_events, read_losses

from launchers.ray_jobs import LocalRayNode, ray_auth_env, submit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROGRAM, CONFIG, SLOW = TRAINING
INTEGRATION = str(Path(__file__).resolve().parent)


def _ray_train_command(run_dir: Path) -> list[str]:
    """PROGRAM as launchers.ray_train options: the real CLI is its default entry, a script its main()."""
    if PROGRAM[0] == "-m":
        opts = [f"--stage={PROGRAM[-1]}"]
    else:
        opts = [f"--entry={Path(PROGRAM[0]).stem}:main"]
    return [sys.executable, "-m", "launchers.ray_train", *opts, "--num-workers=2", "--cpus-per-worker=1",
            "--max-failures=2", CONFIG, f"run.dir={run_dir}", *SLOW]


@pytest.fixture
def two_node_ray(monkeypatch):
    import shutil
    import tempfile

    for key, value in ray_auth_env().items():  # the test process is a client of this cluster
        monkeypatch.setenv(key, value)

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    head = LocalRayNode(num_cpus=1, temp_dir=temp_dir).start()
    worker = LocalRayNode(head_address=head.gcs_address, num_cpus=1).start()
    try:
        yield head
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


def test_killed_worker_restarts_from_newest_checkpoint(two_node_ray, tmp_path):
    from ray.job_submission import JobSubmissionClient

    _wait_nodes(two_node_ray.gcs_address, 2)
    run_dir = tmp_path / "run"
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), INTEGRATION]), "OMP_NUM_THREADS": "1"}}
    job = submit(two_node_ray.dashboard_url, _ray_train_command(run_dir), runtime_env=env, follow_logs=False)
    client = JobSubmissionClient(two_node_ray.dashboard_url)

    def logs() -> str:
        return client.get_job_logs(job["job_id"])[-6000:]

    deadline = time.monotonic() + 400
    while not list((run_dir / "checkpoints").glob("step_*.pt")):  # a checkpoint to come back to
        assert time.monotonic() < deadline, logs()
        assert str(client.get_job_status(job["job_id"])).split(".")[-1] in ("PENDING", "RUNNING"), logs()
        time.sleep(0.5)
    events = read_events(run_dir)
    assert len(events) == 1 and events[0]["world_size"] == 2, events
    newest_at_kill = max(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt"))
    victim = int((run_dir / "pids" / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)

    deadline = time.monotonic() + 400
    while (status := str(client.get_job_status(job["job_id"])).split(".")[-1]) not in ("SUCCEEDED", "FAILED",
                                                                                         "STOPPED"):
        assert time.monotonic() < deadline, logs()
        time.sleep(1)
    assert status == "SUCCEEDED", logs()

    events = read_events(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    assert events[-1]["event"] == "done", events
    assert len(starts) >= 2 and starts[0]["resume_step"] == 0, events
    assert starts[1]["resume_step"] >= newest_at_kill > 0, events
    assert starts[1]["pid"] != starts[0]["pid"]

    # the restarted run ends with the trajectory of one process trained start to finish
    single_dir = tmp_path / "single"
    env_single = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    subprocess.run([sys.executable, *PROGRAM, CONFIG, f"run.dir={single_dir}"], check=True, cwd=REPO_ROOT,
                   env=dict(env_single, OMP_NUM_THREADS="1"), timeout=300)
    single, resumed = read_losses(single_dir), read_losses(run_dir)
    assert sorted(resumed) == sorted(single)
    for step, loss in single.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-9, abs=1e-12), step
