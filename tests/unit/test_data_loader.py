"""Image loaders over MDS and webdataset shards: content, determinism, exact mid-epoch resume."""
from __future__ import annotations

import gc
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_ranks

from data_pipeline.images import make_digits_folder
from data_pipeline.prepare import run_prepare
from rae_scale.data import adm_center_crop, build_image_loader
from rae_scale.data.transforms import flip_mask
from distributed._workers_data import fingerprint, resume_worker

RES = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    make_digits_folder(root / "src", size=40, per_class=12)
    out = {}
    for fmt in ("mds", "wds"):
        out[fmt] = str(root / fmt)
        run_prepare(input=str(root / "src"), output=out[fmt], resolution=RES, format=fmt,
                    shard_size_bytes=1 << 16, num_workers=0)
    out["src"] = root / "src"
    return out


def test_adm_center_crop_matches_box_then_bicubic_then_crop():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(400, 600, 3), dtype=np.uint8)
    got = np.asarray(adm_center_crop(Image.fromarray(arr), 100), dtype=np.int32)
    # 600x400 -> 300x200 -> 150x100 by 2x2 means (short side stays >= 2*100 twice), no bicubic
    # rescale needed (short side already 100), then the central 100 columns (offset 25). PIL rounds
    # each 8-bit halving up by at most 1; a wrong offset or filter would be off by tens on noise.
    x = arr.astype(np.float64)
    for _ in range(2):
        x = np.floor((x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]) / 4.0 + 0.5)
    expect = x[:, 25:125]
    assert got.shape == (100, 100, 3)
    assert np.abs(got - expect).max() <= 2.0 and np.abs(got - expect).mean() < 1.0


def test_adm_center_crop_upsamples_small_images():
    small = Image.fromarray(np.full((9, 12, 3), 77, dtype=np.uint8))
    out = adm_center_crop(small, 32)
    assert out.size == (32, 32)
    assert np.all(np.asarray(out) == 77)  # bicubic of a constant image is that constant


def test_flip_mask_is_deterministic_and_balanced():
    ids = np.arange(20000)
    a, b = flip_mask(5, 2, ids), flip_mask(5, 2, ids[::-1].copy())
    assert torch.equal(a, b.flip(0))
    assert abs(a.float().mean().item() - 0.5) < 0.02
    assert not torch.equal(a, flip_mask(5, 3, ids)) and not torch.equal(a, flip_mask(6, 2, ids))


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_epoch_content_matches_source_images(shards, fmt):
    loader = build_image_loader(shards[fmt], batch_size=8, seed=1, hflip=False, drop_last=False)
    got = [fp for x, y in loader for fp in fingerprint(x, y)]
    del loader
    gc.collect()
    expect = []
    for path in sorted(Path(shards["src"]).rglob("*.JPEG")):
        label = int(path.parent.name[1:])
        buf = io.BytesIO()
        adm_center_crop(Image.open(path).convert("RGB"), RES).save(buf, format="JPEG", quality=95, subsampling=0)
        arr = np.asarray(Image.open(buf).convert("RGB"))
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255.0
        expect += fingerprint(x, torch.tensor([label]))
    assert len(got) == 120
    assert Counter(got) == Counter(expect)
    assert got != sorted(got)  # shuffled


@pytest.fixture(scope="module")
def mds_two_ranks(shards):
    """2 gloo ranks: an uninterrupted run, and one stopped after 3 batches of epoch 1 and resumed."""
    return run_ranks(resume_worker, 2, shards["mds"], 3, 4)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_two_rank_resume_mid_epoch_yields_exactly_the_remaining_batches(shards, fmt, request):
    results = (request.getfixturevalue("mds_two_ranks") if fmt == "mds"
               else run_ranks(resume_worker, 2, shards[fmt], 3, 4))
    per_epoch = 120 // (2 * 4)
    for full, before, after, state in results:
        epoch0, epoch1 = full[:per_epoch], full[per_epoch:]
        assert len(epoch1) == per_epoch
        assert epoch0 != epoch1  # a new order (and new flips) per epoch
        assert before == epoch1[:3]
        assert after == epoch1[3:]
        assert state["epoch"] == 1 and state["sample_in_epoch"] == 3 * 4 * 2
    seen = [fp for full, *_ in results for batch in full[:per_epoch] for fp in batch]
    assert len(set(seen)) == len(seen) == 120  # the ranks split the epoch without overlap


@pytest.mark.slow
def test_mds_resume_on_one_rank_keeps_global_batches(shards, mds_two_ranks):
    results = mds_two_ranks
    per_epoch = 120 // 8
    global_batches = [sorted(results[0][0][per_epoch + t] + results[1][0][per_epoch + t])
                      for t in range(per_epoch)]
    loader = build_image_loader(shards["mds"], batch_size=8, rank=0, world_size=1, seed=7, hflip=True)
    loader.load_state_dict(results[0][3])
    resumed = [sorted(fingerprint(x, y)) for x, y in loader]
    del loader
    gc.collect()
    assert resumed == global_batches[3:]


def test_wds_refuses_another_world_size(shards):
    loader = build_image_loader(shards["wds"], batch_size=4, seed=7)
    state = loader.state_dict()
    state["world_size"] = 2
    with pytest.raises(ValueError, match="same world size"):
        loader.load_state_dict(state)


def test_wds_worker_processes_keep_the_order(shards):
    def run(nw):
        loader = build_image_loader(shards["wds"], batch_size=8, seed=4, num_workers=nw)
        return [fingerprint(x, y) for x, y in loader]

    assert run(2) == run(0)


def test_bad_arguments_are_named(shards):
    with pytest.raises(ValueError, match="rank"):
        build_image_loader(shards["mds"], batch_size=4, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="index.json"):
        build_image_loader(str(shards["src"]), batch_size=4)


@pytest.mark.parametrize("mode, subsampling, fmt", [("RGB", 0, "JPEG"), ("RGB", 2, "JPEG"), ("L", 0, "JPEG"),
                                                    ("CMYK", 0, "JPEG"), ("RGB", None, "PNG")])
def test_image_decode_gives_pillows_pixels(mode, subsampling, fmt):
    from rae_scale.data.loader import decode_image_sample

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(45, 38, 3), dtype=np.uint8)  # odd size: partial JPEG blocks
    buf = io.BytesIO()
    extra = {"quality": 90, "subsampling": subsampling} if fmt == "JPEG" else {}
    Image.fromarray(rgb).convert(mode).save(buf, format=fmt, **extra)
    got, label, sample_id = decode_image_sample({"image": buf.getvalue(), "label": 3}, 11)
    expect = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert got.dtype == torch.uint8 and got.shape == (3, 45, 38) and (label, sample_id) == (3, 11)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expect)


def _sample_keys(samples):
    return [s["key"] for s in samples]


@pytest.mark.parametrize("workers, drop_last, start", [(0, False, 0), (2, True, 21)])
def test_mds_batches_equal_streamings_own_iteration(shards, workers, drop_last, start):
    """Batch-at-a-time reading keeps the batches of StreamingDataset + DataLoader(batch_size)."""
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    from rae_scale.data.mds import read_index, shard_samples

    url = shards["mds"]
    key_of = {sid: s["key"] for shard in read_index(url) for sid, s in shard_samples(url, shard)}
    loader = build_image_loader(url, batch_size=7, seed=3, num_workers=workers, drop_last=drop_last,
                                with_ids=True)
    loader.load_state_dict({**loader.state_dict(), "epoch": 2, "sample_in_epoch": start})
    ours = [[key_of[i] for i in ids.tolist()] for _, _, ids in loader]
    del loader
    gc.collect()
    ds = StreamingDataset(local=url, batch_size=7, shuffle=True, shuffle_seed=3, num_canonical_nodes=1,
                          partition_algo="relaxed", shuffle_algo="py1e")
    ds.load_state_dict({"epoch": 2, "sample_in_epoch": start, "num_canonical_nodes": 1, "shuffle_seed": 3,
                        "initial_physical_nodes": 1})
    theirs = list(DataLoader(ds, batch_size=7, num_workers=workers, drop_last=drop_last,
                             collate_fn=_sample_keys))
    del ds
    gc.collect()
    assert len(ours) == len(theirs) >= (120 - start) // 7 - 2
    assert ours == theirs


def test_stage2_without_latents_points_to_cache_latents():
    """Stage 2 has no online encoding yet: the message names the command that makes latents."""
    from types import SimpleNamespace

    from rae_scale.data.batch_stream import BatchStream

    with pytest.raises(ValueError, match="rae-scale cache-latents") as info:
        BatchStream.for_latents(SimpleNamespace(latents_url=""), micro_batch=2, rank=0, world_size=1, seed=0)
    assert "data.source" not in str(info.value)
