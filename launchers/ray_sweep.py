"""Ray Tune runs a sweep's trials; each trial is the real training CLI in a subprocess.

Each Tune trial starts `python -m rae_scale.commands.cli train STAGE CONFIG ... run.dir=<trial folder>`
and waits for it, so a trial resumes, checkpoints and stops exactly as a hand-started run does (the
platform's resume from the newest committed checkpoint, never Tune's restore of a pickled trainable).
Stopping goes through the platform's preemption path too: the driver's SIGTERM/SIGINT writes the sweep's
STOP file, every running trial sends SIGTERM to its training process (which saves and exits 75), and
trials not started yet do not start. A trial whose Ray worker dies takes its training process down the
same way (PR_SET_PDEATHSIG: SIGTERM). With a scheduler (ASHA) the trial reports each metrics.jsonl row
to Tune; a trial the scheduler stops is SIGTERMed likewise and recorded as stopped early.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

POLL_S = 0.25
STOP_GRACE_S = 600.0  # a stopped trial's save may take this long before its process is killed
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


class _StartGate:
    """One trial of this host at a time between its process start and its data stream being open.

    Mosaic streaming registers each dataset under a machine-wide shared-memory prefix, picking the
    first free number without a lock: two trainings that open their datasets at the same moment
    pick the same one and the second fails (FileExistsError '/000000_locals'). Trials that start
    together therefore pass this gate one after the other; a trial holds it until its metrics.jsonl
    is (re)written (the training opens it after its data stream, when resuming or starting), until
    its process ends, or for STARTUP_S at most.
    """

    STARTUP_S = 300.0

    def __init__(self, lock_path: str, metrics_path: str):
        from filelock import FileLock

        self.lock = FileLock(lock_path)
        self.metrics_path = metrics_path
        self.before = self._mtime()
        self.t0 = 0.0

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.metrics_path).st_mtime_ns
        except FileNotFoundError:
            return None

    def enter(self, stop_file: str) -> bool:
        """Wait for the gate; False when the sweep stops meanwhile."""
        from filelock import Timeout

        while not os.path.exists(stop_file):
            try:
                self.lock.acquire(timeout=POLL_S)
                self.before, self.t0 = self._mtime(), time.monotonic()
                return True
            except Timeout:
                continue
        return False

    def release_when_started(self, proc: subprocess.Popen) -> None:
        if self.lock.is_locked and (proc.poll() is not None or self._mtime() != self.before
                                    or time.monotonic() - self.t0 > self.STARTUP_S):
            self.lock.release()

    def release(self) -> None:
        if self.lock.is_locked:
            self.lock.release()


class _MetricsTail:
    """New metrics.jsonl rows of a running trial, each step once (a resumed run rewrites the file)."""

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.last_step = -1
        self.size = -1

    def new_rows(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size == self.size:
            return []
        self.size = size
        from rae_scale.train.metrics import parse_metrics_line

        rows = []
        for line in self.path.read_text().splitlines():
            row = parse_metrics_line(line)
            if row is not None and isinstance(row.get("step"), int) and row["step"] > self.last_step:
                rows.append(row)
                self.last_step = row["step"]
        return rows


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _update_state(path: str, **changes) -> dict:
    from rae_scale.sweep_report import read_json, write_json

    state = read_json(path, {}) or {}
    state.update(changes)
    write_json(path, state)
    return state


def _stop(proc: subprocess.Popen, why: str, name: str) -> None:
    if proc.poll() is None:
        log.warning("trial %s: %s; SIGTERM to its training (it saves and exits)", name, why)
        proc.send_signal(signal.SIGTERM)


def run_trial(config: dict) -> None:
    """The Tune trainable: run one trial's training to its end (or until stopped); record the attempt."""
    from ray import tune

    from rae_scale.lifetime import die_with_parent

    spec = config["spec"]
    name = spec["name"]
    if os.path.exists(spec["stop_file"]):  # the sweep is stopping: do not start
        tune.report({"exit_code": -1, "not_started": 1})
        return
    state = _update_state(spec["state"], running=True)
    attempts = int(state.get("attempts", 0)) + 1
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env.update(spec.get("env") or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (spec["pythonpath"], env.get("PYTHONPATH")) if p)
    cwd = spec["cwd"] if os.path.isdir(spec["cwd"]) else None
    Path(spec["log"]).parent.mkdir(parents=True, exist_ok=True)
    gate = _StartGate(spec["start_lock"], os.path.join(spec["run_dir"], "metrics.jsonl"))
    if not gate.enter(spec["stop_file"]):
        _update_state(spec["state"], running=False)
        tune.report({"exit_code": -1, "not_started": 1})
        return
    t0 = time.monotonic()
    last: dict[str, float] = {}
    early = False
    with open(spec["log"], "a") as out:
        out.write(f"\n=== attempt {attempts}: {' '.join(spec['argv'])}\n")
        out.flush()
        # its own session: a kill of the Ray worker's process group does not reach it (it gets SIGTERM
        # from PR_SET_PDEATHSIG instead, and saves)
        proc = subprocess.Popen([sys.executable, "-m", "rae_scale.commands.cli", *spec["argv"]], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                start_new_session=True)
        tail = _MetricsTail(spec["run_dir"]) if spec.get("report_rows") else None
        signalled = False
        try:
            while True:
                code = proc.poll()
                gate.release_when_started(proc)
                for row in (tail.new_rows() if tail else []):
                    last.update(_numbers(row))
                    if spec["metric"] in last:  # a scheduler compares trials on this one
                        tune.report(dict(last))
                if code is not None:
                    break
                if not signalled and os.path.exists(spec["stop_file"]):
                    _stop(proc, "the sweep is stopping", name)
                    signalled = True
                time.sleep(POLL_S)
        except BaseException:  # Tune stopped this trial (a scheduler's decision) or the worker is ending
            early = not os.path.exists(spec["stop_file"])
            # the attempt's record first: Ray may end this worker while the training saves (measured: an ASHA
            # stop left the state at "running" without this), so the finally below may never run
            _update_state(spec["state"], running=False, attempts=attempts, early_stopped=early,
                          stopped=not early, wall_s=float(state.get("wall_s") or 0.0) + time.monotonic() - t0)
            _stop(proc, "stopped by the scheduler" if early else "the sweep is stopping", name)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            gate.release()
            code = proc.poll()
            _update_state(spec["state"], running=False, attempts=attempts, exit_code=code, early_stopped=early,
                          stopped=signalled or os.path.exists(spec["stop_file"]),  # by the sweep, not a failure
                          wall_s=float(state.get("wall_s") or 0.0) + time.monotonic() - t0)
    tune.report({**last, "exit_code": code})


class _StopOnSignal:
    """SIGTERM / SIGINT to the driver: write the STOP file (the trials stop their runs), keep waiting."""

    def __init__(self, stop_file: str):
        self.stop_file = stop_file
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, _frame):
        if self.received is None:
            self.received = signum
            Path(self.stop_file).touch()
            os.write(2, f"\nsweep: {signal.Signals(signum).name}: stopping the running trials (they save and "
                        "exit); run the same command again to resume\n".encode())

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _trial_label(trial) -> str:
    return trial.config["spec"]["name"]


def run_trials(specs: Sequence[dict], *, storage_path: str, stop_file: str, address: str | None = None,
               max_concurrent: int | None = None, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
               scheduler: str | None = None, metric: str = "loss", mode: str = "min", max_t: int | None = None,
               prepare=None) -> dict:
    """Run the trials as one Tune experiment on a local Ray instance (or the cluster at `address`).

    specs: one dict per trial (run_trial's "spec"). prepare(): called once Ray is up, before any trial
    (e.g. building a tiny dataset through the same Ray instance). Returns {"stopped_by": signal name or None}.
    """
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # our handler stops trials through the preemption path
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # a trial's last report may lack an eval metric
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray SIGKILLs a worker's child processes when the worker exits, as Tune's trial actors do once a
    # scheduler stops them: the training would die mid-step instead of saving. Off, the training gets
    # SIGTERM from PR_SET_PDEATHSIG and saves. A local instance inherits this; a cluster's nodes need it
    # in their environment too.
    os.environ["RAY_kill_child_processes_on_worker_exit"] = "0"
    from data_pipeline.ray_utils import cluster_gpus, ray_session

    num_cpus = None if address else max(os.cpu_count() or 1, int(cpus_per_trial + 0.999))
    with ray_session(address, num_cpus=num_cpus):
        if gpus_per_trial and cluster_gpus() < gpus_per_trial:
            raise ValueError(f"--gpus-per-trial {gpus_per_trial} but the Ray cluster has {cluster_gpus()} GPU(s)")
        if prepare is not None:
            prepare()
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler

        sched = None
        if scheduler == "asha":
            top = max_t or 100
            # max_t one past the last step: a trial reaching it ends by itself, Tune never stops it there
            sched = ASHAScheduler(time_attr="step", metric=metric, mode=mode, max_t=top + 1,
                                  grace_period=max(1, top // 8), reduction_factor=2)
        trainable = tune.with_resources(run_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space={"spec": tune.grid_search(list(specs))},
            tune_config=tune.TuneConfig(scheduler=sched, max_concurrent_trials=max_concurrent,
                                        trial_name_creator=_trial_label, trial_dirname_creator=_trial_label),
            run_config=tune.RunConfig(name="tune", storage_path=storage_path, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        with _StopOnSignal(stop_file) as stopper:
            tuner.fit()
        return {"stopped_by": signal.Signals(stopper.received).name if stopper.received else None}
