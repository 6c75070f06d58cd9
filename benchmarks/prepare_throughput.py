"""prepare throughput: Ray job vs the single-process decode + ADM crop + JPEG encode loop, same run.

    PYTHONPATH=. .venv/bin/python benchmarks/prepare_throughput.py --images 400 --cpus 2

Parallel efficiency = (single-process time / Ray time) / CPUs. Ray workers are warmed up first (a
small prepare that imports everything), so the figure is steady-state throughput, not start-up.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def single_process_loop(src: Path, resolution: int, quality: int) -> int:
    from data_pipeline.prepare import decode_rgb, encode_image
    from rae_scale.data.transforms import adm_center_crop

    n = 0
    for path in sorted(src.rglob("*.JPEG")):
        img, _, reason = decode_rgb(path.read_bytes())
        if reason is None:
            encode_image(adm_center_crop(img, resolution), "jpeg", quality)
            n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--resolution", type=int, default=256)
    args = ap.parse_args()

    from data_pipeline.images import make_photo_folder
    from data_pipeline.prepare import run_prepare
    from data_pipeline.ray_utils import start_local_ray

    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        make_photo_folder(work / "src", args.images)
        # Enough small warm-up images for several parts per CPU, so every Ray worker has imported
        # its modules (streaming pulls in transformers: seconds per process) before timing.
        make_photo_folder(work / "warm", 16 * 4 * args.cpus, width=64, height=48, seed=1)
        t = time.perf_counter()
        n = single_process_loop(work / "src", args.resolution, 95)
        t_single = time.perf_counter() - t

        start_local_ray(num_cpus=args.cpus)
        run_prepare(input=str(work / "warm"), output=str(work / "warm_out"), resolution=args.resolution)
        t = time.perf_counter()
        m = run_prepare(input=str(work / "src"), output=str(work / "out"), resolution=args.resolution)
        t_ray = time.perf_counter() - t
        assert m["num_samples"] == n == args.images
        speedup = t_single / t_ray
        print(f"images={n} cpus={args.cpus} load_avg_1m={os.getloadavg()[0]:.1f}")
        print(f"single-process loop: {t_single:.2f}s ({n / t_single:.1f} img/s)")
        print(f"ray prepare:         {t_ray:.2f}s ({n / t_ray:.1f} img/s)")
        print(f"speedup {speedup:.2f}x, parallel efficiency {100 * speedup / args.cpus:.0f}%")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
