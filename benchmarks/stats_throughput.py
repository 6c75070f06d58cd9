"""stats throughput and agreement with a single-process float64 computation.

    PYTHONPATH=. .venv/bin/python benchmarks/stats_throughput.py --latents 2000 --channels 768

Writes a synthetic fp32 latent cache [N, C, 16, 16] (mean 3, large offset to stress cancellation),
then times run_stats in-process (0 workers) and on Ray with 1 and 2 workers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", type=int, default=2000)
    ap.add_argument("--channels", type=int, default=768)
    ap.add_argument("--per-shard", type=int, default=250)
    args = ap.parse_args()

    from streaming import MDSWriter

    from data_pipeline.ray_utils import start_local_ray
    from data_pipeline.stats import run_stats
    from rae_scale.data import schema

    work = Path(tempfile.mkdtemp(prefix="bench_stats_"))
    shape = [args.channels, 16, 16]
    rng = np.random.default_rng(0)
    try:
        x = (rng.standard_normal((args.latents, *shape), dtype=np.float32) * 2 + 3).astype(np.float32)
        with MDSWriter(out=str(work / "lat"), columns=schema.latent_columns(shape, "fp32", False),
                       size_limit=args.per_shard * 4 * int(np.prod(shape)) + 4096, progress_bar=False) as w:
            for i in range(args.latents):
                w.write({"latent": x[i], "label": 0, "index": i})
        schema.write_json(str(work / "lat" / schema.LATENT_META),
                          {"dtype": "fp32", "shape": shape, "both_flips": False, "num_samples": args.latents})
        x64 = x.astype(np.float64)
        ref_mean, ref_var = x64.mean(0), x64.var(0)
        start_local_ray(num_cpus=2)
        print(f"latents={args.latents} shape={shape} load_avg_1m={os.getloadavg()[0]:.1f}")
        results = {}
        for nw in (0, 1, 2):
            run_stats(input=str(work / "lat"), num_workers=nw) if nw else None  # warm-up actors
            t = time.perf_counter()
            r = run_stats(input=str(work / "lat"), num_workers=nw)
            dt = time.perf_counter() - t
            results[nw] = r
            rel_m = np.abs(r["mean"].numpy() - ref_mean).max() / np.abs(ref_mean).max()
            rel_v = np.abs(r["var"].numpy() / ref_var - 1).max()
            print(f"workers={nw}: {dt:.2f}s ({args.latents / dt:.0f} latents/s, "
                  f"{args.latents * x[0].nbytes / dt / 2**20:.0f} MiB/s); max rel err mean {rel_m:.1e}, var {rel_v:.1e}")
        same = all(np.array_equal(results[1][k].numpy(), results[2][k].numpy()) for k in ("mean", "var"))
        print(f"1 vs 2 workers bit-identical: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
