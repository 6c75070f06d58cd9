"""Sampling + featurisation throughput on 1 vs 2 gloo workers (1 thread each), same samples.

The 'generator' is the toy per-seed noise sampler of the tests; the cost is the Inception.

    PYTHONPATH=.:tests:tests/distributed .venv/bin/python benchmarks/eval_scaling.py [--samples 8]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "distributed")]

import torch  # noqa: E402

from conftest import run_ranks  # noqa: E402


def worker(rank, world_size, samples):
    import _workers_eval as W
    from rae_scale.eval.features import collect_generator_features
    from rae_scale.eval.inception import build_inception

    inception = build_inception()
    torch.distributed.barrier()
    t = time.perf_counter()
    collect_generator_features(W.toy_sample_fn, num_samples=samples, batch_size=2, num_classes=10, seed=0,
                               rank=rank, world_size=world_size, unit_size=2, inception=inception)
    torch.distributed.barrier()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=8)
    args = p.parse_args()
    t1 = max(run_ranks(worker, 1, args.samples, timeout=3600))
    t2 = max(run_ranks(worker, 2, args.samples, timeout=3600))
    print(f"samples={args.samples}")
    print(f"1 worker (baseline): {args.samples / t1:6.2f} img/s")
    print(f"2 workers:           {args.samples / t2:6.2f} img/s  ({t1 / t2:.2f}x)")


if __name__ == "__main__":
    main()
