"""Measured activation model: what autograd keeps for backward, per sample and per transformer block.

A network is run on CPU at tiny widths (real depth, real token count, real head count) with
`torch.autograd.graph.saved_tensors_hooks` recording every tensor autograd saves; each saved storage
is counted once, parameters and buffers are left out (they are weights, not activations), and a
forward pre-hook on every transformer block attributes what is saved while that block runs to it.
Running batch 1 and batch 2 and taking the difference leaves the per-sample bytes (constants such as
autocast's bf16 weight copies drop out). Two widths give each block's bytes as a linear function of
its width (every activation of a block is tokens x a multiple of the width, plus per-head terms that
the fixed head count keeps constant), which is evaluated at the real width: the analytic scaling.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Probe:
    """Per-sample saved bytes: each block's, the rest of the network's, and each block's input."""

    blocks: list[float]
    other: float
    block_inputs: list[float]

    @property
    def total(self) -> float:
        return sum(self.blocks) + self.other


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def saved_bytes(model: nn.Module, blocks: Sequence[nn.Module], run: Callable[[], torch.Tensor]) -> Probe:
    """Run forward + loss once and count the saved-for-backward bytes, by block (not per sample yet)."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: set = set()
    where = {"block": None}
    per_block = [0.0] * len(blocks)
    inputs = [0.0] * len(blocks)
    other = [0.0]

    def pack(t):
        if t.device.type != "meta" and t.untyped_storage().data_ptr() not in weights:
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                i = where["block"]
                if i is None:
                    other[0] += key[1]
                else:
                    per_block[i] += key[1]
        return t

    def enter(i):
        def hook(module, args, kwargs):
            where["block"] = i
            # the block's own tensor inputs: what a checkpointed block keeps alive
            inputs[i] = float(sum(a.untyped_storage().nbytes() for a in (*args, *kwargs.values())
                                  if isinstance(a, torch.Tensor) and a.is_floating_point()))
        return hook

    def leave(module, args, kwargs, output):
        where["block"] = None

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(b.register_forward_hook(leave, with_kwargs=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        del out
    finally:
        for h in handles:
            h.remove()
    return Probe(per_block, other[0], inputs)


def per_sample(measure: Callable[[int], Probe]) -> Probe:
    """measure(batch) at batch 2 minus batch 1: the bytes one more sample costs."""
    one, two = measure(1), measure(2)
    return Probe([b - a for a, b in zip(one.blocks, two.blocks)], two.other - one.other,
                 [b - a for a, b in zip(one.block_inputs, two.block_inputs)])


def extrapolate(x1: float, p1: Probe, x2: float, p2: Probe, block_widths: Sequence[tuple[float, float, float]],
                other_width: tuple[float, float, float]) -> Probe:
    """Linear in width: each block's (w1, w2, real) and the rest's, from the two probes."""
    def line(a, b, w):
        w1, w2, real = w
        return a + (b - a) * (real - w1) / (w2 - w1)

    return Probe([line(a, b, w) for a, b, w in zip(p1.blocks, p2.blocks, block_widths)],
                 line(p1.other, p2.other, other_width),
                 [line(a, b, w) for a, b, w in zip(p1.block_inputs, p2.block_inputs, block_widths)])


def compute_context(mode: str):
    """mode fp32 | autocast (bf16 autocast over fp32 weights: DDP) | bf16 (bf16 weights and inputs:
    FSDP2's mixed-precision policy, DeepSpeed's bf16 module)."""
    if mode == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def input_dtype(mode: str) -> torch.dtype:
    return torch.bfloat16 if mode == "bf16" else torch.float32
