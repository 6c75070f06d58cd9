"""Online evaluation through the real loops: stage 2's FID on 2 ranks equals a single-process
evaluation of the saved EMA weights, the best checkpoint is pinned; stage 1 logs rFID/PSNR/SSIM."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from train_cli import data_overrides, run_train

pytestmark = [pytest.mark.slow]

EVAL = ["eval.every_steps=2", "eval.num_samples=12", "checkpoint.every_steps=1000", "checkpoint.keep_last=1"]


@pytest.fixture(scope="module")
def reference_npz(tiny_data, tmp_path_factory) -> Path:
    """40 real digits (uint8 NHWC) from the tiny shards: a small FID reference."""
    from rae_scale.eval.reference import iter_mds_images

    images = next(iter(iter_mds_images(tiny_data / "shards", batch_size=40)))
    path = tmp_path_factory.mktemp("ref") / "digits40.npz"
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy())
    return path


@pytest.fixture(scope="module")
def decoder_file(tiny_data, tmp_path_factory) -> Path:
    """A fixed (seeded) decoder for decoding samples: the tiny stage-2 config's own is random per build."""
    import torch
    from safetensors.torch import save_file

    from rae_scale import config as C
    from rae_scale.builders import build_rae

    cfg = C.load_config(C.Stage2Job, Path(__file__).resolve().parents[2] / "configs/stage2/tiny_cpu.yaml",
                        data_overrides(tiny_data))
    torch.manual_seed(0)
    rae = build_rae(cfg.rae, load_decoder_weights=False, load_stats=False)
    path = tmp_path_factory.mktemp("decoder") / "decoder.safetensors"
    save_file({k: v.contiguous() for k, v in rae.decoder.state_dict().items()}, str(path))
    return path


def _pinned(run_dir: Path) -> list[int]:
    from rae_scale.checkpoint import CheckpointManager

    return CheckpointManager(str(run_dir), async_save=False, rank=0).pinned_steps()


def test_stage2_online_fid_matches_offline_evaluation_and_pins_best(tiny_data, reference_npz, decoder_file, tmp_path):
    import torch

    from rae_scale import config as C
    from rae_scale.eval.features import evaluate_generator
    from rae_scale.commands.generate import load_rae_for_decoding, load_stage2
    from rae_scale.diffusion.sample_fn import make_sample_fn

    run = tmp_path / "run"
    overrides = data_overrides(tiny_data) + EVAL + [f"run.dir={run}", "training.max_steps=4", "sampler.num_steps=4",
                                                   f"eval.reference={reference_npz}",
                                                   f"rae.decoder_checkpoint={decoder_file}"]
    assert run_train("stage2", overrides, nproc=2) == 0
    rows = [r for r in _rows(run) if "eval_fid" in r]
    assert [r["step"] for r in rows] == [2, 4] and all(math.isfinite(r["eval_fid"]) for r in rows)
    fid = {r["step"]: r["eval_fid"] for r in rows}
    best = min(fid, key=fid.get)
    assert _pinned(run) == [best]
    assert rows[-1]["eval_best_fid"] == fid[best]
    assert "loss" in rows[0]  # evaluation rows are regular metrics rows
    # the harness's finish drew FID against epochs beside metrics.jsonl, the CSV with the rows' numbers
    from rae_scale.train.fid_curve import FID_PLOT

    assert (run / FID_PLOT).read_bytes()[:4] == b"\x89PNG"
    curve = (run / "fid_vs_epochs.csv").read_text().splitlines()
    assert curve[0] == "step,epoch,fid,reached_k" and [line.split(",")[:3] for line in curve[1:]] == \
        [[str(r["step"]), repr(r["eval_epoch"]), repr(r["eval_fid"])] for r in rows]

    # independent: one process, the evaluate machinery on the EMA weights saved at step 4
    cfg = C.load_config(C.Stage2Job, Path(run / "config.yaml"))
    job = C.SampleJob(run=cfg.run, rae=cfg.rae, dit=cfg.dit, transport=cfg.transport, sampler=cfg.sampler,
                      guidance=cfg.guidance, checkpoint=str(run / "checkpoints" / "step-00000004"), seed=cfg.run.seed)
    model = load_stage2(job, torch.device("cpu"))
    rae = load_rae_for_decoding(job.rae, "cpu")
    offline = evaluate_generator(make_sample_fn(job, model, rae, "cpu"), num_samples=12, batch_size=5,
                                 num_classes=cfg.dit.num_classes, seed=cfg.run.seed, reference=str(reference_npz))
    assert abs(offline["fid"] - fid[4]) <= 1e-4 * fid[4], (offline["fid"], fid[4])

    # every evaluation row says how it sampled, in evaluate's vocabulary: the offline job's spec but for
    # the weights (the run at that step instead of a step folder)
    from rae_scale.eval.spec import sampling_spec

    spec = rows[-1]["sampling_spec"]
    assert spec["checkpoint"] == {"run": str(run), "step": 4, "weights": "ema"} and rows[0]["sampling_spec"]["checkpoint"]["step"] == 2
    offline_spec = sampling_spec(job)
    assert {k: v for k, v in spec.items() if k not in ("checkpoint", "samples", "reference")} == \
        {k: v for k, v in offline_spec.items() if k != "checkpoint"}
    assert spec["samples"] == {"num_samples": 12, "seed": cfg.run.seed, "label_sampling": "equal",
                               "num_classes": cfg.dit.num_classes} and spec["reference"] == str(reference_npz)


def test_stage1_online_recon_metrics(tiny_data, tmp_path):
    run = tmp_path / "run"
    overrides = data_overrides(tiny_data) + EVAL + [f"run.dir={run}", "training.max_steps=4"]
    assert run_train("stage1", overrides, nproc=2) == 0
    rows = [r for r in _rows(run) if "eval_rfid" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert math.isfinite(r["eval_rfid"]) and r["eval_rfid"] >= 0
        assert 0 < r["eval_psnr"] < 100 and -1 <= r["eval_ssim"] <= 1
    rfid = {r["step"]: r["eval_rfid"] for r in rows}
    assert _pinned(run) == [min(rfid, key=rfid.get)]


def _rows(run_dir: Path) -> list[dict]:
    from rae_scale.train.metrics import read_metrics

    return read_metrics(str(run_dir))
