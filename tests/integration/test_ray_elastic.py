"""Elastic Ray Train: a stage-2 job on a local two-node Ray cluster (1 worker slot per node) loses the node
of one of its two workers to a preemption (a drain with reason PREEMPTION, then the node is killed, as a
cloud reclaims a spot instance), restarts on the one slot left from its newest committed checkpoint and
finishes; the losses of every step repeat the uninterrupted 2-rank run, because the platform lays the
same global batch out over one rank and the MDS loader's position yields the same global batches.

The loss is charged to the preemption budget, not the failure budget: the job runs with
--max-failures=0, so a misfiled loss would end it.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from real_training import (CONFIG, SLOW, checkpoint_meta, committed_steps, read_losses, resumed_at,  # noqa: F401
                           run_overrides, tiny_stage2_data, train_env)
from test_ray_train import _train_workers, two_node_ray  # noqa: F401 (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from train_cli import STAGE2_5_STEPS, reference_run, step_metric  # noqa: E402

from launchers.ray_jobs import submit  # noqa: E402

STEPS, EVERY = 5, 2  # the session's shared uninterrupted 5-step run is the reference
# a sample grid of 200 Euler steps after every training step (the grids do not touch the losses): the steps
# after the checkpoint the test waits for must outlast the drain, its deadline and the kill (a few seconds),
# or the run ends before it loses a worker
SLOW_STEPS = (*SLOW, "sampler.num_steps=200")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _wait_two_nodes(gcs_address: str, timeout: float = 300) -> str:
    """Wait until both nodes are up (as test_ray_train's _wait_nodes); returns the worker node's id."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "live = [n for n in ray.nodes() if n['Alive']]; "
            "print(len(live), *[n['NodeID'] for n in live if 'node:__internal_head__' not in n['Resources']])")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", code, gcs_address], capture_output=True, text=True, timeout=300)
        words = out.stdout.split()  # "2 WORKER_NODE_ID" once both are up
        if len(words) == 2 and words[0] == "2":
            return words[1]
        time.sleep(2)
    raise TimeoutError(f"the Ray cluster at {gcs_address} never had 2 live nodes")


def _kill(proc) -> None:
    """SIGKILL a process unless it is gone already, and wait until it is (a zombie counts as gone)."""
    import psutil

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
            proc.kill()
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    raise TimeoutError(f"worker {proc.pid} outlived its node")


def _preempt(node_id: str, gcs_address: str) -> None:
    """What a cloud autoscaler does before reclaiming a spot node: drain it with reason PREEMPTION and
    a deadline (Ray's own `ray drain-node`)."""
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "drain-node", f"--address={gcs_address}",
                    f"--node-id={node_id}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message=spot reclaim (test)", "--deadline-remaining-seconds=1"],
                   check=True, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags, message, cli_message", [
    (["--min-workers=3", "--max-workers=2"], "--min-workers (3) must be <= --max-workers (2)",
     "--min-workers (3) must be <= --max-workers (2)"),
    (["--min-workers=0", "--max-workers=2"], "--min-workers must be >= 1, got 0",
     "config key 'min_workers': bad value 0; allowed: >= 1"),
    (["--max-workers=0"], "--max-workers must be >= 1, got 0", "config key 'max_workers': bad value 0; allowed: >= 1"),
    (["--max-preemptions=-2"], "--max-preemptions must be >= -1", "config key 'max_preemptions': bad value -2"),
    # tiny_cpu's global batch of 32 fits 1, 2 and 4 ranks, not 3: a restart on 3 workers could not train
    (["--min-workers=2", "--max-workers=4"], "cannot be laid out on 3 worker(s) of the elastic range 2..4",
     "cannot be laid out on 3 worker(s) of the elastic range 2..4"),
])
def test_bad_worker_bounds_are_one_line_errors(flags, message, cli_message, capsys):
    from launchers.ray_train import main
    from rae_scale.commands.cli import main as cli

    with pytest.raises(SystemExit) as exc:  # before any Ray call or folder is made
        main([*flags, "configs/stage2/tiny_cpu.yaml"])
    assert message in str(exc.value) and "\n" not in str(exc.value), exc.value
    # `rae-scale launch ray` says the same before it starts or submits anything
    split = [part for flag in flags for part in flag.split("=", 1)]
    assert cli(["launch", "ray", *split, "stage2", "configs/stage2/tiny_cpu.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rae-scale: error:") and cli_message in err, err


def test_elastic_trainer_gets_both_budgets(monkeypatch):
    """The TorchTrainer Ray builds: num_workers=(min, max), preemptions apart from failures."""
    from launchers.ray_jobs import ray_auth_env
    from launchers.ray_train import build_trainer, worker_count

    for key, value in ray_auth_env().items():  # Ray reads its auth mode once, at import: the clusters' one
        monkeypatch.setenv(key, value)

    assert worker_count(4) == 4 and worker_count(4, 2, None) == (2, 4) and worker_count(4, None, 8) == (1, 8)
    assert worker_count(4, 3, 3) == 3  # min == max: a fixed group
    trainer = build_trainer(entry="x:y", argv=[], num_workers=(1, 2), use_gpu=False, cpus_per_worker=1,
                            max_failures=0, max_preemptions=5, resize_interval_s=7.0, storage_path="/tmp", name="t")
    scaling, failure = trainer.scaling_config, trainer.run_config.failure_config
    assert (scaling.elasticity_enabled, scaling.min_workers, scaling.max_workers) == (True, 1, 2)
    assert scaling.elastic_resize_monitor_interval_s == 7.0
    assert (failure.max_failures, failure.max_preemption_failures) == (0, 5)


@pytest.mark.integration
@pytest.mark.slow
def test_preempted_worker_continues_on_fewer_workers_with_the_same_losses(two_node_ray, tiny_stage2_data,  # noqa: F811
                                                                         tmp_path):
    from ray.job_submission import JobSubmissionClient

    head, worker_node = two_node_ray
    worker_node_id = _wait_two_nodes(head.gcs_address)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "launchers.ray_train", "--stage=stage2", "--min-workers=1",
               "--max-workers=2", "--cpus-per-worker=1", "--max-failures=0", "--max-preemptions=1",
               str(REPO_ROOT / CONFIG), *run_overrides(tiny_stage2_data, run_dir, steps=STEPS, every=EVERY),
               *SLOW_STEPS]
    env_vars = {k: v for k, v in train_env().items() if k in ("PYTHONPATH", "OMP_NUM_THREADS", "RAE_SCALE_PROGRESS",
                                                               "WANDB_MODE")}
    job = submit(head.dashboard_url, command, runtime_env={"env_vars": env_vars}, follow_logs=False)
    client = JobSubmissionClient(head.dashboard_url)

    def status() -> str:
        return str(client.get_job_status(job["job_id"])).split(".")[-1]

    def logs() -> str:
        return client.get_job_logs(job["job_id"])

    deadline = time.monotonic() + 600
    while not committed_steps(run_dir):  # a checkpoint to come back to
        assert time.monotonic() < deadline and status() in ("PENDING", "RUNNING"), logs()[-6000:]
        time.sleep(0.25)
    newest_at_kill = committed_steps(run_dir)[-1]
    assert newest_at_kill < STEPS, "the run ended before a worker could be lost; make its steps slower"
    assert checkpoint_meta(run_dir, newest_at_kill)["world_size"] == 2  # both slots in use
    victims = _train_workers(worker_node)
    assert len(victims) == 1, victims
    _preempt(worker_node_id, head.gcs_address)
    time.sleep(1.0)  # the deadline passes, the reclaim takes the node and its worker
    worker_node.stop()
    _kill(victims[0])  # Ray's workers sit in their own process groups: the node's SIGKILL may miss them

    deadline = time.monotonic() + 600
    while (state := status()) not in TERMINAL:
        assert time.monotonic() < deadline, logs()[-6000:]
        time.sleep(1)
    text = logs()
    assert state == "SUCCEEDED", text[-6000:]  # with --max-failures=0: the loss counted as a preemption
    assert "Source: preemption" in text and "Source: worker group" not in text, text[-6000:]  # Ray's FailurePolicy

    # the group came back on the one slot left, from a checkpoint at least as new as the newest at the kill
    resumes = resumed_at(text)
    assert resumes and min(resumes) >= newest_at_kill and max(resumes) < STEPS, (resumes, text[-6000:])
    assert committed_steps(run_dir)[-1] == STEPS
    assert checkpoint_meta(run_dir, STEPS)["world_size"] == 1
    # ... and its losses follow the uninterrupted 2-rank run (same global batch, same batches)
    straight = step_metric(reference_run(tiny_stage2_data, "stage2", STAGE2_5_STEPS, nproc=2))
    got = read_losses(run_dir)
    assert sorted(got) == sorted(straight) == list(range(1, STEPS + 1)), (sorted(got), sorted(straight))
    after = [s for s in straight if s > min(resumes)]
    print(f"resumed at step {min(resumes)} on 1 worker; steps {after}: max relative loss difference "
          f"{max(abs(got[s] - straight[s]) / abs(straight[s]) for s in after):.3e}")
    for step, loss in straight.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=0), (step, got[step], loss)
