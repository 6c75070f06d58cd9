"""Ends a private local Ray instance when the process that started it dies without shutting it down.

`ray.init()` starts the GCS and the raylet as children of the driver, and Ray's own fate sharing stops
those after `kill -9` of the driver, but the raylet's agents (dashboard agent, runtime-env agent)
outlive it as orphans. This watchdog runs beside the driver (`python -m data_pipeline.ray_reaper PID`,
its own session, so a signal to the driver's process group leaves it alone): four times a second it
notes the driver's descendants; once the driver is gone it terminates the noted processes that still run, and
their own children (an agent the raylet started after the last look is still the raylet's child
when the driver dies), then kills what ignored that. `ray_session` stops the watchdog after a normal
`ray.shutdown()`.
"""
from __future__ import annotations

import os
import sys
import time


def _snapshot(driver) -> dict[int, float]:
    """{pid: create_time} of the driver's descendants (create_time guards against reused pids)."""
    import psutil

    seen = {}
    for proc in driver.children(recursive=True):
        if proc.pid == os.getpid():  # the driver started this watchdog too
            continue
        try:
            seen[proc.pid] = proc.create_time()
        except psutil.Error:
            continue
    return seen


def reap(driver_pid: int, interval_s: float = 0.25, grace_s: float = 5.0) -> int:
    """Watch driver_pid; after it dies, end the processes it had started. Returns how many were ended."""
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, float] = {}
    print("watching", flush=True)  # the driver waits for this before it starts Ray
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            seen.update(_snapshot(driver))
        except psutil.NoSuchProcess:
            break
        time.sleep(interval_s)
    left = []
    for pid, created in seen.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 1e-3:
                left.append(proc)
        except psutil.Error:
            continue
    for proc in list(left):  # what the survivors started since the last look (before any is stopped)
        try:
            left.extend(child for child in proc.children(recursive=True) if child.pid not in seen)
        except psutil.Error:
            continue
    left = list({proc.pid: proc for proc in left}.values())
    for proc in left:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(left)


if __name__ == "__main__":
    reap(int(sys.argv[1]))
