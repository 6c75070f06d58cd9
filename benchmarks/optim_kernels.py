"""One AdamW step with torch's fused kernel against the foreach kernel (issue 23), same process.

The parameter set is a DiT-DH-S-like list of tensors (linear weights and biases, norms) of about
`--millions` M parameters, with fixed random gradients. Both optimizers step the same values; the
baseline is foreach (what the platform built before `optimizer.implementation=auto`). Printed: the
median step time of each kernel over `--steps` timed steps (after two warm-up steps) and the ratio
foreach / fused, plus the largest parameter difference after the run (rounding only).

    PYTHONPATH=. .venv/bin/python benchmarks/optim_kernels.py [--millions 6.6 --steps 20 --threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from rae_scale.optim.adamw import kernel_kwargs


def shapes(millions: float, width: int = 384) -> list[tuple[int, ...]]:
    """Transformer-block-like shapes (qkv, proj, two MLP matrices, biases, norms) up to the parameter budget."""
    out, total = [], 0
    while total < millions * 1e6:
        for s in ((3 * width, width), (3 * width,), (width, width), (width,), (4 * width, width), (4 * width,),
                  (width, 4 * width), (width,), (width,), (width,)):
            out.append(s)
            total += torch.Size(s).numel()
    return out


def timed_steps(implementation: str, params0, grads, steps: int) -> tuple[float, list[torch.Tensor]]:
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kernel_kwargs(implementation, params))
    for p, g in zip(params, grads):
        p.grad = g
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), [p.detach() for p in params]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--millions", type=float, default=6.6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    params0 = [torch.randn(s, generator=g) for s in shapes(args.millions)]
    grads = [torch.randn(s, generator=g) * 1e-2 for s in shapes(args.millions)]
    n = sum(p.numel() for p in params0)
    base, p_base = timed_steps("foreach", params0, grads, args.steps)
    fused, p_fused = timed_steps("fused", params0, grads, args.steps)
    diff = max((a - b).abs().max().item() for a, b in zip(p_base, p_fused))
    print(f"{len(params0)} tensors, {n / 1e6:.2f} M parameters, {args.steps} timed steps, {args.threads} threads")
    print(f"foreach (baseline): {base * 1e3:.2f} ms/step")
    print(f"fused:              {fused * 1e3:.2f} ms/step")
    print(f"ratio foreach / fused: {base / fused:.2f}x; largest parameter difference {diff:.2e}")


if __name__ == "__main__":
    main()
