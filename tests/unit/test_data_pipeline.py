"""prepare / cache-latents / stats run in-process (num_workers=0): bad inputs, resume, exact stats.

The Ray and S3 variants of the same jobs are in tests/integration/test_prepare_ray.py.
"""
from __future__ import annotations

import functools
import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_pipeline.cache_latents import run_cache_latents
from data_pipeline.images import load_digits, make_broken_folder, make_digits_folder
from data_pipeline.prepare import decode_rgb, run_prepare
from data_pipeline.stats import chan_merge, run_stats
from rae_scale.data import build_latent_loader, load_stats
from rae_scale.data.latents import latent_to_tensor, tensor_to_stored
from rae_scale.data.mds import read_index, shard_samples


class TinyConvEncoder(nn.Module):
    """Deterministic stand-in encoder: images [B,3,32,32] -> latents [B,4,4,4]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.1)
            self.conv.bias.copy_(torch.randn(4, generator=g))

    def forward(self, x):
        return self.conv(x)


def tiny_encoder_factory():
    return TinyConvEncoder()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    make_digits_folder(root / "src", size=40, per_class=8)
    return root


def test_bundled_digits_are_the_uci_test_set():
    """1797 images of 8x8 integer pixels in 0..16 and classes 0-9 with the set's known class sizes
    (the file's checksum is verified on every read)."""
    images, classes = load_digits()
    assert images.shape == (1797, 8, 8) and classes.shape == (1797,)
    assert np.array_equal(images, np.round(images)) and images.min() == 0 and images.max() == 16
    assert np.bincount(classes).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_broken_inputs_are_converted_or_skipped_and_counted(tmp_path):
    expected = make_broken_folder(tmp_path / "bad")
    for fmt in ("mds", "wds"):
        m = run_prepare(input=str(tmp_path / "bad"), output=str(tmp_path / fmt), resolution=32, format=fmt,
                        num_workers=0)
        assert m["num_samples"] == expected["samples"]
        assert m["skipped_counts"] == expected["skipped"]
        assert m["converted_counts"] == expected["converted"]
        assert m["counts_per_class"] == {"n00000000": 3, "n00000001": 5}
    from rae_scale.data import build_image_loader

    loader = build_image_loader(str(tmp_path / "mds"), batch_size=8, hflip=False)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and sorted(y.tolist()) == [0] * 3 + [1] * 5


def test_mode_conversions_match_pillow_references():
    from io import BytesIO

    from PIL import Image

    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, size=(8, 8)).astype(np.uint16)
    buf = BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    img, kind, reason = decode_rgb(buf.getvalue())
    assert (kind, reason) == ("16bit", None)
    assert np.array_equal(np.asarray(img)[..., 0], np.round(deep / 257.0).astype(np.uint8))
    rgba = rng.integers(0, 256, size=(4, 4, 4), dtype=np.uint8)
    buf = BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    img, kind, _ = decode_rgb(buf.getvalue())
    a = rgba[..., 3:4] / 255.0
    expect = rgba[..., :3] * a + 255.0 * (1 - a)  # "over" a white background
    assert kind == "alpha" and np.abs(np.asarray(img, dtype=np.float64) - expect).max() <= 1.0


def test_resume_after_a_crash_ends_with_the_same_dataset(digits, tmp_path):
    full = run_prepare(input=str(digits / "src"), output=str(tmp_path / "a"), resolution=32, num_workers=0,
                       shard_size_bytes=1 << 16)
    out = tmp_path / "b"
    run_prepare(input=str(digits / "src"), output=str(out), resolution=32, num_workers=0, shard_size_bytes=1 << 16)
    # Simulate a crash: some parts never finished (no marker, half-written or missing files), no index.
    for name in ("part-00001", "part-00003"):
        os.remove(out / "_done" / f"{name}.json")
    (out / "part-00003" / "shard.00000.mds").write_bytes(b"garbage")
    for name in ("index.json", "manifest.json"):
        os.remove(out / name)
    resumed = run_prepare(input=str(digits / "src"), output=str(out), resolution=32, num_workers=0,
                          shard_size_bytes=1 << 16)
    assert resumed == full
    assert (out / "index.json").read_bytes() == (tmp_path / "a" / "index.json").read_bytes()
    with pytest.raises(ValueError, match="overwrite"):
        run_prepare(input=str(digits / "src"), output=str(out), resolution=48, num_workers=0)


def test_class_index_and_manifest_checksums(digits, tmp_path):
    import hashlib

    m = run_prepare(input=str(digits / "src"), output=str(tmp_path / "w"), resolution=32, format="wds",
                    num_workers=0)
    assert json.loads((tmp_path / "w" / "class_index.json").read_text()) == {f"n{i:08d}": i for i in range(10)}
    assert m["counts_per_class"] == {f"n{i:08d}": 8 for i in range(10)}
    for shard in m["shards"]:
        data = (tmp_path / "w" / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]


def test_flat_folder_with_labels_file(tmp_path):
    from PIL import Image

    (tmp_path / "flat").mkdir()
    lines = []
    for i in range(6):
        Image.fromarray(np.full((20, 30, 3), i * 40, dtype=np.uint8)).save(tmp_path / "flat" / f"{i}.png")
        lines.append(f"{i}.png,{i % 3}")
    (tmp_path / "labels.csv").write_text("\n".join(lines[:5]) + "\n")  # 5.png stays unlabeled
    m = run_prepare(input=str(tmp_path / "flat"), output=str(tmp_path / "o"), resolution=16,
                    labels_file=str(tmp_path / "labels.csv"), image_format="png", num_workers=0)
    assert m["counts_per_class"] == {"0": 2, "1": 2, "2": 1}
    assert m["skipped_counts"] == {"unlabeled": 1}


@pytest.fixture(scope="module")
def latent_cache(digits):
    run_prepare(input=str(digits / "src"), output=str(digits / "mds"), resolution=32, num_workers=0,
                shard_size_bytes=1 << 16)
    info = run_cache_latents(input=str(digits / "mds"), output=str(digits / "lat"),
                             encoder_factory=tiny_encoder_factory, batch_size=16, both_flips=True,
                             num_workers=0)
    return digits, info


def _direct_latents(root: Path):
    """Encode the image shards in one process, in float64-free fp32, for reference."""
    enc = TinyConvEncoder().eval()
    plain, flipped, labels = [], [], []
    from rae_scale.data.loader import decode_image_sample

    for shard in read_index(str(root / "mds")):
        for sid, sample in shard_samples(str(root / "mds"), shard):
            x, y, _ = decode_image_sample(sample, sid)
            x = x[None].float() / 255.0
            with torch.no_grad():
                plain.append(enc(x)[0])
                flipped.append(enc(x.flip(-1))[0])
            labels.append(y)
    return torch.stack(plain), torch.stack(flipped), labels


def test_cache_latents_matches_direct_encoding_and_loader_picks_variants(latent_cache):
    root, info = latent_cache
    # prepare writes a caption column (empty for a class-folder input): it rides along into the cache
    assert info == {"dtype": "fp32", "shape": [4, 4, 4], "both_flips": True, "captions": True, "num_samples": 80,
                    "source": str(root / "mds")}
    plain, flipped, labels = _direct_latents(root)
    cached = [s for sh in read_index(str(root / "lat")) for s in shard_samples(str(root / "lat"), sh)]
    got = torch.stack([torch.from_numpy(np.array(s["latent"])) for _, s in cached])
    got_f = torch.stack([torch.from_numpy(np.array(s["latent_flip"])) for _, s in cached])
    assert torch.allclose(got, plain, atol=1e-5) and torch.allclose(got_f, flipped, atol=1e-5)
    assert [s["label"] for _, s in cached] == labels
    assert [s["caption"] for _, s in cached] == [s["caption"] for sh in read_index(str(root / "mds"))
                                                  for _, s in shard_samples(str(root / "mds"), sh)]

    from rae_scale.config import ConfigError

    with pytest.raises(ConfigError, match=r"shape \[4, 4, 4\] but the config's latent is \[8, 4, 4\]"):
        build_latent_loader(str(root / "lat"), batch_size=8, latent_shape=(8, 4, 4))
    loader = build_latent_loader(str(root / "lat"), batch_size=8, seed=3, hflip=True, latent_shape=(4, 4, 4))
    seen = torch.cat([z for z, _ in loader])
    del loader
    gc.collect()
    assert seen.shape == (80, 4, 4, 4)
    is_plain = [any(torch.allclose(z, p, atol=1e-5) for p in plain) for z in seen]
    is_flip = [any(torch.allclose(z, f, atol=1e-5) for f in flipped) for z in seen]
    assert all(a or b for a, b in zip(is_plain, is_flip))
    assert 20 <= sum(is_flip) <= 60  # about half of the samples use the flipped variant
    # virtual epochs (training.virtual_epoch_steps): 3 batches an epoch, each a draw of distinct samples
    loader = build_latent_loader(str(root / "lat"), batch_size=8, seed=3, with_ids=True, batches_per_epoch=3)
    epochs = [[i for _, _, ids in loader for i in ids.tolist()] for _ in range(2)]
    del loader
    gc.collect()
    assert [len(e) for e in epochs] == [24, 24] and all(len(set(e)) == 24 for e in epochs) and epochs[0] != epochs[1]


@pytest.mark.parametrize("hflip", [True, False])
def test_reading_one_flip_variant_gives_the_same_batches(latent_cache, hflip):
    """The reader slices only the variant a sample needs (FlipVariant) from the mapped shard; the batches
    equal those made by reading both variants and picking after, over two epochs."""
    root, _ = latent_cache
    got = {}
    for select in (True, False):
        loader = build_latent_loader(str(root / "lat"), batch_size=8, seed=3, hflip=hflip, select_variant=select,
                                     with_ids=True)
        got[select] = [batch for _ in range(2) for batch in loader]
        assert (loader.source.dataset.select is not None) == select
        del loader
        gc.collect()
    assert len(got[True]) == 20
    for (z1, y1, i1), (z2, y2, i2) in zip(got[True], got[False]):
        assert torch.equal(z1, z2) and torch.equal(y1, y2) and torch.equal(i1, i2)


def test_bf16_latents_round_trip_bit_exactly():
    z = torch.randn(4, 3, 2)
    stored = tensor_to_stored(z, "bf16")
    assert stored.dtype == np.uint16
    assert torch.equal(latent_to_tensor(stored, "bf16"), z.to(torch.bfloat16).float())


def test_stats_equal_single_process_float64(latent_cache, tmp_path):
    root, _ = latent_cache
    out = str(tmp_path / "stats.safetensors")
    res = run_stats(input=str(root / "lat"), kind="latents", num_workers=0, output_path=out)
    cached = [s for sh in read_index(str(root / "lat")) for s in shard_samples(str(root / "lat"), sh)]
    x = np.stack([s[k].astype(np.float64) for _, s in cached for k in ("latent", "latent_flip")])
    assert res["count"] == 160
    np.testing.assert_allclose(res["mean"].numpy(), x.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res["var"].numpy(), x.var(0), rtol=1e-10)
    mean, var = load_stats(out)
    assert mean.dtype == torch.float64 and torch.equal(var, res["var"])
    up = torch.load(str(tmp_path / "stats.pt"), weights_only=True)
    assert set(up) == {"mean", "var"} and up["var"].dtype == torch.float32
    assert torch.allclose(up["var"].double(), res["var"], rtol=1e-6)
    # images kind: encode on the fly, plain images only
    res_img = run_stats(input=str(root / "mds"), kind="images", encoder_factory=tiny_encoder_factory,
                        num_workers=0)
    plain, _, _ = _direct_latents(root)
    np.testing.assert_allclose(res_img["var"].numpy(), plain.double().var(0, unbiased=False).numpy(), rtol=1e-5)


def test_chan_merge_is_exact_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 5))
    parts = [x[:137], x[137:600], x[600:]]
    total = (0, None, None)
    for p in parts:
        total = chan_merge(total, (len(p), p.mean(0), ((p - p.mean(0)) ** 2).sum(0)))
    np.testing.assert_allclose(total[1], x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(total[2] / total[0], x.var(0), rtol=1e-12)


def test_cache_latents_with_a_saved_dinov2_encoder(latent_cache, tmp_path):
    from rae_scale.models.encoders import build_encoder

    root, _ = latent_cache
    torch.manual_seed(0)
    enc = build_encoder("dinov2", hidden_size=32, num_layers=1, num_heads=2, patch_size=16, input_size=64)
    hf = type(enc.model)(enc.model.config)  # a plain HF model: our wrapper drops the final norm's affine
    hf.load_state_dict(enc.model.state_dict(), strict=False)
    hf.save_pretrained(tmp_path / "enc")
    factory = functools.partial(build_encoder, "dinov2", pretrained=str(tmp_path / "enc"), input_size=64)
    info = run_cache_latents(input=str(root / "mds"), output=str(tmp_path / "lat"), encoder_factory=factory,
                             batch_size=16, num_workers=0)
    assert info["shape"] == [32, 4, 4] and info["num_samples"] == 80
    shard = read_index(str(root / "mds"))[0]
    from rae_scale.data.loader import decode_image_sample

    sid, sample = next(iter(shard_samples(str(root / "mds"), shard)))
    x = decode_image_sample(sample, sid)[0][None].float() / 255.0
    tokens = enc(x)  # [1, 16, 32] from the in-memory encoder
    expect = tokens.transpose(1, 2).reshape(1, 32, 4, 4)[0]
    cached = next(iter(shard_samples(str(tmp_path / "lat"), read_index(str(tmp_path / "lat"))[0])))[1]
    assert torch.allclose(torch.from_numpy(np.array(cached["latent"])), expect, atol=1e-5)
