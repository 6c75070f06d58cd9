"""Ray-actor variant of the sampling engine: the one eval module that imports Ray.

Each actor builds its own sampler (from a picklable factory), Inception and the extractors of the other
feature spaces (from their names and sources, resolved on the driver: eval.spaces), and receives
index-range units one at a time as it finishes the previous one (load balancing across uneven workers).
Unit moments are fixed-point integers, so the driver's merge order does not matter: the statistics of
every space are bit-identical to `features.collect_generator_features` with the same seed, batch and
unit size and the same extractors.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import ray
import torch

from rae_scale.eval.features import (SampleFn, _cat_all, _load_unit, _save_unit, _unit_path,
                                     check_progress, compute_metrics, progress_meta, run_unit, sample_labels,
                                     work_units, write_results)
from rae_scale.eval.space_set import SpaceFeatureSet

logger = logging.getLogger(__name__)


@ray.remote
class SamplingWorker:
    """Owns one sampler, one Inception and the other spaces' extractors; featurises the units it is given."""

    def __init__(self, make_sample_fn: Callable[[str], SampleFn], inception_weights, device: str,
                 extractor_sources: dict | None = None):
        """extractor_sources: {space: transformers folder or cached release name} (resolve_extractor_sources)."""
        from rae_scale.eval.inception import build_inception
        from rae_scale.eval.spaces import build_extractor

        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.sample_fn = make_sample_fn(device)
        self.inception = build_inception(inception_weights, device=device)
        self.extractors = {name: build_extractor(name, source, device)
                           for name, source in (extractor_sources or {}).items()}

    def has_logits(self) -> bool:
        return self.inception.has_logits

    def extractors_identity(self) -> dict:
        """Which weights this actor featurises with (eval.spaces.extractors_identity)."""
        from rae_scale.eval.spaces import extractors_identity

        return extractors_identity(self.extractors)

    def run(self, unit, labels, seed, batch_size, keep_pool, keep_space=False) -> dict:
        fs = run_unit(self.sample_fn, self.inception, *unit, labels=labels, seed=seed, batch_size=batch_size,
                      keep_pool=keep_pool, keep_logits=True, extractors=self.extractors, keep_space=keep_space)
        return fs.state_dict()


def resolve_extractor_sources(spaces, sources: dict | None = None, folder: str | None = None) -> dict:
    """{space: source} of every non-Inception space, resolved here (the driver's $RAE_SCALE_EXTRACTORS too),
    so that every actor loads the same folder or release: what build_extractors would load."""
    from rae_scale.eval.spaces import extractor_source, parse_spaces

    return {s: extractor_source(s, sources, folder) for s in parse_spaces(spaces) if s != "inception"}


def _check_identities(identities: list[dict], expected: dict | None) -> None:
    """Every actor (and the driver, `expected`) must featurise with the same weights: a node whose cache or
    folder holds another checkpoint would otherwise mix two networks' features into one FD."""
    for got in identities[1:] + ([expected] if expected is not None else []):
        if got != identities[0]:
            differ = sorted(k for k in set(got) | set(identities[0]) if got.get(k) != identities[0].get(k))
            raise ValueError(f"Ray sampling workers load different weights for feature space(s) {', '.join(differ)} "
                             f"({identities[0]} vs {got}); give every node the same extractor folders")


def collect_generator_features_ray(make_sample_fn: Callable[[str], SampleFn], *, num_workers: int,
                                   num_samples: int, batch_size: int, label_sampling: str = "equal",
                                   num_classes: int, seed: int, unit_size: int = 1000,
                                   num_gpus_per_worker: float = 0, num_cpus_per_worker: float = 1,
                                   inception_weights=None, keep_pool: bool = False,
                                   progress_dir: str | None = None, spec: dict | None = None,
                                   spaces=None, extractor_sources: dict | None = None, extractor_dir: str | None = None,
                                   keep_space: bool = False, expected_extractors: dict | None = None
                                   ) -> SpaceFeatureSet:
    """Like collect_generator_features, over `num_workers` Ray actors (GPU if num_gpus_per_worker > 0).

    `make_sample_fn(device)` runs inside each actor and returns sample_fn(labels, seeds) -> uint8;
    `spec` describes how it samples (units in progress_dir are reused only under the same spec).
    `spaces` (names of eval.spaces.SPACES) are featurised too, each actor building their extractors from
    `extractor_sources` / `extractor_dir` as build_extractors takes them; keep_space keeps their per-sample
    features (MIND). expected_extractors: the driver's extractors_identity, which the actors must match.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    sources = resolve_extractor_sources(spaces, extractor_sources, extractor_dir) if spaces else {}
    labels = sample_labels(num_samples, num_classes, seed, label_sampling)
    units = work_units(num_samples, unit_size)
    done = []
    if progress_dir:
        check_progress(progress_dir, progress_meta(num_samples=num_samples, unit_size=unit_size, seed=seed,
                                                   label_sampling=label_sampling, num_classes=num_classes,
                                                   spec=spec))
        done = [u for u in units if _unit_path(progress_dir, u).exists()]
    total, parts = SpaceFeatureSet(resumed_units=len(done)), []
    for unit in done:
        fs = _load_unit(progress_dir, unit, sources)
        total.merge(fs.moments_only())
        parts.append((unit[0], fs.pool_features, fs.logits, fs.space_features))
    pending = [u for u in units if u not in set(done)]

    device = "cuda" if num_gpus_per_worker > 0 else "cpu"
    workers = [SamplingWorker.options(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)
               .remote(make_sample_fn, inception_weights, device, sources)
               for _ in range(min(num_workers, len(pending)))]
    if workers and (sources or expected_extractors is not None):
        _check_identities(ray.get([w.extractors_identity.remote() for w in workers]), expected_extractors)
    labels_ref = ray.put(labels)
    in_flight = {}
    queue = list(pending)
    for w in workers:  # one unit per actor; the next is sent when it returns
        unit = queue.pop(0)
        in_flight[w.run.remote(unit, labels_ref, seed, batch_size, keep_pool, keep_space)] = (w, unit)
    while in_flight:
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        w, unit = in_flight.pop(ref)
        fs = SpaceFeatureSet.from_state_dict(ray.get(ref))
        if progress_dir:
            _save_unit(progress_dir, unit, fs)
        total.merge(fs.moments_only())
        parts.append((unit[0], fs.pool_features, fs.logits, fs.space_features))
        if queue:
            nxt = queue.pop(0)
            in_flight[w.run.remote(nxt, labels_ref, seed, batch_size, keep_pool, keep_space)] = (w, nxt)
    for w in workers:
        ray.kill(w)
    parts.sort(key=lambda p: p[0])
    total.pool_features = _cat_all([p[1] for p in parts])
    total.logits = _cat_all([p[2] for p in parts])
    if keep_space:
        total.space_features = {k: _cat_all([p[3].get(k) for p in parts]) for k in sources}
    return total


def evaluate_generator_ray(make_sample_fn: Callable[[str], SampleFn], *, num_workers: int, num_samples: int,
                           batch_size: int, label_sampling: str = "equal", num_classes: int, seed: int,
                           reference=None, compute_pr: bool = False, results_path: str | None = None,
                           metadata: dict | None = None, inception_weights=None, spec: dict | None = None,
                           spaces=None, extractor_sources: dict | None = None, extractor_dir: str | None = None,
                           mind: bool = False, mind_seed: int | None = None, **kw) -> dict:
    """Ray-actor evaluate_generator: metrics dict (+ results JSON) computed on the driver; with `spaces`
    also FD / FD_r / MIND per space, the reference's statistics of each space computed here with the
    extractors the actors build (and refused if theirs differ)."""
    from rae_scale.eval.reference import ReferenceStats, load_reference, load_space_reference

    if spaces is not None:
        from rae_scale.eval.spaces import parse_spaces

        spaces = parse_spaces(spaces)
        if "spaces" not in (spec or {}):  # units hold features of these spaces: part of what they depend on
            spec = {**(spec or {}), "spaces": {"names": list(spaces), "mind": mind}}
    if kw.get("progress_dir"):  # refuse another evaluation's folder before loading anything
        check_progress(kw["progress_dir"], progress_meta(
            num_samples=num_samples, unit_size=kw.get("unit_size", 1000), seed=seed,
            label_sampling=label_sampling, num_classes=num_classes, spec=spec))
    keep_pool = compute_pr or (mind and "inception" in (spaces or ()))
    source, space_references, expected = reference, {}, None
    if reference is not None and not isinstance(reference, ReferenceStats):
        from rae_scale.eval.inception import build_inception

        reference = load_reference(reference, inception=build_inception(inception_weights),
                                   keep_pool_features=keep_pool)
    sources = resolve_extractor_sources(spaces, extractor_sources, extractor_dir) if spaces else {}
    if sources and reference is not None:
        from rae_scale.eval.spaces import build_extractor, extractors_identity

        if isinstance(source, ReferenceStats):
            raise ValueError(f"feature spaces {', '.join(sources)} need reference images; a ReferenceStats holds "
                             "only Inception statistics")
        extractors = {name: build_extractor(name, src) for name, src in sources.items()}
        space_references = {name: load_space_reference(source, ex, keep_features=mind)
                            for name, ex in extractors.items()}
        expected = extractors_identity(extractors)
    features = collect_generator_features_ray(
        make_sample_fn, num_workers=num_workers, num_samples=num_samples, batch_size=batch_size,
        label_sampling=label_sampling, num_classes=num_classes, seed=seed, keep_pool=keep_pool,
        inception_weights=inception_weights, spec=spec, spaces=spaces, extractor_sources=sources,
        keep_space=mind, expected_extractors=expected, **kw)
    metrics = compute_metrics(features, reference, compute_pr=compute_pr, spaces=spaces,
                              space_references=space_references, mind=mind, mind_seed=mind_seed)
    settings = dict(num_samples=num_samples, batch_size=batch_size, label_sampling=label_sampling,
                    num_classes=num_classes, seed=seed, num_workers=num_workers,
                    unit_size=kw.get("unit_size", 1000), backend="ray", resumed_units=features.resumed_units)
    if spaces is not None:
        from rae_scale.eval.mind import MIND_SEED

        settings.update(spaces=list(spaces), mind=mind, mind_seed=MIND_SEED if mind_seed is None else mind_seed)
    progress_dir = kw.get("progress_dir")
    write_results(results_path or (os.path.join(progress_dir, "results.json") if progress_dir else None),
                  metrics, settings, metadata, spec)
    return metrics
