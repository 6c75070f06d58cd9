"""Rank workers and a toy generator for the evaluation-engine tests (importable by spawned ranks)."""
from __future__ import annotations

import os

import torch

N, BATCH, UNIT, SEED, CLASSES = 6, 2, 2, 7, 3


def toy_sample_fn(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """A deterministic 'generator': per-sample noise from the sample's own seed, tinted by its label."""
    out = []
    for y, s in zip(labels.tolist(), seeds.tolist()):
        g = torch.Generator().manual_seed(s)
        img = torch.rand(3, 8, 8, generator=g) * 160
        img[y % 3] += 90
        out.append(torch.nn.functional.interpolate(img[None], size=32, mode="nearest")[0])
    return torch.stack(out).clamp(0, 255).to(torch.uint8)


def make_toy_sample_fn(device: str):
    return toy_sample_fn


def dying_sample_fn(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Hard-kills the process (no cleanup, like a preemption) when it reaches the second unit."""
    if int(os.environ["EVAL_TEST_DIE_AT"]) <= _calls.setdefault("n", 0):
        os._exit(17)
    _calls["n"] += 1
    return toy_sample_fn(labels, seeds)


_calls: dict = {}


SPACES = ("convnext", "clip")  # feature spaces featurised beside Inception when an extractor folder is given


def collect(rank: int, world_size: int, progress_dir=None, save_npz=None, extractor_dir=None):
    from rae_scale.eval.features import collect_generator_features
    from rae_scale.eval.spaces import build_extractors

    extractors = build_extractors(SPACES, folder=extractor_dir) if extractor_dir else None
    fs = collect_generator_features(toy_sample_fn, num_samples=N, batch_size=BATCH, num_classes=CLASSES,
                                    seed=SEED, rank=rank, world_size=world_size, unit_size=UNIT,
                                    keep_pool=True, progress_dir=progress_dir, save_npz=save_npz,
                                    extractors=extractors, keep_space=extractors is not None)
    return to_numpy(fs.state_dict())


def to_numpy(obj):
    """Tensors -> numpy: torch.multiprocessing would share tensors through a socket that closes with the rank."""
    if isinstance(obj, dict):
        return {k: to_numpy(v) for k, v in obj.items()}
    return obj.numpy() if torch.is_tensor(obj) else obj


def killed_run(progress_dir: str, die_after_batches: int):
    """Entry of a child process that is killed midway through the evaluation."""
    os.environ["EVAL_TEST_DIE_AT"] = str(die_after_batches)
    torch.set_num_threads(1)
    from rae_scale.eval.features import collect_generator_features

    collect_generator_features(dying_sample_fn, num_samples=N, batch_size=BATCH, num_classes=CLASSES,
                               seed=SEED, unit_size=UNIT, keep_pool=True, progress_dir=progress_dir)
