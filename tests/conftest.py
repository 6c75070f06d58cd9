"""Shared pytest fixtures: free ports, 2-rank gloo worlds, tiny real images."""
from __future__ import annotations

import atexit
import os
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
if not FIXTURES.exists():  # CI clones main with shared/ beside it; allow an override too
    FIXTURES = Path(os.environ.get("RAE_SCALE_FIXTURES", FIXTURES))
# DeepSpeed JIT-builds a small CPU op on first use; a cache per checkout keeps two checkouts on one
# machine (with different compiler flags) from rebuilding it back and forth, minutes each time
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))


class Position:
    """A tiny Stateful (a data position) for checkpoint tests: what a loader's state_dict looks like."""

    def __init__(self, pos=0):
        self.pos = pos

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, world_size, port, fn, args, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException as exc:  # report every failure to the parent, then re-raise
        import traceback

        queue.put((rank, "error", traceback.format_exc()))
        raise exc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int = 2, *args, timeout: float = 300.0) -> list:
    """Run fn(rank, world_size, *args) on world_size gloo ranks; return each rank's result.

    fn must be importable (a module-level function). A failure on any rank fails the test
    with that rank's traceback.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        pytest.fail("\n".join(errors))
    return [results[r] for r in range(world_size)]


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.exists():
        pytest.fail(f"golden fixtures not found at {FIXTURES}; set RAE_SCALE_FIXTURES")
    return FIXTURES


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture
def bare_process(monkeypatch):
    """A process no launcher started (the embedded default); its process group is torn down after."""
    import torch.distributed

    from rae_scale.parallel import dist as pdist

    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    if torch.distributed.is_initialized():
        pytest.skip("a process group already exists in this test process")
    yield
    pdist.destroy()


@pytest.fixture
def one_rank(bare_process):
    """A bare process's one-rank gloo group: the DistInfo."""
    from rae_scale.parallel import dist as pdist

    return pdist.init_distributed()


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Small tensors: extra intra-op threads only add contention on a shared CPU (a module's tests
    ask for it with pytestmark = pytest.mark.usefixtures("one_cpu_thread"))."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_root_logging():
    """The CLI's main() and setup_logging() configure the root logger of the test process; the tests after
    get it back as it was (a module asks with pytestmark = pytest.mark.usefixtures("restore_root_logging"))."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The tiny digits dataset (shards, random encoder, latents, stats), built by the real pipeline
    once per session for every test that trains through the CLI (tests/distributed/train_cli.py).

    It lives here, not in tests/distributed/conftest.py: pytest imports every conftest.py outside a
    package as the module `conftest`, so a second one would shadow this file for the many
    `from conftest import run_ranks` imports.
    """
    sys.path.insert(0, str(REPO_ROOT / "tests" / "distributed"))
    from train_cli import build_tiny_data

    return build_tiny_data(tmp_path_factory.mktemp("tiny"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "integration: starts a real external component")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


sys.path.insert(0, str(REPO_ROOT / "tests"))


# The test process ends with the status pytest reported, once the exit handlers (Ray's, wandb's, the
# tests' children) have run, without the interpreter's final teardown. By then the process holds threads
# of native libraries that in-process tests started and that outlive their shutdown calls (Ray's gRPC
# and GCS client, gloo's loops, wandb's service finalizer, fsspec's event loop): once, on CI, after all
# 786 tests had passed, that teardown segfaulted and failed the run. Registered now, at start-up, the
# handler runs after every exit handler registered later (they run last-in, first-out).
# RAE_SCALE_TEST_FULL_TEARDOWN=1 keeps the interpreter's teardown (to look into it).
_SESSION_STATUS: list[int] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session):
    yield
    _SESSION_STATUS[:] = [int(session.exitstatus)]


@atexit.register
def _exit_without_native_teardown():
    if _SESSION_STATUS and os.environ.get("RAE_SCALE_TEST_FULL_TEARDOWN") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_SESSION_STATUS[0])
