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


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start a local Ray instance bound to 127.0.0.1, without dashboard, with a small object store."""
    import ray

    ray.init(
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
    else:
        logger.info("starting a local Ray instance (%s CPUs)", num_cpus or os.cpu_count())
        start_local_ray(num_cpus=num_cpus)
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not sys.stderr.isatty())


def wait_all(refs, desc: str):
    """Yield results of Ray object refs as they finish, with a progress bar; errors propagate."""
    import ray

    pending = list(refs)
    with progress(len(pending), desc) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield ray.get(ref)
                bar.update(1)
