"""Newton-Schulz orthogonalisation for Muon, as RAEv2's "gmuon" runs it.

A matrix's update is replaced by an approximation of the orthogonal factor of its polar
decomposition (U V^T of its SVD) through 5 odd-polynomial iterations X <- aX + (bA + cA^2) X with
A = X X^T and the Polar-Express coefficients (arXiv 2505.16932), in fp16.

Wide matrices (rows < cols after the transpose rule) use Gram Newton-Schulz: it iterates on the
small rows x rows Gram matrix R = X X^T and accumulates the polynomial Q with X_k = Q X_0, touching
the wide X only at a restart and at the end; a restart (iteration 2 by default) folds Q into X and
recomputes R, which keeps the half-precision Gram iteration stable. Square matrices use the
standard iteration (no saving to be had).

CPUs without native half-precision GEMM (most x86 parts) run fp16 matmuls 30-50x slower than fp32
through a reference kernel. So on CPU, by default, every product is computed in fp32 from the
fp16 operands and rounded back to fp16 once, as the fp16 kernels do (they accumulate in fp32 too):
every intermediate keeps its fp16 rounding, at fp32 speed; only the summation order differs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

Coefficients = tuple[tuple[float, float, float], ...]  # (a, b, c) per iteration

# Polar-Express degree-5 coefficients (a, b, c) per iteration, before the safety factor.
POLAR_EXPRESS_UNSCALED: Coefficients = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
)
# gram-newton-schulz (the package gmuon forks) divides by (f, f^3, f^5) with f = 1.05 since
# 2026-03-27 (1.01 before); RAEv2's fork is not public, the fixture's coefficients use 1.05.
POLAR_EXPRESS_SAFETY_FACTOR = 1.05
DEFAULT_RESTART_ITERATIONS: tuple[int, ...] = (2,)
NORM_EPSILON = 1e-7
COMPUTE_DTYPE = torch.float16


def polar_express_coefficients(safety_factor: float = POLAR_EXPRESS_SAFETY_FACTOR) -> Coefficients:
    """The Polar-Express (a, b, c) per iteration, scaled by (1/f, 1/f^3, 1/f^5) for a safety margin f."""
    if isinstance(safety_factor, bool) or not isinstance(safety_factor, (int, float)) or not safety_factor >= 1.0:
        raise ValueError(f"Polar-Express safety_factor={safety_factor!r} must be >= 1 (1.05 is gmuon's)")
    f = float(safety_factor)
    return tuple((a / f, b / f**3, c / f**5) for a, b, c in POLAR_EXPRESS_UNSCALED)


POLAR_EXPRESS_COEFFICIENTS = polar_express_coefficients()


def check_coefficients(coefficients: Sequence[Sequence[float]]) -> Coefficients:
    """The coefficients as a tuple of float triples; a clear error for anything else."""
    try:
        out = tuple(tuple(float(v) for v in abc) for abc in coefficients)
    except TypeError as exc:
        raise ValueError(f"ns_coefficients must be a sequence of (a, b, c) number triples, "
                         f"got {coefficients!r}") from exc
    if not out or any(len(abc) != 3 for abc in out):
        raise ValueError(f"ns_coefficients must be a non-empty sequence of (a, b, c) triples, got {coefficients!r}")
    return out


def check_restarts(restart_iterations: Sequence[int], num_iterations: int) -> tuple[int, ...]:
    """Sorted restart iterations; each must lie in 1 .. num_iterations - 1 (a restart at 0 means nothing)."""
    out = tuple(sorted(set(restart_iterations)))
    if any(not isinstance(i, int) or isinstance(i, bool) or not 1 <= i < num_iterations for i in out):
        raise ValueError(f"ns_restart_iterations={list(restart_iterations)!r}: each must be an integer in "
                         f"1..{num_iterations - 1} (iterations are counted from 0; gmuon restarts at 2)")
    return out


class _HalfMatmul:
    """Batched products in the compute dtype: native kernels, or (emulate=True, CPU only) fp32 products of
    the half-precision operands rounded back, one rounding per product as the native kernels do."""

    def __init__(self, x: torch.Tensor, emulate: bool) -> None:
        self.emulate = emulate and x.device.type == "cpu"

    def bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.emulate:
            return torch.bmm(a.float(), b.float()).to(a.dtype)
        return torch.bmm(a, b)

    def baddbmm(self, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1.0,
                alpha: float = 1.0) -> torch.Tensor:
        """beta * c + alpha * (a @ b)."""
        if self.emulate:
            return torch.baddbmm(c.float(), a.float(), b.float(), beta=beta, alpha=alpha).to(c.dtype)
        return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)


def _standard_iterations(x: torch.Tensor, coefficients, mm: _HalfMatmul) -> torch.Tensor:
    for a, b, c in coefficients:
        gram = mm.bmm(x, x.mT)
        poly = mm.baddbmm(gram, gram, gram, beta=b, alpha=c)  # bA + cA^2
        x = mm.baddbmm(x, poly, x, beta=a)  # aX + (bA + cA^2) X
    return x


def _gram_iterations(x: torch.Tensor, coefficients, restarts: tuple[int, ...], mm: _HalfMatmul) -> torch.Tensor:
    """Wide x (rows < cols): iterate on R = X X^T, carry X_k = Q X_0; restarts fold Q into X."""
    gram = mm.bmm(x, x.mT)
    eye = torch.eye(gram.size(-1), dtype=x.dtype, device=x.device).expand_as(gram)
    last = len(coefficients) - 1
    q = None
    for i, (a, b, c) in enumerate(coefficients):
        fresh = i == 0 or i in restarts
        if i in restarts:
            x = mm.bmm(q, x)
            gram = mm.bmm(x, x.mT)
        z = mm.baddbmm(gram, gram, gram, beta=b, alpha=c)  # bR + cR^2: this iteration's polynomial minus a
        # Q, Z and R are polynomials in the same R, so they commute and Q (a + Z) = a Q + Q Z.
        q = z + a * eye if fresh else mm.baddbmm(q, q, z, beta=a)
        if i < last and i + 1 not in restarts:
            # the next iteration's Gram matrix: (a + Z) R (a + Z)
            rz = mm.baddbmm(gram, gram, z, beta=a)
            gram = mm.baddbmm(rz, z, rz, beta=a)
    return mm.bmm(q, x)


def orthogonalize(matrices: torch.Tensor, coefficients=POLAR_EXPRESS_COEFFICIENTS,
                  restart_iterations: Sequence[int] = DEFAULT_RESTART_ITERATIONS,
                  eps: float = NORM_EPSILON, emulate_half_on_cpu: bool = True) -> torch.Tensor:
    """Orthogonalise a (rows, cols) matrix or a (batch, rows, cols) stack; same shape and dtype back.

    Steps (gmuon): to fp32; transpose when rows > cols; divide each matrix by (Frobenius norm + eps);
    to fp16; the iterations (Gram for rows != cols, standard for square); transpose back; to the
    input dtype. Each matrix's result depends only on that matrix. emulate_half_on_cpu=False uses
    the CPU's native fp16 kernels (bit-identical to gmuon on CPU, 30-50x slower on CPUs without fp16
    GEMM); the emulation differs from them only in fp32 summation order (about 1e-3 of the update).
    """
    if matrices.ndim not in (2, 3):
        raise ValueError(f"orthogonalize takes a matrix or a batch of matrices (2-D or 3-D), got shape "
                         f"{tuple(matrices.shape)}")
    coefficients = check_coefficients(coefficients)
    restarts = check_restarts(restart_iterations, len(coefficients))
    single = matrices.ndim == 2
    x = matrices.unsqueeze(0) if single else matrices
    out_dtype = x.dtype
    x = x.to(torch.float32)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + eps)).to(COMPUTE_DTYPE)
    mm = _HalfMatmul(x, emulate_half_on_cpu)
    if x.size(-2) < x.size(-1):
        x = _gram_iterations(x, coefficients, restarts, mm)
    else:
        x = _standard_iterations(x, coefficients, mm)
    if transposed:
        x = x.mT
    x = x.to(out_dtype)
    return x.squeeze(0) if single else x
