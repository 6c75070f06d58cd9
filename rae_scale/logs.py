"""Logging set up once per process: rank-aware levels and prefixes, progress bars that know about TTYs."""
from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not as it was at set-up: a redirected or
    captured stderr (pytest, a caller's contextlib.redirect_stderr) that was replaced since still works."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class RedactingFormatter(logging.Formatter):
    """Every line passes through config.redact: a secret override or `user:pass@` URL that reaches a log
    message (a launcher echoing its command line, a run folder URL) is printed as '***'."""

    def format(self, record: logging.LogRecord) -> str:
        from rae_scale.config import redact

        return redact(super().format(record))


def _rank_from_env() -> tuple[int, int]:
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ.get(world_key, "1"))
    return 0, 1


def setup_logging(rank: int | None = None, world_size: int | None = None, level: int = logging.INFO) -> None:
    """Rank 0 logs INFO, other ranks WARNING and above; multi-process lines carry a [rank r] prefix.

    Safe to call again (e.g. once the process group is up): it re-applies rank and level.
    """
    global _CONFIGURED
    env_rank, env_world = _rank_from_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    fmt = f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    handler = None
    for h in root.handlers:
        if getattr(h, "_rae_scale", False):
            handler = h
    if handler is None:
        handler = _StderrHandler()
        handler._rae_scale = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(RedactingFormatter(fmt, datefmt="%H:%M:%S"))
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    # Chatty libraries stay at WARNING unless asked.
    for noisy in ("urllib3", "botocore", "s3fs", "fsspec", "filelock", "PIL", "matplotlib", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _CONFIGURED = True


def progress_enabled(rank: int | None = None) -> bool:
    """Progress bars only on rank 0 and only when stderr is a terminal (or RAE_SCALE_PROGRESS=1)."""
    if rank is None:
        rank = _rank_from_env()[0]
    forced = os.environ.get("RAE_SCALE_PROGRESS")
    if forced is not None:
        return forced == "1" and rank == 0
    return rank == 0 and sys.stderr.isatty()


def progress(iterable=None, *, total=None, desc=None, rank: int | None = None, **kw):
    """tqdm that switches itself off where it would only clutter logs."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not progress_enabled(rank), dynamic_ncols=True, **kw)
