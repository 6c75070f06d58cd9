"""Activation checkpointing per transformer block: none, every block ("full"), or every k-th block.

Applied before torch.compile and before FSDP (the torchtitan order AC -> compile -> FSDP), so the
recomputation happens inside the block's FSDP pre/post hooks and the sharded parameters are gathered
when the block is recomputed in backward.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

AC_MODES = ("none", "full", "every_k")


def _checkpointed_forward(forward, *args, **kwargs):
    # non-reentrant: works with kwargs, with inputs that do not require grad, and under FSDP2/compile;
    # RNG state is preserved so dropout recomputes the same mask
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def blocks_to_checkpoint(num_blocks: int, mode: str, every: int = 2) -> list[int]:
    """Indices of the blocks that get checkpointed. every_k picks blocks 0, k, 2k, ..."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing={mode!r} is not supported; allowed: {', '.join(AC_MODES)}")
    if mode == "none":
        return []
    if mode == "full":
        return list(range(num_blocks))
    if every < 1:
        raise ValueError(f"ac_every must be >= 1 for activation_checkpointing='every_k', got {every}")
    return list(range(0, num_blocks, every))


def apply_ac(blocks: Iterable[nn.Module], mode: str = "full", every: int = 2) -> list[int]:
    """Make the chosen blocks recompute their activations in backward. Returns the checkpointed indices.

    The block's `forward` is replaced in place (parameter names and state_dict keys do not change,
    unlike a wrapper module), so checkpoints stay interchangeable between AC on and off.
    """
    blocks = list(blocks)
    chosen = blocks_to_checkpoint(len(blocks), mode, every)
    for i in chosen:
        block = blocks[i]
        if getattr(block, "_rae_scale_ac", False):
            continue  # idempotent: never nest checkpoints
        block.forward = functools.partial(_checkpointed_forward, block.forward)
        block._rae_scale_ac = True
    return chosen
