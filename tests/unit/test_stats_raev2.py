"""RAEv2's latent statistics (raev2_method.md 1.5) from the stats job: the multi-layer DINOv3 latents of
plain images, per-(C,H,W) mean and population variance against a float64 numpy computation, and the
stats.pt that RAEv2 reads ({'mean', 'var'}, float32 plain tensors) written beside our file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from data_pipeline.images import make_digits_folder
from data_pipeline.prepare import run_prepare
from data_pipeline.stats import run_stats
from data_pipeline.tiny import encoder_factory
from rae_scale import config as C
from rae_scale.data.latents import load_stats
from rae_scale.data.loader import decode_image_sample
from rae_scale.data.mds import read_index, shard_samples
from rae_scale.models.rae import LATENT_EPS, normalize_latent

DIR = FIXTURES / "raev2" / "dinov3_mls_tiny"
BATCH = 8

pytestmark = pytest.mark.skipif(not DIR.exists(), reason=f"fixture {DIR} missing")


def _encoder_cfg() -> C.EncoderConfig:
    io = torch.load(DIR / "io.pt", weights_only=False)
    hf = json.loads((DIR / "hf" / "config.json").read_text())
    return C.EncoderConfig(kind="dinov3", pretrained=str(DIR / "hf"), layers=list(io["layers"]),
                           hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                           num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                           patch_size=hf["patch_size"], input_size=int(io["resolution"]))


def _reference_latents(shards: str, factory) -> np.ndarray:
    """The latents the job sees (same batches, same thread count), encoded here without the job."""
    enc = factory()
    out = []
    for shard in read_index(shards):
        images = torch.stack([decode_image_sample(s, sid)[0] for sid, s in shard_samples(shards, shard)])
        for chunk in images.split(BATCH):
            with torch.no_grad():
                out.append(enc(chunk.float() / 255.0).numpy())
    return np.concatenate(out).astype(np.float64)


def test_stats_job_gives_raev2_statistics_and_stats_pt(tmp_path):
    enc_cfg = _encoder_cfg()
    make_digits_folder(tmp_path / "src", size=enc_cfg.input_size, per_class=8)
    shards = str(tmp_path / "mds")
    run_prepare(input=str(tmp_path / "src"), output=shards, resolution=enc_cfg.input_size, num_workers=0,
                shard_size_bytes=1 << 16)
    assert len(read_index(shards)) > 1  # several shards: the merge across shards is exercised
    factory = encoder_factory(enc_cfg)
    out = str(tmp_path / "stats.safetensors")
    res = run_stats(input=shards, kind="images", encoder_factory=factory, num_workers=0, output_path=out,
                    batch_size=BATCH)

    z = _reference_latents(shards, factory)  # after the job: it ran in-process with its thread setting
    grid = enc_cfg.input_size // enc_cfg.patch_size
    assert z.shape[1:] == (enc_cfg.hidden_size, grid, grid) and res["count"] == len(z) == 80
    assert np.abs(res["mean"].numpy() - z.mean(0)).max() < 1e-10
    assert np.abs(res["var"].numpy() - z.var(0)).max() < 1e-10  # population variance (ddof 0)
    assert res["mean"].dtype == res["var"].dtype == torch.float64

    mean, var = load_stats(out)  # our file round-trips exactly
    assert torch.equal(mean, res["mean"]) and torch.equal(var, res["var"])
    up = torch.load(tmp_path / "stats.pt", weights_only=True)  # RAEv2's format, beside it
    assert isinstance(up, dict) and set(up) == {"mean", "var"}
    for key in ("mean", "var"):
        t = up[key]
        assert type(t) is torch.Tensor and t.dtype == torch.float32 and t.is_contiguous()
        assert t.untyped_storage().nbytes() == t.numel() * 4  # a plain tensor, not a view of more data
        assert torch.equal(t, res[key].float())
    assert [torch.equal(a, b) for a, b in zip(load_stats(str(tmp_path / "stats.pt")), (up["mean"], up["var"]))] \
        == [True, True]
    # RAEv2's normalisation with these statistics, against float64 numpy
    zn = normalize_latent(torch.from_numpy(z[:4]).float(), up["mean"], up["var"])
    ref = (z[:4] - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)
    assert LATENT_EPS == 1e-5 and np.abs(zn.numpy() - ref).max() < 1e-4
