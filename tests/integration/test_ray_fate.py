"""The local Ray instance a command starts dies with it: `kill -9` of `rae-scale prepare` leaves no
Ray process behind (the raylet's agents used to live on as orphans)."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from PIL import Image

pytestmark = [pytest.mark.integration]


def test_kill_9_of_prepare_leaves_no_ray_process(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("n01", "n02"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(100):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
    proc = subprocess.Popen([sys.executable, "-m", "rae_scale.commands.cli", "prepare", "--input", str(tmp_path / "images"),
                             "--output", str(tmp_path / "shards"), "--resolution", "32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = psutil.Process(proc.pid)
    started: dict[int, psutil.Process] = {}
    deadline = time.time() + 180
    try:
        # wait until the raylet has started its agents (the processes that used to survive)
        while time.time() < deadline and proc.poll() is None:
            for child in driver.children(recursive=True):
                started.setdefault(child.pid, child)
            names = " ".join(p.name() + " ".join(p.cmdline()) for p in started.values() if p.is_running())
            if "DashboardAgent" in names or "runtime_env" in names or "RuntimeEnvAgent" in names:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "prepare ended before its Ray instance was up; give it more images"
        time.sleep(1.5)  # the watchdog notes descendants four times a second
        for child in driver.children(recursive=True):
            started.setdefault(child.pid, child)
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(list(started.values()), timeout=60)
        assert not alive, f"left running after kill -9 of prepare: {[p.name() for p in alive]}"
    finally:
        for p in started.values():
            try:
                p.kill()
            except psutil.Error:
                pass
