"""Weighted multi-source mixtures (data.sources): realised shares, exact resume, virtual epochs, bad
input, and `prepare` ingesting BLIP3o-style webdataset tars with their captions.

The two sources are the tiny mixture's (data_pipeline.tiny.build_digits_mixture): plain grey digits
ingested from captioned webdataset tars, and colourised digits from a class-folder tree, each
prepared by the real `prepare` in MDS and in webdataset format. Which source a sample came from is
checked on the pixels (grey images have equal channels), independently of the loader's counters.
"""
from __future__ import annotations

import gc
import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
from PIL import Image

from data_pipeline.tiny import build_digits_mixture
from rae_scale.data import schema
from rae_scale.data.mixture import SourceSpec, build_mixture_loader, resolve_sources, weyl_choices

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

RES, PER_CLASS = 16, 6  # 60 samples per source
MIX_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "stage1" / "mix_tiny_cpu.yaml")
WEIGHTS = (1.0, 3.0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for fmt in ("mds", "wds"):
        specs = [NS(name=n, url=str(root / fmt / n), format=fmt) for n in ("plain", "colour")]
        build_digits_mixture(specs, resolution=RES, root=root, per_class=PER_CLASS, num_workers=0)
        out[fmt] = [SourceSpec(s.name, s.url, w, fmt) for s, w in zip(specs, WEIGHTS)]
    return out


def _loader(specs, **kw):
    args = dict(batch_size=8, seed=3, hflip=False, with_ids=True)
    return build_mixture_loader(specs, **{**args, **kw})


def _take(loader, n_batches):
    """n_batches batches (x, ids), running on over epoch ends."""
    out = []
    while len(out) < n_batches:
        for x, _, ids in loader:
            out.append((x, ids.tolist()))
            if len(out) == n_batches:
                break
    return out


def _close(loader):
    del loader
    gc.collect()  # one StreamingDataset per local folder at a time


def _ids(batches):
    return [b[1] for b in batches]


@pytest.mark.parametrize("fmt, ranks", [("mds", [(0, 1)]), ("wds", [(0, 2), (1, 2)])])
def test_shares_follow_the_weights_and_an_interrupted_mixture_resumes_exactly(sources, fmt, ranks):
    """2,000 samples (all ranks): each source's share within 2% of its weight. Then a run stopped in
    epoch 1, keeping only its (JSON) state, resumes in a fresh loader with exactly the ids that
    followed. webdataset ranks are simulated in-process (the mixer is per rank); MDS needs real ranks
    for world > 1 (streaming joins a process group): tests/distributed/test_data_mixture.py."""
    xs, ids, firsts = [], [], {}
    for rank, world in ranks:
        def make():
            return _loader(sources[fmt], rank=rank, world_size=world)

        loader = make()
        n = len(loader)
        full = _take(loader, 250 // world)
        counts = loader.source_counts.copy()
        _close(loader)
        loader = make()
        before = _ids(_take(loader, n + 5))
        state = json.loads(json.dumps(loader.state_dict()))  # what the checkpoint keeps (rank_<r>.pt)
        _close(loader)
        resumed = make()
        resumed.load_state_dict(state)
        after = _ids(_take(resumed, 6))
        _close(resumed)
        assert before + after == _ids(full[:n + 11])
        assert state["epoch"] == 1
        x = np.concatenate([b[0].numpy() for b in full])
        grey = (x.max(axis=1) - x.min(axis=1)).reshape(len(x), -1).max(axis=1) < 3 / 255  # plain: R = G = B
        assert counts.tolist() == [int(grey.sum()), int((~grey).sum())]
        xs.append(grey)
        ids.append(np.concatenate(_ids(full)))
        firsts[rank] = ids[-1][:24]
    grey, ids = np.concatenate(xs), np.concatenate(ids)
    assert len(ids) == 2000
    # the ids of source 0 come first (60 of them), and the pixels agree with the ids
    assert np.array_equal(grey, ids < 60)
    assert abs(grey.mean() - WEIGHTS[0] / sum(WEIGHTS)) < 0.02
    assert set(ids[ids < 60]) == set(range(60)) and set(ids[ids >= 60]) == set(range(60, 120))
    if len(ranks) == 2:  # within a pass the ranks read disjoint slices of each source
        assert not set(firsts[0]) & set(firsts[1])


def test_weyl_choices_are_keyed_and_stratified():
    cum = np.array([0.1, 0.5])  # weights 0.1, 0.4, 0.5
    k = np.arange(10_000)
    a = weyl_choices(7, 0, k, cum)
    assert np.array_equal(a[1234:1300], weyl_choices(7, 0, k[1234:1300], cum))  # a function of (seed, rank, k)
    assert not np.array_equal(a, weyl_choices(7, 1, k, cum)) and not np.array_equal(a, weyl_choices(8, 0, k, cum))
    for lo in range(0, 10_000, 1000):  # every window of 200 draws holds the shares to within 2 samples
        window = np.bincount(a[lo:lo + 200], minlength=3)
        assert np.all(np.abs(window - np.array([20, 80, 100])) <= 2), window


def test_wds_state_names_each_source_position_and_exhausted_sources_reshuffle(sources):
    loader = _loader(sources["wds"], batch_size=4)
    batches = _take(loader, 80)  # 320 draws: plain (1/4) ~80 = 1.3 passes over its 60
    state = loader.state_dict()
    _close(loader)
    plain = [i for b in _ids(batches) for i in b if i < 60]
    assert sorted(plain[:60]) == list(range(60))  # pass 0: each sample once
    assert plain[60:] != plain[:len(plain) - 60]  # pass 1 is a new order, not a replay
    src = state["sources"][0]
    assert src["name"] == "plain" and src["pass"] == 1 and src["offset"] == len(plain) - 60
    assert {"shard", "sample_in_shard"} <= set(src) and state["draws"] == 320
    bad = {**state, "world_size": 2}
    loader = _loader(sources["wds"], batch_size=4)
    with pytest.raises(ValueError, match="world_size=2"):
        loader.load_state_dict(bad)
    with pytest.raises(ValueError, match="mixture"):
        loader.load_state_dict({**state, "mixture": {"names": ["plain", "colour"], "weights": [1.0, 1.0]}})


def test_wds_worker_process_gives_the_same_batches_and_state(sources):
    """num_workers=1: a background process makes the batches; its state (sent with each batch) resumes
    an in-process loader exactly where the worker-fed run stopped."""
    loader = _loader(sources["wds"], batches_per_epoch=4)
    inline = _ids(_take(loader, 10))
    _close(loader)
    loader = _loader(sources["wds"], batches_per_epoch=4, num_workers=1)
    fed = _ids(_take(loader, 6))  # one epoch end inside
    state, shares = loader.state_dict(), loader.source_counts.tolist()
    _close(loader)
    resumed = _loader(sources["wds"], batches_per_epoch=4)
    resumed.load_state_dict(state)
    rest = _ids(_take(resumed, 4))
    _close(resumed)
    assert fed + rest == inline
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 2 and sum(shares) == 48


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_virtual_epochs(sources, fmt):
    """webdataset: an epoch of 5 batches only turns the counter, the stream goes on; MDS: each epoch
    is streaming's draw of 5 x 8 samples with the exact weights (10 plain, 30 colour)."""
    loader = _loader(sources[fmt], batches_per_epoch=5)
    assert len(loader) == 5
    epoch0 = _ids(_take(loader, 5))
    epoch1 = _ids(_take(loader, 5))
    counts, epoch = loader.source_counts.tolist(), loader.epoch
    _close(loader)
    assert epoch == 1 and epoch0 != epoch1
    if fmt == "wds":
        flat = [i for b in epoch0 + epoch1 for i in b]
        assert len(set(flat)) == len(flat)  # 80 draws: colour's 60 exactly once, plain's 20 of 60
    else:
        assert counts == [20, 60]


def test_batch_stream_reads_sources_and_reports_shares(sources):
    from rae_scale.data.batch_stream import BatchStream

    data = NS(url="", format="mds", hflip=True, num_workers=0, cache_dir=None, num_canonical_nodes=None,
              sources=[NS(url=s.url, weight=s.weight, format="wds", kind="images", name=None)
                       for s in sources["wds"]])
    stream = BatchStream.for_images(data, micro_batch=8, rank=0, world_size=1, seed=0, virtual_epoch_steps=3,
                                    accum_steps=2)
    assert stream.batches_per_epoch == 6
    batch = stream.next_batch()
    assert batch["image"].shape == (8, 3, RES, RES) and batch["index"].shape == (8,)
    shares = stream.source_shares()
    assert set(shares) == {"plain", "colour"} and abs(sum(shares.values()) - 1) < 1e-12
    assert shares["plain"] == float((batch["index"] < 60).float().mean())
    with pytest.raises(ValueError, match="both set"):
        resolve_sources(NS(url="x", format="mds", sources=data.sources))
    with pytest.raises(ValueError, match="a mixture of latent caches is not implemented"):
        BatchStream.for_latents(data, micro_batch=2, rank=0, world_size=1, seed=0)


def test_missing_or_mismatched_sources_are_named(sources, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data source 1 \('web'.*does not exist") as info:
        build_mixture_loader([sources["wds"][0], SourceSpec("web", str(tmp_path / "nope"), 1.0, "wds")],
                             batch_size=2)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no wds_index.json"):
        build_mixture_loader([SourceSpec("p", sources["mds"][0].url, 1.0, "wds")], batch_size=2)
    with pytest.raises(ValueError, match="mixes mds and wds"):
        build_mixture_loader([sources["mds"][0], sources["wds"][1]], batch_size=2)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(value, size=20):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_broken_webdataset_samples_are_counted_and_skipped_by_the_mixer(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    _tar(folder / "a.tar", [("k0.png", _png(10)), ("k0.cls", b"1"), ("k1.cls", b"2"),  # k1: no image
                            ("k2.png", b"not a png"), ("k2.cls", b"3"), ("k3.png", _png(200)), ("k3.cls", b"4")])
    schema.write_json(str(folder / schema.WDS_INDEX), {"shards": [{"url": "a.tar", "samples": 4}], "num_samples": 4})
    loader = build_mixture_loader([SourceSpec("web", str(folder), 1.0, "wds")], batch_size=3, seed=0, hflip=False,
                                  with_ids=True, batches_per_epoch=2)
    got = [(ids.tolist(), y.tolist()) for _, y, ids in loader]
    state = loader.state_dict()
    skipped = state["skipped"][0]  # 3 passes over the tar: each broken sample met 2 or 3 times
    assert set(skipped) == {"no_image", "undecodable"} and min(skipped.values()) >= 2
    assert sum(skipped.values()) == state["draws"] - 6
    assert all(set(ids) <= {0, 3} and len(ids) == 3 for ids, _ in got)
    assert all(y == [1 if i == 0 else 4 for i in ids] for ids, y in got)


def test_prepare_ingests_blip3o_tars_keeping_captions_and_sources(tmp_path):
    from data_pipeline.prepare import run_prepare
    from rae_scale.data.mds import read_index, shard_samples

    split = tmp_path / "web" / "short-caption"
    split.mkdir(parents=True)
    _tar(split / "00000.tar", [
        ("a.jpg", _png(50, 24)), ("a.txt", b"  a grey square \n"),
        ("b.webp", _png(90, 24)), ("b.json", json.dumps({"caption": "a lighter square", "id": 7}).encode()),
        ("c.txt", b"a caption without an image"),
        ("d.png", b"\x89PNG broken"), ("d.txt", b"an undecodable image"),
        ("e.png", _png(130, 24)),  # no caption
    ])
    manifest = run_prepare(input=str(tmp_path / "web"), output=str(tmp_path / "out"), resolution=16, format="mds",
                           image_format="png", num_workers=0)
    assert manifest["input_format"] == "wds" and manifest["num_samples"] == 2
    assert manifest["skipped_counts"] == {"no_image": 1, "not_an_image": 1, "no_caption": 1}
    assert manifest["counts_per_source"] == {"short-caption": 2} and manifest["num_captioned"] == 2
    out = str(tmp_path / "out")
    rows = {s["key"]: s for sh in read_index(out) for _, s in shard_samples(out, sh)}
    assert {k: (s["caption"], s["source"], s["label"]) for k, s in rows.items()} == {
        "short-caption/00000.tar/a": ("a grey square", "short-caption", schema.NO_LABEL),
        "short-caption/00000.tar/b": ("a lighter square", "short-caption", schema.NO_LABEL)}
    pixel = np.asarray(Image.open(io.BytesIO(rows["short-caption/00000.tar/b"]["image"])))
    assert pixel.shape == (16, 16, 3) and np.all(pixel == 90)
    kept = run_prepare(input=str(tmp_path / "web"), output=str(tmp_path / "out_wds"), resolution=16, format="wds",
                       image_format="png", num_workers=0, keep_uncaptioned=True, source_name="blip3o")
    assert kept["num_samples"] == 3 and kept["num_captioned"] == 2 and kept["counts_per_source"] == {"blip3o": 3}
    with tarfile.open(tmp_path / "out_wds" / kept["shards"][0]["path"]) as tar:
        texts = sorted(tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt"))
    assert texts == ["", "a grey square", "a lighter square"]


def test_config_sources_and_virtual_epochs():
    from rae_scale.config import ConfigError
    from rae_scale.config.load import load_config
    from rae_scale.config.schema import Stage1Job

    cfg = load_config(Stage1Job, MIX_CONFIG)
    assert [s.name for s in cfg.data.sources] == ["plain", "colour"] and not cfg.data.url
    assert {s.format for s in cfg.data.sources} == {"mds"}
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight'.*> 0"):
        load_config(Stage1Job, MIX_CONFIG, ["data.sources=[{url: a}, {url: b, weight: -1}]"])
    with pytest.raises(ConfigError, match="virtual_epoch_steps"):
        load_config(Stage1Job, MIX_CONFIG, ["training.virtual_epoch_steps=0"])


def test_mixture_hands_out_captions_and_flips_by_the_asked_stream(sources):
    """with_captions (text-to-image on a mixture): each batch ends with its samples' captions, those of the
    captioned tars (plain) non-empty; flip_stream picks which per-sample draw mirrors an image."""
    from rae_scale.seeding import HashStream

    import torch

    for fmt in ("wds", "mds"):
        loader = _loader(sources[fmt], with_captions=True)
        batches = [b for b, _ in zip(loader, range(3))]
        assert all(isinstance(b[3], list) and len(b[3]) == len(b[2]) == 8 for b in batches)
        plain = [(c, i) for b in batches for c, i in zip(b[3], b[2].tolist()) if i < 60]
        assert plain and all(c for c, _ in plain), plain  # the captioned tars' samples
        _close(loader)
    flipped = {}
    for stream in (HashStream.IMAGE_FLIP, HashStream.LATENT_FLIP):
        loader = _loader(sources["wds"], hflip=True, flip_stream=stream)
        flipped[stream] = next(iter(loader))[0]
        _close(loader)
    plainly = next(iter(_loader(sources["wds"], hflip=False)))[0]
    mirrored = [[bool(torch.equal(a[i], plainly[i].flip(-1))) and not torch.equal(a[i], plainly[i])
                 for i in range(len(a))] for a in flipped.values()]
    assert mirrored[0] != mirrored[1] and any(mirrored[0]) and any(mirrored[1])
