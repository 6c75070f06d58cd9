"""Preemption: signals to a real subprocess set the flag; the exit timer hard-exits with 75."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rae_scale.checkpoint import EXIT_CODE_PREEMPTED, PreemptionHandler

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOOP = textwrap.dedent("""
    import sys, time
    from rae_scale.checkpoint import EXIT_CODE_PREEMPTED, PreemptionHandler
    handler = PreemptionHandler(signals=("SIGTERM", "SIGUSR2"))
    print("ready", flush=True)
    step = 0
    while not handler.should_stop():   # a step boundary
        time.sleep(0.01)
        step += 1
    print("stopped on", handler.received.name, flush=True)
    sys.exit(EXIT_CODE_PREEMPTED)
""")


def _spawn(code):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_to_subprocess_sets_flag_and_exits_75(sig):
    proc = _spawn(LOOP)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_CODE_PREEMPTED == 75, err
    assert f"stopped on {sig.name}" in out


def test_exit_timer_forces_exit_when_save_hangs():
    code = textwrap.dedent("""
        import time
        from rae_scale.checkpoint import start_exit_timer
        start_exit_timer(0.5)
        print("saving", flush=True)
        time.sleep(60)  # a hung final save
    """)
    start = time.monotonic()
    proc = _spawn(code)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "saving" in out
    assert time.monotonic() - start < 30


def test_handler_flag_and_restore():
    prev = signal.getsignal(signal.SIGUSR2)
    with PreemptionHandler(signals=["USR2"]) as h:
        assert h.received is None and not h.should_stop()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert h.should_stop() and h.received == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) == prev


def test_bad_signal_names():
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        PreemptionHandler(signals=("SIGNOPE",))
    with pytest.raises(ValueError, match="SIGKILL"):
        PreemptionHandler(signals=("SIGKILL",))
