"""Submit rae_scale jobs to a Ray cluster through the Ray Jobs API, and start a local Ray cluster.

`rae-scale launch ray --address http://HEAD:8265 stage2 CONFIG ...` submits
`python -m launchers.ray_train ...`; prepare, cache-latents and evaluate are submitted as their
rae-scale subcommands (they use Ray from inside the job). Without an address a local Ray head is
started whose every port listens on 127.0.0.1 only.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

REPO_ROOT = str(Path(__file__).resolve().parents[1])
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_runtime_env(runtime_env: dict | None = None) -> dict:
    """The caller's runtime_env with this checkout on PYTHONPATH (workers import launchers, rae_scale)."""
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars") or {})
    if "working_dir" not in env:
        path = env_vars.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, path) if p)
    env["env_vars"] = env_vars
    return env


def submit(address: str, entrypoint_args: Sequence[str], *, runtime_env: dict | None = None,
           follow_logs: bool = True, submission_id: str | None = None, timeout_s: float | None = None) -> dict:
    """Submit `entrypoint_args` (a command line) as a Ray job; return {"job_id", "status"}.

    follow_logs streams the job's output here and waits for the end (status is then terminal);
    timeout_s bounds that wait (the job is stopped when it runs out).
    """
    from ray.job_submission import JobSubmissionClient

    if not entrypoint_args:
        raise ValueError("entrypoint_args is empty; give the command the job runs")
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint_args), runtime_env=default_runtime_env(runtime_env),
                               submission_id=submission_id)
    log.info("submitted Ray job %s to %s", job_id, address)
    if not follow_logs:
        return {"job_id": job_id, "status": str(client.get_job_status(job_id))}

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except asyncio.TimeoutError:
        client.stop_job(job_id)
        log.error("Ray job %s still running after %.0f s: stopped", job_id, timeout_s)
    deadline = time.monotonic() + 60
    status = str(client.get_job_status(job_id)).split(".")[-1]
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id)).split(".")[-1]
    return {"job_id": job_id, "status": status}


def ray_auth_env() -> dict[str, str]:
    """One auth mode for every process of a local cluster and its clients.

    Ray turns token auth on for a head by itself when a token file exists, but not for the worker
    nodes and clients started beside it; naming the mode explicitly keeps them in agreement.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    have_token = bool(os.environ.get("RAY_AUTH_TOKEN")) or token_file.is_file()
    return {"RAY_AUTH_MODE": "token" if have_token else "disabled"}


class LocalRayNode:
    """`ray start --block` as a child process: a head (with dashboard/Jobs API) or a worker node.

    Every port is chosen free. A head listens on 127.0.0.1 only (every socket of it: see
    data_pipeline.ray_utils.LOOPBACK_ONLY_ENV) unless joinable=True. Other nodes can join only a
    joinable head, and they and it then listen on the host's address too: Ray rewrites a loopback
    node or GCS address to the host's one whenever it runs in multi-node mode, and refuses worker
    nodes in its loopback-only mode. stop() ends exactly this node's processes (never `ray stop`,
    which would end every Ray instance of this user on the machine).
    """

    def __init__(self, *, head_address: str | None = None, num_cpus: int = 1, num_gpus: int = 0,
                 resources: str | None = None, temp_dir: str | None = None, joinable: bool = False):
        self.is_head = head_address is None
        self.loopback_only = self.is_head and not joinable
        self.gcs_port = _free_port() if self.is_head else None
        self.dashboard_port = _free_port() if self.is_head else None
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", "--disable-usage-stats",
               f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
               f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
               f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]
        if resources:
            cmd.append(f"--resources={resources}")
        if self.is_head:
            cmd += ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={_free_port()}"]
            if temp_dir:
                cmd.append(f"--temp-dir={temp_dir}")
        else:
            cmd.append(f"--address={head_address}")
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None

    def _env(self) -> dict[str, str]:
        from data_pipeline.ray_utils import LOOPBACK_ONLY_ENV

        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **ray_auth_env())
        if self.loopback_only:
            env.update(LOOPBACK_ONLY_ENV)
        return env

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 120) -> "LocalRayNode":
        import tempfile

        self.log_path = Path(tempfile.mkstemp(prefix="rae_scale_ray_start_", suffix=".log")[1])
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(self.cmd, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
                                         env=self._env())
        if self.is_head:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    tail = self.log_path.read_text()[-3000:]
                    raise RuntimeError(f"ray start --head exited with {self.proc.returncode}: "
                                       f"{shlex.join(self.cmd)}\n{tail}")
                try:
                    with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                        break
                except urllib.error.HTTPError:  # it answers (401 when Ray's token auth is on): it is up
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        tail = self.log_path.read_text()[-3000:]
                        self.stop()
                        raise TimeoutError(f"Ray dashboard did not come up on {self.dashboard_url}:\n{tail}") from None
                    time.sleep(1)
        return self

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM to the node's process group (ray start and the daemons it started), then SIGKILL."""
        import signal

        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        try:  # daemons that outlived `ray start` (it may exit before they do)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None
        self.log_path.unlink(missing_ok=True)


def ray_train_args(job_args: Sequence[str], *, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                   max_failures: int = 3, min_workers: int | None = None, max_workers: int | None = None,
                   max_preemptions: int = -1) -> list[str]:
    """`stage1|stage2 [CONFIG] [k=v ...]` -> the launchers.ray_train command line (bad worker bounds
    or budgets raise here, before anything is submitted)."""
    from launchers.ray_train import check_elastic_batch, worker_count

    args = list(job_args)
    if not args or args[0] not in ("stage1", "stage2"):
        raise ValueError("launch ray (train) needs the stage first: stage1 or stage2")
    for flag, value in (("--max-failures", max_failures), ("--max-preemptions", max_preemptions)):
        if value < -1:
            raise ValueError(f"{flag} must be >= -1 (-1 = retry forever, 0 = never), got {value}")
    workers = worker_count(num_workers, min_workers, max_workers)
    stage = args.pop(0)
    elastic = isinstance(workers, tuple)
    config = args[0] if args and "=" not in args[0] else None
    if elastic and (config is None or Path(config).is_file()):  # else it is a path on the cluster: checked there
        check_elastic_batch(stage, config, args[1:] if config else args, workers)
    cmd = ["python", "-m", "launchers.ray_train", f"--stage={stage}",
           *([f"--min-workers={workers[0]}", f"--max-workers={workers[1]}"] if elastic else [f"--num-workers={workers}"]),
           f"--cpus-per-worker={cpus_per_worker}", f"--max-failures={max_failures}",
           f"--max-preemptions={max_preemptions}"]
    if use_gpu:
        cmd.append("--use-gpu")
    return cmd + args


def job_entrypoint(job: str, job_args: Sequence[str], *, num_workers: int, use_gpu: bool,
                   cpus_per_worker: float, **budgets) -> list[str]:
    """The Ray job's command line; `budgets` (min_workers, max_workers, max_failures, max_preemptions)
    go to training only."""
    if job == "train":
        return ray_train_args(job_args, num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                              **budgets)
    if job in ("prepare", "cache-latents", "evaluate"):
        return ["python", "-m", "rae_scale.commands.cli", job, *job_args]
    raise ValueError(f"unknown job '{job}'; allowed: train, prepare, cache-latents, evaluate")


def launch_ray(cfg, job_args: Sequence[str], *, job: str = "train", follow_logs: bool = True) -> int:
    """`rae-scale launch ray`: submit to cfg.ray_address, or to a local head started for this job."""
    gpus = cfg.gpus_per_node
    num_workers = cfg.nodes * max(1, gpus)
    cpus_per_worker = max(1, cfg.cpus_per_task // max(1, gpus))
    budgets = {"min_workers": getattr(cfg, "min_workers", None), "max_workers": getattr(cfg, "max_workers", None),
               "max_failures": getattr(cfg, "max_failures", 3), "max_preemptions": getattr(cfg, "max_preemptions", -1)}
    entrypoint = job_entrypoint(job, job_args, num_workers=num_workers, use_gpu=gpus > 0,
                                cpus_per_worker=cpus_per_worker, **budgets)
    most_workers = max(num_workers, budgets["max_workers"] or 0)
    head = None
    address = cfg.ray_address
    if not address:
        os.environ.update(ray_auth_env())  # this process is the head's client
        head = LocalRayNode(num_cpus=max(os.cpu_count() or 1, most_workers * cpus_per_worker)).start()
        address = head.dashboard_url
        log.info("started a local Ray head on %s (127.0.0.1 only)", address)
        follow_logs = True  # the local head goes away when this command returns
    try:
        result = submit(address, entrypoint, follow_logs=follow_logs)
    finally:
        if head is not None:
            head.stop()
    print(f"Ray job {result['job_id']}: {result['status']}")
    return 0 if result["status"] in ("SUCCEEDED", "PENDING", "RUNNING") else 1
