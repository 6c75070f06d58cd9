"""Checkpoints on S3 (moto's server on loopback): round trip, resume, and an outage mid-save."""
from __future__ import annotations

import logging
import socket
import time

import pytest
import torch

pytestmark = pytest.mark.integration

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from rae_scale.checkpoint import (CheckpointManager, ModelOptimizerState, PerRank,  # noqa: E402
                                  consolidate, download_dir, upload_dir)
from conftest import Position as Pos  # noqa: E402

BUCKET = "rae-ckpt"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """A moto S3 server on 127.0.0.1 that can be stopped and started again on the same port
    (moto keeps the stored objects in-process, so they survive the restart)."""

    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        self.options = {"key": "testing", "secret": "testing",
                        "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def start(self):
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()


@pytest.fixture
def s3():
    server = S3()
    yield server
    server.stop()


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))




def test_s3_round_trip_resume_and_retention(s3, tmp_path):
    model = _model(0)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    mgr = CheckpointManager(f"s3://{BUCKET}/runs/a", keep_last=2, async_save=True,
                            storage_options=s3.options)
    for step in (10, 20, 30):
        mgr.save(step, {"train": ModelOptimizerState(model, opt), "pos": PerRank(Pos(step))},
                 metadata={"epoch": step // 10})
    mgr.wait()
    assert mgr.committed_steps() == [20, 30]
    step_dir = mgr.resolve_resume("auto")
    assert step_dir == f"s3://{BUCKET}/runs/a/checkpoints/step-00000030"

    model2 = _model(1)
    opt2 = torch.optim.Adam(model2.parameters())
    pos = Pos()
    meta = mgr.load(step_dir, {"train": ModelOptimizerState(model2, opt2), "pos": PerRank(pos)})
    assert meta["epoch"] == 3 and pos.pos == 30
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    full = consolidate(step_dir, storage_options=s3.options)
    assert torch.equal(full["train"]["model"]["0.weight"], model[0].weight)

    # DeepSpeed-style staging: a local tree up and back down
    local = tmp_path / "stage" / "global_step5"
    (local / "sub").mkdir(parents=True)
    (local / "a.pt").write_bytes(b"123")
    (local / "sub" / "b.pt").write_bytes(b"4567")
    upload_dir(tmp_path / "stage", f"s3://{BUCKET}/runs/a/ds/", storage_options=s3.options)
    back = download_dir(f"s3://{BUCKET}/runs/a/ds", tmp_path / "back", storage_options=s3.options)
    assert (tmp_path / "back" / "global_step5" / "sub" / "b.pt").read_bytes() == b"4567"
    assert back == str(tmp_path / "back")


def test_s3_outage_during_save_is_retried(s3, caplog):
    model = _model(0)
    # botocore retries on its own; turn that off so the outage reaches our retry loop
    options = dict(s3.options, config_kwargs={"retries": {"max_attempts": 1}})
    mgr = CheckpointManager(f"s3://{BUCKET}/runs/b", async_save=True, max_attempts=6,
                            retry_backoff_s=1.0, storage_options=options)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        s3.stop()  # the store goes away just as the save starts...
        mgr.save(1, {"m": ModelOptimizerState(model)})
        time.sleep(6)
        s3.start()  # ... and comes back while the writer is retrying
        mgr.wait()
    retried = [r for r in caplog.records if r.name.startswith("rae_scale") and "attempt" in r.getMessage()]
    assert retried, "the outage never reached the checkpoint writer"
    assert mgr.committed_steps() == [1]
    model2 = _model(5)
    mgr.load(mgr.resolve_resume("auto"), {"m": ModelOptimizerState(model2)})
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k])
