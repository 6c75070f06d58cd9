"""Fréchet distance at d=2048: our float64 Cholesky/eigvalsh form vs ADM's scipy sqrtm (baseline).

    PYTHONPATH=. .venv/bin/python benchmarks/eval_frechet.py [--dim 2048] [--samples 6000] [--repeats 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from rae_scale.eval.metrics import frechet_distance, frechet_distance_scipy


def relu_stats(rng, n, d, shift):
    w = rng.standard_normal((d, d)) / np.sqrt(d)
    x = np.maximum(rng.standard_normal((n, d)) @ w + shift, 0)
    return x.mean(0), np.cov(x, rowvar=False)


def best_of(fn, repeats):
    times, value = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
    return min(times), value


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--samples", type=int, default=6000)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    a, b = relu_stats(rng, args.samples, args.dim, 0.1), relu_stats(rng, args.samples, args.dim, 0.2)
    t_scipy, ref = best_of(lambda: frechet_distance_scipy(*a, *b), args.repeats)
    t_ours, ours = best_of(lambda: frechet_distance(*a, *b), args.repeats)
    print(f"d={args.dim} n={args.samples} threads={torch.get_num_threads()}")
    print(f"scipy sqrtm (baseline): {t_scipy:8.2f} s  FD={ref:.10f}")
    print(f"ours (cholesky+eigvalsh): {t_ours:8.2f} s  FD={ours:.10f}  rel.diff={abs(ours - ref) / ref:.2e}")
    print(f"speed-up: {t_scipy / t_ours:.1f}x")


if __name__ == "__main__":
    main()
