"""Detecting an existing distributed environment, and spawning local ranks when there is none."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

from rae_scale.lifetime import die_with_parent

log = logging.getLogger(__name__)


def inside_distributed_env() -> bool:
    """True under torchrun, a multi-task Slurm step, or a Ray Train worker (they set the rank)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(nproc: int, module_argv: list[str], grace_s: float = 30.0) -> int:
    """Run `python <module_argv>` as nproc local ranks on 127.0.0.1 and wait for them.

    Unlike torchrun's agent this keeps the ranks' own exit code (the preemption code must reach
    the caller), forwards SIGTERM/SIGINT/SIGUSR1/SIGUSR2 to every rank, and stops the others
    when one rank fails.
    """
    port = _free_port()
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                   GROUP_RANK="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads))
        procs.append(subprocess.Popen([sys.executable, *module_argv], env=env, preexec_fn=die_with_parent))
    from rae_scale.config import redact

    log.info("spawned %d local ranks (master 127.0.0.1:%d): %s", nproc, port, " ".join(redact(module_argv)))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        codes: dict[int, int] = {}
        failed_at = None
        while len(codes) < nproc:
            for rank, p in enumerate(procs):
                if rank not in codes and p.poll() is not None:
                    codes[rank] = p.returncode
                    if p.returncode != 0 and failed_at is None:
                        failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    nonzero = [c for c in codes.values() if c != 0]
    if not nonzero:
        return 0
    # A preemption exit (75) on every failing rank is a preemption; anything else is the failure.
    other = [c for c in nonzero if c != 75]
    return other[0] if other else 75
