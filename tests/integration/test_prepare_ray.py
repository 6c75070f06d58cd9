"""prepare / cache-latents / stats as Ray jobs on a local Ray instance, with s3:// on a moto server.

Ray starts once for the module (tens of seconds on a loaded 2-core machine), after the S3 server so
that its workers inherit the endpoint and the dummy credentials.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from data_pipeline.cache_latents import run_cache_latents
from data_pipeline.images import make_broken_folder, make_digits_folder
from data_pipeline.prepare import run_prepare
from data_pipeline.stats import run_stats
from rae_scale import storage
from rae_scale.data import build_image_loader, schema
from rae_scale.data.mds import read_index, shard_samples

from integration.s3_server import make_bucket, s3_endpoint  # noqa: F401  (fixture)
from unit.test_data_pipeline import tiny_encoder_factory

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):  # noqa: F811
    import os
    from pathlib import Path

    import ray

    from data_pipeline.ray_utils import start_local_ray

    # Ray workers import the test encoder factory (unit.test_data_pipeline) by name.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), saved]))
    start_local_ray(num_cpus=2)
    yield s3_endpoint
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    make_digits_folder(root / "digits", size=40, per_class=8)
    make_broken_folder(root / "broken")
    return root


def _checksums(manifest):
    return [(s["path"], s["sha256"]) for s in manifest["shards"]]


def test_ray_prepare_equals_in_process_and_counts_broken_files(ray_cluster, src):
    local = run_prepare(input=str(src / "digits"), output=str(src / "ray_mds"), resolution=32,
                        shard_size_bytes=1 << 16)
    single = run_prepare(input=str(src / "digits"), output=str(src / "one_mds"), resolution=32,
                         shard_size_bytes=1 << 16, num_workers=0)
    assert _checksums(local) == _checksums(single)  # independent of the number of workers
    bad = run_prepare(input=str(src / "broken"), output=str(src / "bad_wds"), resolution=32, format="wds")
    from data_pipeline.images import BROKEN_EXPECTED

    assert bad["num_samples"] == BROKEN_EXPECTED["samples"]
    assert bad["skipped_counts"] == BROKEN_EXPECTED["skipped"]
    assert bad["converted_counts"] == BROKEN_EXPECTED["converted"]


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_s3_input_and_output(ray_cluster, src, fmt, tmp_path):
    bucket = make_bucket(ray_cluster, f"data-{fmt}")
    fs, _ = storage.filesystem(bucket)
    fs.put(str(src / "digits"), f"{bucket[5:]}/digits", recursive=True)
    remote = run_prepare(input=f"{bucket}/digits", output=f"{bucket}/shards", resolution=32, format=fmt,
                         shard_size_bytes=1 << 16)
    local = run_prepare(input=str(src / "digits"), output=str(tmp_path / "local"), resolution=32, format=fmt,
                        shard_size_bytes=1 << 16, num_workers=0)
    assert remote["counts_per_class"] == local["counts_per_class"]
    assert _checksums(remote) == _checksums(local)
    loader = build_image_loader(f"{bucket}/shards", batch_size=8, seed=2, cache_dir=str(tmp_path / "cache"))
    ref = build_image_loader(str(tmp_path / "local"), batch_size=8, seed=2) if fmt == "wds" else None
    got = [(x.sum().item(), y.tolist()) for x, y in loader]
    assert len(got) == 10
    if ref is not None:
        assert got == [(x.sum().item(), y.tolist()) for x, y in ref]
    del loader, ref
    gc.collect()


def test_cache_latents_and_stats_on_ray(ray_cluster, src, tmp_path):
    run_prepare(input=str(src / "digits"), output=str(tmp_path / "mds"), resolution=32, shard_size_bytes=1 << 16)
    info = run_cache_latents(input=str(tmp_path / "mds"), output=str(tmp_path / "lat"),
                             encoder_factory=tiny_encoder_factory, batch_size=16, both_flips=True, num_workers=2)
    assert info["num_samples"] == 80 and info["shape"] == [4, 4, 4]
    one = run_stats(input=str(tmp_path / "lat"), num_workers=1)
    two = run_stats(input=str(tmp_path / "lat"), num_workers=2)
    for key in ("mean", "var"):
        np.testing.assert_allclose(one[key].numpy(), two[key].numpy(), rtol=1e-12, atol=0)
    lat = str(tmp_path / "lat")
    x = np.stack([s[k].astype(np.float64) for sh in read_index(lat) for _, s in shard_samples(lat, sh)
                  for k in ("latent", "latent_flip")])
    np.testing.assert_allclose(two["mean"].numpy(), x.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(two["var"].numpy(), x.var(0), rtol=1e-10)
    # resumable: a finished cache is not recomputed (markers) and gives the same description
    again = run_cache_latents(input=str(tmp_path / "mds"), output=lat, encoder_factory=tiny_encoder_factory,
                              batch_size=16, both_flips=True, num_workers=2)
    assert again == info
