"""Preemption: signals set a flag, ranks agree at a step boundary, a watchdog bounds the exit.

The handler only sets a flag (no exit in the middle of a collective). At the next step boundary
should_stop() all-reduces it (MAX) so every rank stops at the same step even if the signal reached
one node only; the loop then saves, waits and exits with EXIT_CODE_PREEMPTED, which launchers turn
into a requeue. start_exit_timer() hard-exits with the same code if that final save hangs.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Iterable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_CODE_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
EXIT_CODE_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
SECOND_INTERRUPT_AFTER_S = 1.0  # a SIGINT this long after the first one is a second Ctrl-C


def _to_signal(sig: str | int | signal.Signals) -> signal.Signals:
    if isinstance(sig, signal.Signals):
        return sig
    if isinstance(sig, int):
        return signal.Signals(sig)
    name = str(sig).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        allowed = ", ".join(sorted(s.name for s in signal.Signals))
        raise ValueError(f"unknown signal {sig!r}; allowed: {allowed}") from None


class PreemptionHandler:
    """Install flag-setting handlers for `signals` (names like "SIGTERM", "USR2", or numbers).

    Must be constructed on the main thread. uninstall() (or leaving the `with` block) restores the
    previous handlers. process_group/device choose where should_stop() all-reduces; by default the
    default group, on CUDA when its backend is NCCL.
    """

    def __init__(self, signals: Iterable[str | int] = ("SIGTERM", "SIGUSR2"),
                 process_group: dist.ProcessGroup | None = None, device: torch.device | str | None = None):
        self.signals = list(dict.fromkeys(_to_signal(s) for s in signals))  # each once
        if threading.current_thread() is not threading.main_thread():
            # Python delivers signals to the main thread only (Ray Train runs the loop in a worker
            # thread): no handler then; should_stop() still learns of the other ranks' signals.
            logger.warning("not on the main thread: %s will not be caught here; the launcher's own "
                           "fault handling applies", ", ".join(s.name for s in self.signals))
            self.signals = []
        if not self.signals and threading.current_thread() is threading.main_thread():
            raise ValueError("PreemptionHandler needs at least one signal")
        if signal.SIGKILL in self.signals or signal.SIGSTOP in self.signals:
            raise ValueError("SIGKILL and SIGSTOP cannot be handled")
        self.process_group = process_group
        self.device = torch.device(device) if device is not None else None
        self._flag = False
        self._first_interrupt = 0.0
        self.received: signal.Signals | None = None
        self._previous = {}
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # async-signal context: set state only; logging happens in should_stop()
        now = time.monotonic()
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            # A second Ctrl-C: the user does not want to wait for the save. One key press reaches a
            # rank several times within milliseconds (the terminal's process group, then each
            # launcher forwarding it): those count once.
            if now - self._first_interrupt > SECOND_INTERRUPT_AFTER_S:
                os.write(2, b"\nsecond interrupt: exiting without saving\n")
                os._exit(EXIT_CODE_INTERRUPTED)
            return
        self._flag = True
        if signum == signal.SIGINT:
            self._first_interrupt = now
        if self.received != signal.SIGINT:  # an interrupt decides the exit code once seen
            self.received = signal.Signals(signum)

    @property
    def exit_code(self) -> int:
        """What a stopped run exits with: 130 after Ctrl-C (SIGINT) on any rank, else 75 (requeue)."""
        return EXIT_CODE_INTERRUPTED if getattr(self, "_interrupted", False) else EXIT_CODE_PREEMPTED

    def _reduce_device(self) -> torch.device:
        if self.device is not None:
            return self.device
        backend = str(dist.get_backend(self.process_group)).lower()
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def should_stop(self) -> bool:
        """True on every rank if any rank received a signal. Call at a step boundary on all ranks.

        The ranks also agree on why: when any of them got SIGINT, every one reports exit_code 130.
        """
        signalled, interrupted = self.local_vote()
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([signalled, interrupted], dtype=torch.int32, device=self._reduce_device())
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
            signalled, interrupted = (int(v) for v in t.tolist())
        return self.decide(signalled, interrupted)

    def local_vote(self) -> tuple[int, int]:
        """This rank's vote: (1 if it received a signal, 1 if that was SIGINT). Summed over the ranks
        (in should_stop or inside a caller's own all-reduce), the counts go to decide()."""
        return int(self._flag), int(self._flag and self.received == signal.SIGINT)

    def decide(self, signalled: int, interrupted: int) -> bool:
        """Whether to stop, from the ranks' summed votes: any signal stops every rank; any SIGINT makes
        the exit code 130."""
        flag = signalled > 0
        self._interrupted = interrupted > 0
        if flag:
            logger.warning("preemption requested (%s on this rank): stopping at this step",
                           self.received.name if self.received else "signal on another rank")
        return flag

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.uninstall()


def start_exit_timer(seconds: float, exit_code: int = EXIT_CODE_PREEMPTED) -> threading.Timer:
    """Hard-exit the process with exit_code after `seconds` unless the returned timer is cancelled.

    Start it right before the final save: a hung collective or storage write then still ends the
    job with the requeue code instead of waiting for the scheduler's SIGKILL.
    """
    if seconds <= 0:
        raise ValueError(f"exit timer needs seconds > 0, got {seconds}")

    def _fire():
        logger.error("final checkpoint did not finish within %.0f s: exiting with code %d",
                     seconds, exit_code)
        for h in logging.getLogger().handlers:
            try:
                h.flush()
            except Exception:
                pass
        os._exit(exit_code)  # no cleanup: a hung thread would block a normal exit

    timer = threading.Timer(seconds, _fire)
    timer.daemon = True
    timer.start()
    return timer
