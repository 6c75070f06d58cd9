"""A 2-rank training run whose run folder is on S3 (moto's server on loopback): checkpoints, metrics and
the resolved config go to the bucket, a SIGTERM-preempted run resumes from it exactly."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from train_cli import STAGE2_5_STEPS, data_overrides, reference_run, run_train, step_metric, train_cmd, train_env  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from test_checkpoint_s3 import BUCKET, S3  # noqa: E402

STEPS = ["training.max_steps=5", "checkpoint.every_steps=2", "parallel.strategy=ddp"]


@pytest.fixture
def s3_env(monkeypatch):
    server = S3()
    # credentials from the environment (as on a cluster), the endpoint as a storage option
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield server
    server.stop()


def _s3_metrics(server, key: str) -> dict[int, float]:
    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
    body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    from rae_scale.train.metrics import parse_metrics_line

    return {r["step"]: r["loss"] for r in map(parse_metrics_line, body.splitlines()) if r is not None}


def test_two_rank_run_on_s3_preempted_and_resumed(tiny_data, s3_env, tmp_path):
    import signal
    import subprocess
    import time

    from rae_scale.checkpoint import CheckpointManager

    url = f"s3://{BUCKET}/runs/s3run"
    overrides = data_overrides(tiny_data) + STEPS + [
        f"run.dir={url}", f"run.storage_options.client_kwargs.endpoint_url={s3_env.endpoint}"]
    # preempt after step 2 is logged (metrics.jsonl is rewritten on the bucket at every log)
    proc = subprocess.Popen(train_cmd("stage2", overrides, nproc=2), cwd=Path(__file__).resolve().parents[2],
                            env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = boto3.client("s3", endpoint_url=s3_env.endpoint, region_name="us-east-1")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            body = client.get_object(Bucket=BUCKET, Key="runs/s3run/metrics.jsonl")["Body"].read().decode()
            if any(json.loads(x)["step"] >= 2 for x in body.splitlines() if x.strip()):
                proc.send_signal(signal.SIGTERM)
                break
        except client.exceptions.NoSuchKey:
            pass
        time.sleep(0.2)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-4000:]
    manager = CheckpointManager(url, async_save=False, rank=0, storage_options=s3_env.options)
    saved = manager.committed_steps()
    assert saved and 2 <= saved[-1] < 5, saved
    assert run_train("stage2", overrides, nproc=2) == 0
    assert manager.committed_steps()[-1] == 5

    # the session's shared uninterrupted 2-rank run on local disk (saving only at its end)
    local = reference_run(tiny_data, "stage2", STAGE2_5_STEPS, nproc=2)
    assert _s3_metrics(s3_env, "runs/s3run/metrics.jsonl") == step_metric(local)
