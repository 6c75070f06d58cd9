"""Capture and restore every RNG a rank uses (python, numpy, torch CPU, CUDA).

States are tensors and plain Python values only (tuples included), which the per-rank file format
(rank_state.py: JSON + tensors, read with ``torch.load(weights_only=True)``) stores exactly.
"""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def get_rng_state() -> dict[str, Any]:
    """A snapshot of this process's RNG states."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    # only touch CUDA when this process already uses it (querying would initialise a context)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot from get_rng_state()."""
    py = state["python"]
    # files of the earlier format turned the inner tuple into a list; random.setstate wants tuples
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d: "
                           "CUDA RNG not restored", len(cuda), torch.cuda.device_count())
