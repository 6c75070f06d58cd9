"""Latent-cache reads: fp32 with both flips read whole (the old reader) vs bf16 reading one flip variant.

Writes two caches of the same random latents (`--samples` samples of C x h x w, both flip variants)
in the cache's own MDS layout, one fp32 and one bf16, then reads each once through
`build_latent_loader` (warm page cache: both are read once before timing) and prints the bytes a
sample costs to read and the loader's samples/s, as ratios against the fp32 baseline in the same
process. The bytes are the sliced column bytes (plus label and index), not a page-cache measurement.

    PYTHONPATH=. .venv/bin/python benchmarks/latent_reads.py [--samples 512 --shape 768,16,16 --batch 32]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from rae_scale.data import schema
from rae_scale.data.latents import tensor_to_stored
from rae_scale.data.loader import build_latent_loader


def write_cache(root: str, latents: torch.Tensor, dtype: str) -> str:
    from streaming import MDSWriter

    out = os.path.join(root, dtype)
    shape = list(latents.shape[2:])
    with MDSWriter(out=out, columns=schema.latent_columns(shape, dtype, both_flips=True),
                   size_limit=1 << 26) as writer:
        for i, pair in enumerate(latents):
            writer.write({"latent": tensor_to_stored(pair[0], dtype), "latent_flip": tensor_to_stored(pair[1], dtype),
                          "label": i % 10, "index": i})
    schema.write_json(os.path.join(out, schema.LATENT_META),
                      {"dtype": dtype, "shape": shape, "both_flips": True, "num_samples": len(latents), "source": ""})
    return out


def read_all(url: str, batch: int, select: bool) -> tuple[float, int]:
    loader = build_latent_loader(url, batch_size=batch, seed=0, hflip=True, select_variant=select)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--shape", default="768,16,16")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    latents = torch.randn((args.samples, 2, *shape), generator=torch.Generator().manual_seed(0))
    per_variant = {"fp32": 4 * int(np.prod(shape)), "bf16": 2 * int(np.prod(shape))}
    small = 16  # label and index: two 8-byte ints
    with tempfile.TemporaryDirectory() as root:
        cases = {"fp32, both variants read (baseline)": (write_cache(root, latents, "fp32"), False, "fp32", 2),
                 "bf16, one variant read": (write_cache(root, latents, "bf16"), True, "bf16", 1)}
        for url, select, _, _ in cases.values():
            read_all(url, args.batch, select)  # warm the page cache
        results = {}
        for name, (url, select, dtype, variants) in cases.items():
            seconds, n = read_all(url, args.batch, select)
            results[name] = (variants * per_variant[dtype] + small, n / seconds)
    print(f"{args.samples} samples of {shape}, batch {args.batch}, one process (num_workers 0)")
    base_bytes, base_rate = next(iter(results.values()))
    for name, (nbytes, rate) in results.items():
        print(f"{name}: {nbytes:,} bytes read per sample ({base_bytes / nbytes:.2f}x fewer), "
              f"{rate:.0f} samples/s ({rate / base_rate:.2f}x)")


if __name__ == "__main__":
    main()
