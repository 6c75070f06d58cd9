"""Processes that end with their parent: launched ranks must never train on as orphans.

A module of its own, free of torch, so that launchers can use it without paying for the import.
"""
from __future__ import annotations

import signal
import sys


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG).

    Used as the preexec_fn of launched ranks: after `kill -9` of the launcher they get SIGTERM,
    which the loops treat as preemption (save, exit), instead of training on as orphans. A no-op
    where prctl is unavailable.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
