"""Rank workers for the data-loader resume tests (spawned by conftest.run_ranks)."""
from __future__ import annotations

import gc

import torch


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, float]]:
    """Per-sample (label, position-weighted pixel sum): identifies the image and its flip."""
    w = torch.arange(images[0].numel(), dtype=torch.float64).remainder_(97).add_(1)
    sums = (images.flatten(1).double() * w).sum(1)
    return [(int(y), round(float(s), 6)) for y, s in zip(labels, sums)]


def _collect(loader, max_batches=None):
    out = []
    for i, (x, y) in enumerate(loader):
        out.append(fingerprint(x, y))
        if max_batches is not None and i + 1 >= max_batches:
            break
    return out


def resume_worker(rank, world_size, url, stop_after, batch_size, seed=7):
    """Returns (uninterrupted epochs 0+1, batches before stop, batches after resume, saved state)."""
    from rae_scale.data import build_image_loader

    def make():
        return build_image_loader(url, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                  hflip=True)

    loader = make()
    full = _collect(loader) + _collect(loader)  # epoch 0 then epoch 1
    del loader
    gc.collect()

    loader = make()
    _collect(loader)  # epoch 0: the loader now stands at the start of epoch 1
    before = _collect(loader, stop_after)
    state = loader.state_dict()
    del loader
    gc.collect()

    resumed = make()
    resumed.load_state_dict(state)
    after = _collect(resumed)
    del resumed
    gc.collect()
    return full, before, after, state


def _mixture_ids(loader, n_batches):
    out = []
    while len(out) < n_batches:
        for _, _, ids in loader:
            out.append(ids.tolist())
            if len(out) == n_batches:
                break
    return out


def mixture_resume_worker(rank, world_size, specs, stop_after, batch_size, seed=7):
    """A weighted mixture on this rank: (ids of epoch 0 + epoch 1 uninterrupted, ids before the stop in
    epoch 1, ids after resuming from the saved state, that state, source counts)."""
    from rae_scale.data.mixture import build_mixture_loader

    def make():
        return build_mixture_loader(specs, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                    hflip=True, with_ids=True)

    loader = make()
    n = len(loader)
    full = _mixture_ids(loader, 2 * n)
    del loader
    gc.collect()
    loader = make()
    before = _mixture_ids(loader, n + stop_after)[n:]
    state = loader.state_dict()
    del loader
    gc.collect()
    resumed = make()
    resumed.load_state_dict(state)
    after = _mixture_ids(resumed, n - stop_after)
    counts = resumed.source_counts.tolist()
    del resumed
    gc.collect()
    return full, before, after, state, counts
