"""One training per run folder: a lease file with the holder's identity and a heartbeat.

Two trainings writing into one run folder interleave checkpoints and metrics, and retention in one
deletes the other's saves. The lease is a small JSON file ``<run>/LEASE.json`` (host, pid, a random
token, start time, last heartbeat) that works on any fsspec URL, object storage included:

* acquire: read it; held by someone else whose heartbeat is fresh -> refuse with their identity
  (one that missed two beats is waited for until it expires: a requeue after a node failure);
  absent, ours, stale (no heartbeat for ``timeout_s``), or held by a dead process on this very host
  -> write ours, wait a moment and read it back: a racing writer that wrote last wins, the other
  refuses (object stores offer no portable create-if-absent, read-after-write settles it);
* a daemon thread rewrites the heartbeat every ``timeout_s / 4`` seconds;
* release deletes the file if it is still ours (clean exits and preemption exits).

After ``kill -9`` the file stays behind: on the same host the dead pid is noticed at once, on
another host the lease is taken over once its heartbeat is ``timeout_s`` old.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from rae_scale.storage import join, normalize

from .storage import Storage

logger = logging.getLogger(__name__)

LEASE_FILE = "LEASE.json"


class RunFolderBusyError(RuntimeError):
    """Another live training holds the run folder's lease."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLease:
    """The lease on one run folder (see the module docstring). Use on one rank only."""

    def __init__(self, run_url: str, *, timeout_s: float = 120.0, storage_options: dict[str, Any] | None = None,
                 settle_s: float = 0.2):
        if timeout_s <= 0:
            raise ValueError(f"lease timeout must be > 0 seconds, got {timeout_s}")
        self.run_url = normalize(run_url)
        self.url = join(self.run_url, LEASE_FILE)
        self.timeout_s = float(timeout_s)
        self.settle_s = float(settle_s)
        self.storage = Storage(self.run_url, storage_options)
        self.token = uuid.uuid4().hex
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                         "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # ------------------------------------------------------------------ reading
    def holder(self) -> dict[str, Any] | None:
        """The current lease contents, or None when there is none (or it is unreadable)."""
        self.storage.invalidate()
        try:
            return json.loads(self.storage.read_bytes(self.url))
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as exc:  # a torn write: treat as absent, ours overwrites it
            logger.warning("lease file %s is unreadable (%r); taking it over", self.url, exc)
            return None

    def _is_stale(self, lease: dict[str, Any]) -> tuple[bool, str]:
        age = time.time() - float(lease.get("heartbeat", 0.0))
        if age > self.timeout_s:
            return True, f"its last heartbeat is {age:.0f} s old (timeout {self.timeout_s:.0f} s)"
        if lease.get("host") == self.identity["host"] and not _pid_alive(int(lease.get("pid", -1))):
            return True, f"process {lease.get('pid')} on this host is gone"
        return False, f"last heartbeat {age:.0f} s ago"

    @staticmethod
    def describe(lease: dict[str, Any]) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
        return f"host {lease.get('host')!r}, pid {lease.get('pid')}, started {started}"

    # ------------------------------------------------------------------ acquire / release
    def _write(self) -> None:
        body = {**self.identity, "heartbeat": time.time()}
        self.storage.write_bytes(self.url, json.dumps(body, indent=1).encode())

    def acquire(self) -> None:
        """Take the lease or raise RunFolderBusyError naming the holder."""
        current = self.holder()
        if current is not None and current.get("token") != self.token:
            stale, why = self._is_stale(current)
            age = time.time() - float(current.get("heartbeat", 0.0))
            if not stale and age > self.timeout_s / 2:
                # it missed two beats: likely a holder that died hard (a requeued job on another
                # node after a node failure); wait for the timeout rather than fail the requeue
                logger.warning("the lease on %s (%s) missed its heartbeats; waiting up to %.0f s for it "
                               "to expire", self.run_url, self.describe(current), self.timeout_s - age)
                time.sleep(max(0.0, self.timeout_s - age) + 1.0)
                return self.acquire()
            if not stale:
                raise RunFolderBusyError(
                    f"run folder {self.run_url} is in use by another training ({self.describe(current)}, {why}); "
                    f"use another run.dir, stop that training, or wait: the lease is taken over once its "
                    f"heartbeat is {self.timeout_s:.0f} s old (checkpoint.lease_timeout_s)")
            logger.warning("taking over the lease on %s from %s: %s", self.run_url, self.describe(current), why)
        self._write()
        time.sleep(self.settle_s)
        after = self.holder()
        if after is None or after.get("token") != self.token:
            raise RunFolderBusyError(
                f"run folder {self.run_url} was claimed at the same moment by another training "
                f"({self.describe(after) if after else 'unknown'}); use another run.dir or stop that training")
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, name="rae_scale-lease", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        logger.debug("lease on %s acquired (%s)", self.run_url, self.describe(self.identity))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                current = self.holder()
                if current is not None and current.get("token") != self.token:
                    logger.error("the lease on %s was taken over by %s; this training keeps running but "
                                 "the two now share the folder", self.run_url, self.describe(current))
                    return
                self._write()
            except Exception as exc:  # storage hiccup: the next beat retries
                logger.warning("lease heartbeat on %s failed: %r", self.run_url, exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours. Idempotent."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        try:
            current = self.holder()
            if current is not None and current.get("token") == self.token:
                self.storage.rm(self.url)
        except Exception as exc:
            logger.warning("could not release the lease on %s: %r", self.run_url, exc)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
