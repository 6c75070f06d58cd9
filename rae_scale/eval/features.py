"""Sampling + featurisation engine: per-sample seeds, resumable index-range units, exact reductions.

`evaluate_generator` is model-agnostic: it calls `sample_fn(labels, seeds) -> uint8 [B, 3, H, W]`
and never sees the model. The seed and label of sample i depend only on the global seed and i,
the work is cut into fixed index ranges ("units") that do not depend on the number of workers,
and the per-unit moments are fixed-point integers (see MomentAccumulator), so 1, 2 or 64 workers,
and a run killed and resumed, all give bit-identical statistics.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from rae_scale.eval.feature_set import FeatureSet
from rae_scale.eval.inception import InceptionFeatures, build_inception
from rae_scale.eval.metrics import MomentAccumulator, frechet_distance, inception_score, precision_recall
from rae_scale.eval.space_set import SpaceFeatureSet

logger = logging.getLogger(__name__)

SampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LABEL_SAMPLING = ("equal", "random")


# ----------------------------------------------------------------------------- seeds and labels


def sample_seeds(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """Per-sample 63-bit seeds (rae_scale.seeding.index_seed), a function of the global seed and i only."""
    from rae_scale.seeding import index_seed

    return torch.tensor([index_seed(seed, i) for i in indices.tolist()], dtype=torch.long)


def sample_labels(num_samples: int, num_classes: int, seed: int, mode: str = "equal") -> torch.Tensor:
    """Class label of every sample index.

    equal: each class ceil/floor(N / C) times, globally permuted (RAE's default; ~0.1 lower FID
    than random); random: i.i.d. uniform. Both depend only on (N, C, seed), so on no worker count,
    and both leave classes shuffled along the index, which keeps split-wise IS honest.
    """
    if mode not in LABEL_SAMPLING:
        raise ValueError(f"label_sampling must be one of {LABEL_SAMPLING}, got {mode!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    if mode == "equal":
        pool = torch.arange(num_samples) % num_classes
        return pool[torch.randperm(num_samples, generator=g)]
    return torch.randint(0, num_classes, (num_samples,), generator=g)


def work_units(num_samples: int, unit_size: int) -> list[tuple[int, int]]:
    """Index ranges [start, stop) of at most unit_size samples; independent of the worker count."""
    if num_samples < 1 or unit_size < 1:
        raise ValueError(f"num_samples and unit_size must be >= 1, got {num_samples}, {unit_size}")
    return [(s, min(s + unit_size, num_samples)) for s in range(0, num_samples, unit_size)]


# ----------------------------------------------------------------------------- one unit


def _check_images(images, n: int) -> torch.Tensor:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[0] != n or images.shape[1] != 3:
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        dtype = images.dtype if torch.is_tensor(images) else None
        raise ValueError(f"sample_fn must return uint8 images [{n}, 3, H, W]; got {got} {dtype}")
    return images


def run_unit(sample_fn: SampleFn, inception: InceptionFeatures, start: int, stop: int, *,
             labels: torch.Tensor, seed: int, batch_size: int, keep_pool: bool, keep_logits: bool,
             save_png_dir: str | None = None, npz_parts_dir: str | None = None,
             extractors: dict | None = None, keep_space: bool = False) -> SpaceFeatureSet:
    """Sample and featurise indices [start, stop) in batches of batch_size (Inception, plus every
    space of `extractors`; their per-sample features too with keep_space, for MIND)."""
    pools, logits, images_all = [], [], []
    fs = SpaceFeatureSet()
    for b0 in range(start, stop, batch_size):
        idx = torch.arange(b0, min(b0 + batch_size, stop))
        images = _check_images(sample_fn(labels[idx].clone(), sample_seeds(seed, idx)), len(idx))
        out = inception(images)
        fs.pool.update(out["pool"])
        fs.spatial.update(out["spatial"])
        for name, extractor in (extractors or {}).items():
            fs.update_space(name, extractor(images), keep_space)
        if keep_pool:
            pools.append(out["pool"].float().cpu())
        if keep_logits and "logits" in out:
            logits.append(out["logits"].float().cpu())
        if save_png_dir or npz_parts_dir:
            images = images.cpu()
            if save_png_dir:
                _save_pngs(images, idx, save_png_dir)
            if npz_parts_dir:
                images_all.append(images.permute(0, 2, 3, 1).numpy())
    if npz_parts_dir:
        # written before the unit's progress file, so a finished unit always has its shard
        tmp = Path(npz_parts_dir) / f".{start:09d}.npz.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, images=np.concatenate(images_all), labels=labels[start:stop].numpy())
        os.replace(tmp, Path(npz_parts_dir) / f"{start:09d}.npz")
    fs.pool_features = torch.cat(pools) if pools else None
    fs.logits = torch.cat(logits) if logits else None
    return fs


def _save_pngs(images: torch.Tensor, idx: torch.Tensor, folder: str) -> None:
    from PIL import Image

    for img, i in zip(images.permute(0, 2, 3, 1).numpy(), idx.tolist()):
        Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.png"))


# ----------------------------------------------------------------------------- progress folder


def _unit_path(progress_dir: str, unit: tuple[int, int]) -> Path:
    return Path(progress_dir) / f"unit_{unit[0]:09d}_{unit[1]:09d}.pt"


def _save_unit(progress_dir: str, unit: tuple[int, int], fs: FeatureSet) -> None:
    path = _unit_path(progress_dir, unit)
    tmp = path.with_suffix(".tmp")
    torch.save(fs.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: a killed write never leaves a half unit behind


def _load_unit(progress_dir: str, unit: tuple[int, int], spaces) -> SpaceFeatureSet:
    """A finished unit's features; refused when they hold other feature spaces than `spaces` (names)."""
    fs = SpaceFeatureSet.from_state_dict(torch.load(_unit_path(progress_dir, unit), weights_only=True))
    if set(fs.spaces) != set(spaces):
        raise ProgressMismatchError(f"work unit {unit} in {progress_dir} has features of spaces "
                                    f"{sorted(fs.spaces)}, this evaluation needs {sorted(spaces)}")
    return fs


PROGRESS_META = "evaluation.json"
_MISSING = "<not recorded>"


class ProgressMismatchError(ValueError):
    """A progress folder holds work units of an evaluation with another sampling specification."""


def progress_meta(*, num_samples: int, unit_size: int, seed: int, label_sampling: str, num_classes: int,
                  spec: dict | None = None) -> dict:
    """Everything a progress folder's units depend on: the engine's split plus the caller's `spec`
    (checkpoint identity, sampler, guidance, reference, ...), as JSON-comparable values."""
    meta = dict(num_samples=num_samples, unit_size=unit_size, seed=seed, label_sampling=label_sampling,
                num_classes=num_classes)
    for key, value in (spec or {}).items():
        if key in meta and meta[key] != value:
            raise ValueError(f"sampling spec key {key!r}={value!r} contradicts the engine's {meta[key]!r}")
        meta[key] = value
    return json.loads(json.dumps(meta, default=str))  # tuples -> lists etc., as they read back


def _diff(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, stored, requested) of every leaf that differs; a dict against a non-dict is one leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k, _MISSING), new.get(k, _MISSING), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_progress(progress_dir: str, meta: dict) -> None:
    """Claim progress_dir for the evaluation described by `meta` (see progress_meta), or refuse.

    Work units are reused only when every key matches what the folder recorded when it was first
    used: features sampled with another checkpoint or sampler must never be scored as this one.
    """
    folder = Path(progress_dir)
    path = folder / PROGRESS_META
    if path.exists():
        diffs = _diff(json.loads(path.read_text()), meta)
        if diffs:
            shown = "; ".join(f"{k}: stored {_short(a)}, now {_short(b)}" for k, a, b in diffs[:6])
            more = f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""
            raise ProgressMismatchError(
                f"progress folder {progress_dir} holds work units of another evaluation "
                f"(differing: {', '.join(k for k, _, _ in diffs)}; {shown}{more}); write to a fresh output "
                f"folder (--output DIR) or delete {progress_dir} to start over")
        return
    if any(folder.glob("unit_*.pt")):
        raise ProgressMismatchError(
            f"progress folder {progress_dir} holds work units but no {PROGRESS_META} saying how they were "
            f"sampled; write to a fresh output folder (--output DIR) or delete {progress_dir} to start over")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PROGRESS_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, path)


def claim_progress(progress_dir: str, meta: dict, rank: int = 0, world_size: int = 1) -> None:
    """check_progress on rank 0, its verdict on every rank (all ranks raise together, none hangs)."""
    distributed = _dist_info(rank, world_size)
    refusal = None
    if rank == 0:
        try:
            check_progress(progress_dir, meta)
        except ProgressMismatchError as exc:
            refusal = str(exc)
    refusal = _broadcast(refusal, distributed)
    if refusal:
        raise ProgressMismatchError(refusal)


# ----------------------------------------------------------------------------- distributed engine


def _dist_info(rank, world_size):
    if dist.is_available() and dist.is_initialized():
        if (rank, world_size) != (dist.get_rank(), dist.get_world_size()):
            raise ValueError(f"rank/world_size ({rank}/{world_size}) disagree with torch.distributed "
                             f"({dist.get_rank()}/{dist.get_world_size()})")
        return True
    if world_size != 1:
        raise ValueError("world_size > 1 needs an initialised torch.distributed process group "
                         "(or use sampling_workers.evaluate_generator_ray)")
    return False


def _broadcast(obj, distributed: bool):
    if not distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def collect_generator_features(sample_fn: SampleFn, *, num_samples: int, batch_size: int,
                               label_sampling: str = "equal", num_classes: int, seed: int,
                               rank: int = 0, world_size: int = 1, inception: InceptionFeatures | None = None,
                               unit_size: int = 1000, keep_pool: bool = False, keep_logits: bool = True,
                               progress_dir: str | None = None, save_png_dir: str | None = None,
                               save_npz: str | None = None, spec: dict | None = None,
                               extractors: dict | None = None, keep_space: bool = False) -> SpaceFeatureSet:
    """Sample num_samples images across ranks and return the summed features on every rank.

    Per-sample pool features / logits / space features (if kept) are gathered to rank 0 only, in
    index order. `extractors` ({space: SpaceExtractor}) featurise the same images in more spaces.
    `spec` describes how sample_fn samples (checkpoint identity, sampler, guidance, spaces, ...):
    finished units in progress_dir are reused only when it matches the spec they were sampled with.
    """
    distributed = _dist_info(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inception = inception or build_inception()
    keep_logits = keep_logits and inception.has_logits
    labels = sample_labels(num_samples, num_classes, seed, label_sampling)
    units = work_units(num_samples, unit_size)
    npz_parts = f"{save_npz}.parts" if save_npz else None
    if progress_dir:  # before anything is written: a refused folder stays as it was
        claim_progress(progress_dir, progress_meta(num_samples=num_samples, unit_size=unit_size, seed=seed,
                                                   label_sampling=label_sampling, num_classes=num_classes,
                                                   spec=spec), rank, world_size)
    for folder in (save_png_dir, npz_parts):
        if folder and rank == 0:
            os.makedirs(folder, exist_ok=True)

    # rank 0 decides which units are finished, so all ranks agree on the split
    done = []
    if rank == 0 and progress_dir:
        done = [u for u in units if _unit_path(progress_dir, u).exists()]
    done = _broadcast(done, distributed)
    pending = [u for u in units if u not in set(done)]
    if done:
        logger.info("resuming: %d of %d units already finished in %s", len(done), len(units), progress_dir)

    extractors = extractors or {}
    # every rank holds every space's accumulator, even with no unit of its own: the all-reduce must match
    total = SpaceFeatureSet(resumed_units=len(done),
                            spaces={k: MomentAccumulator(e.dim) for k, e in extractors.items()})
    kept: list[tuple] = []  # (start, pool features, logits, space features) per unit, without the moments
    for unit in done[rank::world_size]:
        fs = _load_unit(progress_dir, unit, extractors)
        total.merge(fs.moments_only())
        kept.append((unit[0], fs.pool_features, fs.logits, fs.space_features))
    mine = pending[rank::world_size]
    t0 = time.perf_counter()
    bar = tqdm(mine, desc=f"sampling (rank {rank})", disable=not sys.stderr.isatty())
    for unit in bar:
        fs = run_unit(sample_fn, inception, *unit, labels=labels, seed=seed, batch_size=batch_size,
                      keep_pool=keep_pool, keep_logits=keep_logits, save_png_dir=save_png_dir,
                      npz_parts_dir=npz_parts, extractors=extractors, keep_space=keep_space)
        if progress_dir:
            _save_unit(progress_dir, unit, fs)
        total.merge(fs.moments_only())
        kept.append((unit[0], fs.pool_features, fs.logits, fs.space_features))
    n_mine = sum(b - a for a, b in mine)
    logger.info("rank %d: %d samples in %.1f s", rank, n_mine, time.perf_counter() - t0)

    # moments: exact integer all-reduce (gloo on CPU, NCCL on the GPU)
    reduce_device = "cuda" if distributed and dist.get_backend() == "nccl" else "cpu"
    for acc in (total.pool, total.spatial, *(total.spaces[k] for k in sorted(total.spaces))):
        acc.sum, acc.outer = acc.sum.to(reduce_device), acc.outer.to(reduce_device)
        acc.all_reduce()
        acc.sum, acc.outer = acc.sum.cpu(), acc.outer.cpu()

    if keep_pool or keep_logits or keep_space:
        parts = kept
        if distributed:
            gathered = [None] * world_size if rank == 0 else None
            dist.gather_object(parts, gathered, dst=0)
            parts = [p for g in gathered for p in g] if rank == 0 else []
        parts.sort(key=lambda p: p[0])
        if parts:
            total.pool_features = _cat_all([p[1] for p in parts])
            total.logits = _cat_all([p[2] for p in parts])
            if keep_space:
                total.space_features = {k: _cat_all([p[3].get(k) for p in parts]) for k in extractors}

    if save_npz:
        if distributed:
            dist.barrier()
        if rank == 0:
            from rae_scale.eval.reference import write_npz_from_parts

            write_npz_from_parts(save_npz, [Path(npz_parts) / f"{u[0]:09d}.npz" for u in units])
    return total


def _cat_all(tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.cat(tensors) if tensors else None


def compute_metrics(features: FeatureSet, reference=None, *, compute_pr: bool = False,
                    is_split_size: int = 5000, device="cpu", spaces=None, space_references: dict | None = None,
                    mind: bool = False, mind_seed: int | None = None) -> dict:
    """FID/sFID (vs reference stats), IS (if logits), precision/recall (if asked and possible), and
    with `spaces`: fd_<space>, fd_r_<space>, fd_r_mean (fd_r6 with all six) and mind_<space>."""
    metrics: dict = {"num_samples": features.count}
    if reference is not None:
        mu, sigma = features.pool.stats()
        mu_s, sigma_s = features.spatial.stats()
        metrics["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma, device=device)
        if reference.mu_s is not None:
            metrics["sfid"] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s, device=device)
    if features.logits is not None:
        metrics["inception_score"] = inception_score(features.logits, split_size=is_split_size)
    if compute_pr:
        if reference is None or reference.pool_features is None or features.pool_features is None:
            raise ValueError("precision/recall needs the reference images' pool features (arr_0 of the "
                             "reference npz) and the samples' pool features")
        metrics["precision"], metrics["recall"] = precision_recall(
            torch.as_tensor(reference.pool_features), features.pool_features, device=device)
    if spaces and (reference is not None or space_references):
        metrics.update(space_metrics(features, reference, space_references or {}, spaces, mind=mind,
                                     mind_seed=mind_seed, device=device))
    return metrics


def space_metrics(features: FeatureSet, reference, space_references: dict, spaces, *, mind: bool = False,
                  mind_seed: int | None = None, device="cpu") -> dict:
    """FD per space (the Inception space is FID's pool3), FD_r per space and their mean, MIND per space."""
    from rae_scale.eval.mind import MIND_SEED, mind as mind_distance
    from rae_scale.eval.spaces import fd_ratios

    fd, minds = {}, {}
    for space in spaces:
        if space == "inception":
            if reference is None:
                raise ValueError("the inception space needs the reference's Inception statistics")
            (mu, sigma), ref = features.pool.stats(), reference
            gen_feats, ref_feats = features.pool_features, reference.pool_features
        else:
            if space not in space_references or space not in getattr(features, "spaces", {}):
                raise ValueError(f"feature space {space!r}: no features or no reference for it")
            (mu, sigma), ref = features.spaces[space].stats(), space_references[space]
            gen_feats, ref_feats = features.space_features.get(space), ref.features
        fd[space] = frechet_distance(mu, sigma, ref.mu, ref.sigma, device=device)
        if mind:
            if gen_feats is None or ref_feats is None:
                raise ValueError(f"MIND in space {space!r} needs per-sample features of the samples and of the "
                                 "reference images (the reference must hold images, not only statistics)")
            minds[f"mind_{space}"] = mind_distance(gen_feats, ref_feats, device=device,
                                                   seed=MIND_SEED if mind_seed is None else mind_seed)
    return {**{f"fd_{s}": v for s, v in fd.items()}, **fd_ratios(fd), **minds}


def evaluate_generator(sample_fn: SampleFn, *, num_samples: int, batch_size: int, label_sampling: str = "equal",
                       num_classes: int, seed: int, rank: int = 0, world_size: int = 1,
                       progress_dir: str | None = None, save_png_dir: str | None = None,
                       save_npz: str | None = None, inception: InceptionFeatures | None = None,
                       reference=None, compute_pr: bool = False, unit_size: int = 1000,
                       results_path: str | None = None, metadata: dict | None = None,
                       spec: dict | None = None, spaces=None, extractors: dict | None = None,
                       space_references: dict | None = None, mind: bool = False, mind_seed: int | None = None,
                       reference_cache_dir=None) -> dict:
    """Generate, featurise and score num_samples images over all ranks; same dict on every rank.

    `reference`: a ReferenceStats or a path to an ADM reference npz, image folder or MDS (for
    FID/sFID/P&R, and for the other spaces' moments and MIND, computed from its images and cached).
    `spaces` (names of eval.spaces.SPACES) adds FD / FD_r / MIND per space; `extractors` are their
    networks (built from the local Hugging Face cache when not given). `spec`: how sample_fn samples
    (see collect_generator_features); a progress folder of another spec is refused before anything
    is loaded. Writes a results JSON (metrics, engine settings, the spec and `metadata`, e.g. the
    config) to results_path, or to progress_dir/results.json.
    """
    from rae_scale.eval.reference import ReferenceStats, load_reference, load_space_reference

    if spaces is not None:
        from rae_scale.eval.spaces import parse_spaces

        spaces = parse_spaces(spaces)
        if "spaces" not in (spec or {}):  # units hold features of these spaces: part of what they depend on
            spec = {**(spec or {}), "spaces": {"names": list(spaces), "mind": mind}}
    if progress_dir:
        claim_progress(progress_dir, progress_meta(num_samples=num_samples, unit_size=unit_size, seed=seed,
                                                   label_sampling=label_sampling, num_classes=num_classes,
                                                   spec=spec), rank, world_size)
    inception = inception or build_inception()
    if spaces is not None:
        from rae_scale.eval.spaces import build_extractors, parse_spaces

        spaces = parse_spaces(spaces)
        if extractors is None:
            extractors = build_extractors(spaces, device=next(inception.buffers()).device)
    extractors = {k: v for k, v in (extractors or {}).items() if k in (spaces or ())}
    keep_pool = compute_pr or (mind and "inception" in (spaces or ()))
    source, space_references, failure = reference, dict(space_references or {}), None
    if rank == 0:  # rank 0 scores; its refusal stops every rank before any sampling (none waits forever)
        try:
            if reference is not None and not isinstance(reference, ReferenceStats):
                reference = load_reference(reference, inception=inception, keep_pool_features=keep_pool,
                                           cache_dir=reference_cache_dir)
            for name, extractor in extractors.items():
                if reference is None or name in space_references:
                    continue
                if isinstance(source, ReferenceStats):
                    raise ValueError(f"feature space {name!r} needs reference images or its own statistics "
                                     "(space_references); a ReferenceStats holds only Inception statistics")
                space_references[name] = load_space_reference(source, extractor, keep_features=mind,
                                                              cache_dir=reference_cache_dir)
        except (ValueError, FileNotFoundError) as exc:
            failure = (type(exc) is FileNotFoundError, str(exc))
    elif not isinstance(reference, ReferenceStats):
        reference = None
    failure = _broadcast(failure, _dist_info(rank, world_size))
    if failure:
        raise (FileNotFoundError if failure[0] else ValueError)(failure[1])
    features = collect_generator_features(
        sample_fn, num_samples=num_samples, batch_size=batch_size, label_sampling=label_sampling,
        num_classes=num_classes, seed=seed, rank=rank, world_size=world_size, inception=inception,
        unit_size=unit_size, keep_pool=keep_pool, keep_logits=True, progress_dir=progress_dir,
        save_png_dir=save_png_dir, save_npz=save_npz, spec=spec, extractors=extractors, keep_space=mind)
    distributed = _dist_info(rank, world_size)
    metrics = None
    if rank == 0:
        metrics = compute_metrics(features, reference, compute_pr=compute_pr, spaces=spaces,
                                  space_references=space_references, mind=mind, mind_seed=mind_seed)
        settings = dict(num_samples=num_samples, batch_size=batch_size, label_sampling=label_sampling,
                        num_classes=num_classes, seed=seed, world_size=world_size, unit_size=unit_size,
                        resumed_units=features.resumed_units)
        if spaces is not None:
            from rae_scale.eval.mind import MIND_SEED

            settings.update(spaces=list(spaces), mind=mind, mind_seed=MIND_SEED if mind_seed is None else mind_seed)
        write_results(results_path or (os.path.join(progress_dir, "results.json") if progress_dir else None),
                      metrics, settings, metadata, spec)
    return _broadcast(metrics, distributed)


def write_results(path, metrics: dict, settings: dict, metadata: dict | None, spec: dict | None = None) -> None:
    """Results JSON: metrics, engine settings, the sampling spec that produced the samples (checkpoint
    identity, sampler, guidance, ...) and caller metadata (config, ...)."""
    logger.info("evaluation: %s", metrics)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        doc = {"metrics": metrics, "sampler": settings, "spec": spec or {}, "metadata": metadata or {}}
        Path(path).write_text(json.dumps(doc, indent=1, default=str))
