"""Connecting to Ray: an existing cluster by address, or a small private local instance."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # the jobs pass paths and small reports, never images


def _pythonpath() -> str:
    # Workers import data_pipeline / rae_scale by module name; a source checkout must be on their path.
    parts = [_REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


# Ray on Linux rewrites a loopback node address (ray.init(_node_ip_address="127.0.0.1"), `ray start
# --node-ip-address=127.0.0.1`, a GCS address 127.0.0.1:PORT) into the host's network address
# (services.resolve_ip_for_localhost) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0, the mode Ray uses
# on macOS/Windows. In that mode the node keeps 127.0.0.1, and every listener of the node picks
# loopback because it binds loopback exactly when the node address is loopback: GCS, raylet (node and
# object manager), core workers, the dashboard agent (HTTP, gRPC, metrics export), the runtime-env
# agent. Ray refuses other nodes joining such a head, which is what a private instance wants.
LOOPBACK_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextlib.contextmanager
def loopback_only():
    """Ray's single-machine mode for the ray.init() inside: this process and the daemons it starts.

    The daemons inherit the variable. This process read it when it first imported ray, so the
    already-imported flag (ray._private.ray_constants.ENABLE_RAY_CLUSTER) is switched too, for the
    duration of the block only; tests/integration/test_ray_loopback.py notices if Ray renames it.
    """
    from ray._private import ray_constants

    saved_env = {k: os.environ.get(k) for k in LOOPBACK_ONLY_ENV}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(LOOPBACK_ONLY_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start a local Ray instance whose every port listens on 127.0.0.1 only, without dashboard,
    with a small object store."""
    import ray

    with loopback_only():
        ray.init(
            address="local",  # a new instance, never another `ray start` cluster found on this machine
            num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
            num_gpus=num_gpus,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}},
            configure_logging=False,
            log_to_driver=True,
        )


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Use the Ray instance already initialised in this process, else connect or start one.

    Only an instance started here is shut down on exit.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}},
                 configure_logging=False)
        reaper = None
    else:
        # the instance started here dies with this process, even after kill -9 (see ray_reaper);
        # the watchdog starts first, so it sees every Ray process from the first one on
        reaper = _start_reaper()
        logger.info("starting a local Ray instance (%s CPUs)", num_cpus or os.cpu_count())
        try:
            start_local_ray(num_cpus=num_cpus)
        except BaseException:
            reaper.kill()
            raise
    try:
        yield ray
    finally:
        ray.shutdown()
        if reaper is not None:
            reaper.kill()
            reaper.wait()


def _start_reaper():
    import subprocess

    env = dict(os.environ, PYTHONPATH=_pythonpath())
    reaper = subprocess.Popen([sys.executable, "-m", "data_pipeline.ray_reaper", str(os.getpid())], env=env,
                              start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    reaper.stdout.readline()  # it is watching: nothing Ray starts from now on can outlive this process
    reaper.stdout.close()
    return reaper


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not sys.stderr.isatty())
