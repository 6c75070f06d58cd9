"""The README's main job in its reduced (CI) mode: every stage runs and the report is complete."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.integration
def test_quickstart_reduced(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, WANDB_MODE="offline", RAE_SCALE_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-m", "rae_scale.commands.cli", "quickstart", "--reduced", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = out / "report" / "report.md"
    assert report.exists()
    for png in ("samples_grid.png", "reconstructions.png", "loss_stage1.png", "loss_stage2.png", "prompt_grid.png",
                "loss_stage2_t2i.png"):
        assert (out / "report" / png).stat().st_size > 1000, png
    metrics = json.loads((out / "report" / "metrics.json").read_text())["metrics"]
    for key in ("fid", "sfid", "reconstruction_psnr"):
        assert metrics[key] == metrics[key] and abs(metrics[key]) < float("inf"), (key, metrics[key])
    acc = metrics["class_accuracy"]
    assert 0.0 <= acc["samples"] <= 1.0 and 0.0 <= acc["samples_unguided"] <= 1.0 and acc["cfg_scale"] > 1
    assert "CFG" in report.read_text() and "without guidance" in report.read_text()
    # text-to-image: one sample per (digit, colour) prompt, scored by classifiers that read real digits well
    t2i = metrics["text_to_image"]
    assert t2i["num_samples"] == 60 and 0.0 <= t2i["digit"] <= 1.0 and 0.0 <= t2i["colour"] <= 1.0
    assert t2i["digit_real_held_out"] > 0.9 and t2i["colour_real"] > 0.95, t2i
    with np.load(out / "eval_t2i" / "samples.npz") as f:
        assert f["arr_0"].shape == (60, 32, 32, 3) and sorted(set(f["arr_1"].tolist())) == list(range(10))
        assert all(f" {w} " in p for p, w in zip(f["prompts"].tolist(), ["zero"] * 6))
    with np.load(out / "eval" / "samples.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape[1:] == (32, 32, 3)
        assert sorted(set(f["arr_1"].tolist())) == list(range(10))
    # re-running skips every finished step
    again = subprocess.run([sys.executable, "-m", "rae_scale.commands.cli", "quickstart", "--reduced", "--out", str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "stage 2 training (done already, skipped)" in again.stderr
    assert "sampling + FID (done already, skipped)" in again.stderr
    assert "text-to-image stage 2 training (done already, skipped)" in again.stderr
    assert "text-to-image sampling (done already, skipped)" in again.stderr
