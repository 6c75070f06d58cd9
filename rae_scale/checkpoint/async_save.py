"""One background writer thread with at most one job in flight and errors that are never lost."""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed after all its retries; raised at the next save() or wait()."""


class BackgroundWriter:
    """Runs jobs one at a time on a fresh thread; submit() first waits for the previous job.

    nice: on Linux the writer thread lowers its own CPU priority by this much, so on a busy host
    the training threads win the CPU and the write soaks up what is left (None: unchanged).

    An exception in a job is kept and re-raised (wrapped in CheckpointSaveError) by the next
    submit() or wait(), so a failed save is never dropped silently. The thread is not a daemon:
    interpreter exit waits for the last write instead of truncating it.
    """

    def __init__(self, name: str = "checkpoint-writer", nice: int | None = None):
        self._name = name
        self._nice = nice
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what: str = ""
        self.last_duration_s: float | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the job in flight is done; raise its error, if any (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointSaveError(f"{self._what} failed: {err!r}") from err

    def submit(self, job: Callable[[], None], what: str) -> None:
        """Start job in the background after the previous one finished (raising its error)."""
        self.wait()
        self._what = what

        def _run():
            if self._nice and hasattr(os, "setpriority"):
                try:  # per-thread on Linux: PRIO_PROCESS with the thread id
                    tid = threading.get_native_id()
                    os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self._nice)
                except OSError:
                    pass
            start = time.perf_counter()
            try:
                job()
            except BaseException as exc:  # kept for the main thread; logged now so it shows early
                logger.error("%s failed in the background: %r", what, exc)
                self._error = exc
            finally:
                self.last_duration_s = time.perf_counter() - start

        self._thread = threading.Thread(target=_run, name=self._name, daemon=False)
        self._thread.start()
