"""Ray-actor variant of the sampling engine: the one eval module that imports Ray.

Each actor builds its own sampler (from a picklable factory) and Inception, and receives index-range
units one at a time as it finishes the previous one (load balancing across uneven workers). Unit
moments are fixed-point integers, so the driver's merge order does not matter: the statistics are
bit-identical to `features.collect_generator_features` with the same seed, batch and unit size.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import ray
import torch

from rae_scale.eval.features import (FeatureSet, SampleFn, _load_unit, _save_unit, _unit_path, check_progress,
                                     compute_metrics, progress_meta, run_unit, sample_labels, work_units,
                                     write_results)

logger = logging.getLogger(__name__)


@ray.remote
class SamplingWorker:
    """Owns one sampler and one Inception; featurises the units it is given."""

    def __init__(self, make_sample_fn: Callable[[str], SampleFn], inception_weights, device: str):
        from rae_scale.eval.inception import build_inception

        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.sample_fn = make_sample_fn(device)
        self.inception = build_inception(inception_weights, device=device)

    def has_logits(self) -> bool:
        return self.inception.has_logits

    def run(self, unit, labels, seed, batch_size, keep_pool) -> dict:
        fs = run_unit(self.sample_fn, self.inception, *unit, labels=labels, seed=seed, batch_size=batch_size,
                      keep_pool=keep_pool, keep_logits=True)
        return fs.state_dict()


def collect_generator_features_ray(make_sample_fn: Callable[[str], SampleFn], *, num_workers: int,
                                   num_samples: int, batch_size: int, label_sampling: str = "equal",
                                   num_classes: int, seed: int, unit_size: int = 1000,
                                   num_gpus_per_worker: float = 0, num_cpus_per_worker: float = 1,
                                   inception_weights=None, keep_pool: bool = False,
                                   progress_dir: str | None = None, spec: dict | None = None) -> FeatureSet:
    """Like collect_generator_features, over `num_workers` Ray actors (GPU if num_gpus_per_worker > 0).

    `make_sample_fn(device)` runs inside each actor and returns sample_fn(labels, seeds) -> uint8;
    `spec` describes how it samples (units in progress_dir are reused only under the same spec).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    labels = sample_labels(num_samples, num_classes, seed, label_sampling)
    units = work_units(num_samples, unit_size)
    done = []
    if progress_dir:
        check_progress(progress_dir, progress_meta(num_samples=num_samples, unit_size=unit_size, seed=seed,
                                                   label_sampling=label_sampling, num_classes=num_classes,
                                                   spec=spec))
        done = [u for u in units if _unit_path(progress_dir, u).exists()]
    total, parts = FeatureSet(resumed_units=len(done)), []
    for unit in done:
        fs = _load_unit(progress_dir, unit)
        total.merge(FeatureSet(fs.pool, fs.spatial))
        parts.append((unit[0], fs.pool_features, fs.logits))
    pending = [u for u in units if u not in set(done)]

    device = "cuda" if num_gpus_per_worker > 0 else "cpu"
    workers = [SamplingWorker.options(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)
               .remote(make_sample_fn, inception_weights, device) for _ in range(min(num_workers, len(pending) or 1))]
    labels_ref = ray.put(labels)
    in_flight = {}
    queue = list(pending)
    for w in workers:  # one unit per actor; the next is sent when it returns
        if queue:
            unit = queue.pop(0)
            in_flight[w.run.remote(unit, labels_ref, seed, batch_size, keep_pool)] = (w, unit)
    while in_flight:
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        w, unit = in_flight.pop(ref)
        fs = FeatureSet.from_state_dict(ray.get(ref))
        if progress_dir:
            _save_unit(progress_dir, unit, fs)
        total.merge(FeatureSet(fs.pool, fs.spatial))
        parts.append((unit[0], fs.pool_features, fs.logits))
        if queue:
            nxt = queue.pop(0)
            in_flight[w.run.remote(nxt, labels_ref, seed, batch_size, keep_pool)] = (w, nxt)
    for w in workers:
        ray.kill(w)
    parts.sort(key=lambda p: p[0])
    feats = [p[1] for p in parts if p[1] is not None]
    logits = [p[2] for p in parts if p[2] is not None]
    total.pool_features = torch.cat(feats) if feats else None
    total.logits = torch.cat(logits) if logits else None
    return total


def evaluate_generator_ray(make_sample_fn: Callable[[str], SampleFn], *, num_workers: int, num_samples: int,
                           batch_size: int, label_sampling: str = "equal", num_classes: int, seed: int,
                           reference=None, compute_pr: bool = False, results_path: str | None = None,
                           metadata: dict | None = None, inception_weights=None, spec: dict | None = None,
                           **kw) -> dict:
    """Ray-actor evaluate_generator: metrics dict (+ results JSON) computed on the driver."""
    from rae_scale.eval.reference import ReferenceStats, load_reference

    if kw.get("progress_dir"):  # refuse another evaluation's folder before loading anything
        check_progress(kw["progress_dir"], progress_meta(
            num_samples=num_samples, unit_size=kw.get("unit_size", 1000), seed=seed,
            label_sampling=label_sampling, num_classes=num_classes, spec=spec))
    if reference is not None and not isinstance(reference, ReferenceStats):
        from rae_scale.eval.inception import build_inception

        reference = load_reference(reference, inception=build_inception(inception_weights),
                                   keep_pool_features=compute_pr)
    features = collect_generator_features_ray(
        make_sample_fn, num_workers=num_workers, num_samples=num_samples, batch_size=batch_size,
        label_sampling=label_sampling, num_classes=num_classes, seed=seed, keep_pool=compute_pr,
        inception_weights=inception_weights, spec=spec, **kw)
    metrics = compute_metrics(features, reference, compute_pr=compute_pr)
    settings = dict(num_samples=num_samples, batch_size=batch_size, label_sampling=label_sampling,
                    num_classes=num_classes, seed=seed, num_workers=num_workers,
                    unit_size=kw.get("unit_size", 1000), backend="ray", resumed_units=features.resumed_units)
    progress_dir = kw.get("progress_dir")
    write_results(results_path or (os.path.join(progress_dir, "results.json") if progress_dir else None),
                  metrics, settings, metadata, spec)
    return metrics
