"""Sampling engine: worker-count invariance (2 gloo ranks, Ray actors), kill + resume, npz dump."""
from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest
import torch

import _workers_eval as W
from conftest import run_ranks
from rae_scale.eval.features import (collect_generator_features, evaluate_generator, sample_labels,
                                     sample_seeds, work_units)
from rae_scale.eval.metrics import frechet_distance
from rae_scale.eval.reference import ReferenceStats
from reference_npz import save_reference_npz


@pytest.fixture(scope="module")
def extractor_dir(tmp_path_factory) -> str:
    """Tiny random-weight transformers folders of two more feature spaces (eval.spaces)."""
    from tiny_extractors import save_tiny_extractors

    return str(save_tiny_extractors(tmp_path_factory.mktemp("extractors"), spaces=W.SPACES))


@pytest.fixture(scope="module")
def single(extractor_dir):
    """The uninterrupted single-process run every variant must reproduce bit for bit (its feature
    spaces too, where the variant featurises them)."""
    from rae_scale.eval.spaces import build_extractors

    torch.set_num_threads(1)
    fs = collect_generator_features(W.toy_sample_fn, num_samples=W.N, batch_size=W.BATCH, num_classes=W.CLASSES,
                                    seed=W.SEED, unit_size=W.UNIT, keep_pool=True, keep_space=True,
                                    extractors=build_extractors(W.SPACES, folder=extractor_dir))
    return fs.state_dict()


def assert_identical(a: dict, b: dict):
    a, b = W.to_numpy(a), W.to_numpy(b)
    for key in ("pool", "spatial"):
        assert a[key]["count"] == b[key]["count"] == W.N
        np.testing.assert_array_equal(a[key]["sum"], b[key]["sum"])
        np.testing.assert_array_equal(a[key]["outer"], b[key]["outer"])
    np.testing.assert_array_equal(a["pool_features"], b["pool_features"])
    for name in set(a.get("spaces") or {}) & set(b.get("spaces") or {}):  # FD moments of the other spaces
        sa, sb = a["spaces"][name], b["spaces"][name]
        assert sa["count"] == sb["count"] == W.N
        np.testing.assert_array_equal(sa["sum"], sb["sum"])
        np.testing.assert_array_equal(sa["outer"], sb["outer"])
        np.testing.assert_array_equal(a["space_features"][name], b["space_features"][name])


def test_seeds_and_labels_depend_only_on_global_seed_and_index():
    idx = torch.arange(10)
    assert torch.equal(sample_seeds(3, idx)[4:6], sample_seeds(3, torch.tensor([4, 5])))
    assert not torch.equal(sample_seeds(3, idx), sample_seeds(4, idx))
    assert len(set(sample_seeds(3, torch.arange(10000)).tolist())) == 10000
    labels = sample_labels(1000, 10, seed=1, mode="equal")
    assert torch.equal(torch.bincount(labels), torch.full((10,), 100))
    assert not torch.equal(labels[:100], labels[:100].sort().values)  # shuffled, not class-sorted
    assert torch.equal(sample_labels(50, 7, 2, "random"), sample_labels(50, 7, 2, "random"))
    assert work_units(5, 2) == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(ValueError, match="label_sampling"):
        sample_labels(10, 2, 0, "sorted")


@pytest.mark.slow
def test_one_and_two_ranks_give_identical_stats(single, tmp_path, extractor_dir):
    results = run_ranks(W.collect, 2, None, str(tmp_path / "samples.npz"), extractor_dir)
    assert set(results[0]["spaces"]) == set(W.SPACES)  # 2 ranks: identical moments in every feature space
    assert_identical(single, results[0])
    assert results[1]["pool_features"] is None  # per-sample features are gathered to rank 0 only
    # the ADM-format npz dump: arr_0 images in index order, arr_1 labels
    with np.load(tmp_path / "samples.npz") as f:
        labels = sample_labels(W.N, W.CLASSES, W.SEED)
        assert torch.equal(torch.from_numpy(f["arr_1"]), labels)
        expect = W.toy_sample_fn(labels, sample_seeds(W.SEED, torch.arange(W.N))).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(f["arr_0"], expect)


@pytest.mark.slow
def test_killed_midway_then_resumed_equals_uninterrupted(single, tmp_path):
    progress = tmp_path / "progress"
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=W.killed_run, args=(str(progress), 1))  # dies in the second unit
    p.start()
    p.join(300)
    assert p.exitcode == 17
    assert len(list(progress.glob("unit_*.pt"))) == 1
    resumed = collect_generator_features(W.toy_sample_fn, num_samples=W.N, batch_size=W.BATCH,
                                         num_classes=W.CLASSES, seed=W.SEED, unit_size=W.UNIT,
                                         keep_pool=True, progress_dir=str(progress))
    assert_identical(single, resumed.state_dict())
    # a progress folder of another evaluation is refused, not silently mixed in
    with pytest.raises(ValueError, match="another evaluation"):
        collect_generator_features(W.toy_sample_fn, num_samples=W.N, batch_size=W.BATCH, num_classes=W.CLASSES,
                                   seed=W.SEED + 1, unit_size=W.UNIT, progress_dir=str(progress))


@pytest.mark.slow
def test_resume_on_two_ranks_and_results_json(single, tmp_path):
    """All units finished: a resume on 2 ranks loads them and gives the same statistics."""
    progress = tmp_path / "p"
    collect_generator_features(W.toy_sample_fn, num_samples=W.N, batch_size=W.BATCH, num_classes=W.CLASSES,
                               seed=W.SEED, unit_size=W.UNIT, keep_pool=True, progress_dir=str(progress))
    results = run_ranks(W.collect, 2, str(progress), None)
    assert_identical(single, results[0])
    # evaluate_generator: FID against an ADM npz, everything from the progress folder, JSON written
    from rae_scale.eval.features import FeatureSet

    fs = FeatureSet.from_state_dict(single)
    rng = np.random.default_rng(0)
    ref = ReferenceStats(mu=rng.random(2048), sigma=np.eye(2048) * 0.01, mu_s=rng.random(2023),
                         sigma_s=np.eye(2023) * 0.01)
    save_reference_npz(tmp_path / "ref.npz", ref)
    metrics = evaluate_generator(W.toy_sample_fn, num_samples=W.N, batch_size=W.BATCH, num_classes=W.CLASSES,
                                 seed=W.SEED, unit_size=W.UNIT, progress_dir=str(progress),
                                 reference=str(tmp_path / "ref.npz"), metadata={"checkpoint": "step-1"})
    mu, sigma = fs.pool.stats()
    assert metrics["fid"] == pytest.approx(frechet_distance(mu, sigma, ref.mu, ref.sigma), rel=1e-12)
    saved = json.loads((progress / "results.json").read_text())
    assert saved["metrics"]["fid"] == metrics["fid"] and saved["metadata"]["checkpoint"] == "step-1"
    assert saved["sampler"]["label_sampling"] == "equal"


@pytest.mark.slow
def test_ray_actors_give_identical_stats(single, extractor_dir):
    """Ray actors featurising Inception and a second space (each actor builds its extractor from the folder)
    give the single-process statistics bit for bit in both spaces."""
    ray = pytest.importorskip("ray")
    from rae_scale.eval.sampling_workers import _check_identities, collect_generator_features_ray

    import os
    from pathlib import Path

    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here.parents[1]), str(here)])  # actors import rae_scale and _workers_eval
    # address="local": a new instance, never a `ray start` cluster another test left on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    try:
        fs = collect_generator_features_ray(W.make_toy_sample_fn, num_workers=2, num_samples=W.N,
                                            batch_size=W.BATCH, num_classes=W.CLASSES, seed=W.SEED,
                                            unit_size=W.UNIT, keep_pool=True, spaces=("inception", W.SPACES[0]),
                                            extractor_dir=extractor_dir, keep_space=True)
    finally:
        ray.shutdown()
    assert set(fs.spaces) == set(fs.space_features) == {W.SPACES[0]}
    assert_identical(single, fs.state_dict())
    # actors (or the driver) that loaded other weights for a space are refused, not mixed into one FD
    with pytest.raises(ValueError, match="different weights for feature space"):
        _check_identities([{"convnext": {"weights_sha1": "a"}}, {"convnext": {"weights_sha1": "b"}}], None)
