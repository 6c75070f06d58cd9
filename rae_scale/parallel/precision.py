"""Precision settings: fp32 or bf16 compute (fp32 master weights and reductions), and TF32 on/off."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    return precision


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """torch.autocast to bf16 for 'bf16', a no-op for 'fp32'.

    Parameters stay fp32 (the master copy); autocast only lowers the compute of matmul-like ops.
    """
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 tensor-core math for fp32 matmuls and convolutions on CUDA.

    TF32 keeps fp32 range with a 10-bit mantissa: ~2x faster fp32 matmuls on Ampere+, at a
    precision cost that equivalence tests should not pay, hence a switch.
    """
    # "high" lets fp32 matmuls use TF32; "highest" forbids it (the stable public switch)
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
