"""The run folder's lease (one training per folder) and Ctrl-C as a saving stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rae_scale.checkpoint.lease import LEASE_FILE, RunFolderBusyError, RunLease
from rae_scale.train.run_folder import architecture_mismatch


def test_second_holder_is_refused_with_the_holders_identity(tmp_path):
    first = RunLease(str(tmp_path), timeout_s=60, settle_s=0.0)
    first.acquire()
    lease = json.loads((tmp_path / LEASE_FILE).read_text())
    assert lease["pid"] == os.getpid() and lease["token"] == first.token
    second = RunLease(str(tmp_path), timeout_s=60, settle_s=0.0)
    with pytest.raises(RunFolderBusyError, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    second.acquire()  # free again
    second.release()


def test_stale_and_dead_holders_are_taken_over(tmp_path):
    # a lease whose heartbeat is older than the timeout (another host: no pid check possible)
    (tmp_path / LEASE_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x", "started": 0,
                                                   "heartbeat": time.time() - 100}))
    lease = RunLease(str(tmp_path), timeout_s=30, settle_s=0.0)
    lease.acquire()
    lease.release()
    # a fresh heartbeat on another host is respected
    (tmp_path / LEASE_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x", "started": 0,
                                                   "heartbeat": time.time()}))
    with pytest.raises(RunFolderBusyError, match="'elsewhere'"):
        RunLease(str(tmp_path), timeout_s=30, settle_s=0.0).acquire()
    # a holder that missed two heartbeats (a node that died; its job requeued elsewhere): waited for
    (tmp_path / LEASE_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "x", "started": 0,
                                                   "heartbeat": time.time() - 1.8}))
    lease, t0 = RunLease(str(tmp_path), timeout_s=3, settle_s=0.0), time.monotonic()
    lease.acquire()
    assert time.monotonic() - t0 >= 1.0, "the dying holder's lease was not waited for"
    lease.release()
    # this host, a process that is gone (kill -9): taken over at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / LEASE_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                   "token": "y", "started": 0, "heartbeat": time.time()}))
    lease = RunLease(str(tmp_path), timeout_s=30, settle_s=0.0)
    lease.acquire()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == lease.token
    lease.release()


def test_heartbeat_keeps_the_lease_fresh(tmp_path):
    lease = RunLease(str(tmp_path), timeout_s=5.0, settle_s=0.0)  # beats every 1.25 s
    lease.acquire()
    first = json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"]
    time.sleep(2.0)
    assert json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"] > first
    lease.release()


def test_lease_on_object_storage(tmp_path):
    from integration.s3_server import make_bucket, start_s3

    with start_s3() as endpoint:
        url = make_bucket(endpoint, "leases") + "/run"
        options = {"client_kwargs": {"endpoint_url": endpoint}}
        first = RunLease(url, timeout_s=60, storage_options=options, settle_s=0.0)
        first.acquire()
        with pytest.raises(RunFolderBusyError, match="in use by another training"):
            RunLease(url, timeout_s=60, storage_options=options, settle_s=0.0).acquire()
        first.release()
        again = RunLease(url, timeout_s=60, storage_options=options, settle_s=0.0)
        again.acquire()
        again.release()


def test_architecture_mismatch_names_the_keys():
    saved = {"dit": {"use_pos_embed": True, "depth": [2, 1], "label_embed_std": 0.02, "checkpoint": "a.pt"},
             "optimizer": {"lr": 1e-3}}
    now = {"dit": {"use_pos_embed": False, "depth": [2, 1], "label_embed_std": 1.0, "checkpoint": None},
           "optimizer": {"lr": 5e-4}}
    diff = architecture_mismatch("stage2", now, saved)
    assert len(diff) == 1 and diff[0].startswith("dit.use_pos_embed: True in the checkpoint, False now")
    assert architecture_mismatch("stage2", saved, saved) == []
    # a key added to the schema after the checkpoint was saved (dit.repa_depth): absent there = its default
    assert architecture_mismatch("stage2", {"dit": {**saved["dit"], "repa_depth": None}}, saved) == []
    diff = architecture_mismatch("stage2", {"dit": {**saved["dit"], "repa_depth": 1}}, saved)
    assert diff == ["dit.repa_depth: None in the checkpoint, 1 now"]


_INTERRUPT = textwrap.dedent("""
    import os, signal, sys, time
    from rae_scale.checkpoint.preemption import PreemptionHandler
    h = PreemptionHandler(signals=("SIGTERM", "SIGINT"))
    os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice first: the requeue code...
    assert h.should_stop() and h.exit_code == 75, h.exit_code
    os.kill(os.getpid(), signal.SIGINT)  # ...until Ctrl-C says the user stops it
    os.kill(os.getpid(), signal.SIGINT)  # the same key press arriving twice: counts once
    assert h.should_stop() and h.exit_code == 130, h.exit_code
    print("saving", flush=True)
    if sys.argv[1] == "twice":
        time.sleep(1.2)
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: out at once
        time.sleep(30)
        print('still here', flush=True)
    sys.exit(h.exit_code)
""")


def test_ctrl_c_stops_with_a_save_and_a_second_one_at_once():
    for presses in ("once", "twice"):
        proc = subprocess.run([sys.executable, "-c", _INTERRUPT, presses], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 130, proc.stderr
        assert "saving" in proc.stdout
    # the second press ended the process at once, not after its 30 s sleep
    assert "second interrupt: exiting without saving" in proc.stderr and "still here" not in proc.stdout
