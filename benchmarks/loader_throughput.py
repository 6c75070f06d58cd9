"""Training-loader throughput: MDS shards vs torchvision ImageFolder + DataLoader on the JPEGs.

    PYTHONPATH=. .venv/bin/python benchmarks/loader_throughput.py --images 800 --workers 2 --epochs 3

Both produce the same tensors: float [B,3,256,256] in [0,1] after the ADM center crop (and a
random flip); the baseline must crop every full-size JPEG on the fly, the shards hold it done.
Both keep their worker processes across epochs (the MDS loader always does; the baseline gets
``persistent_workers=True``), so neither pays for starting workers in a timed epoch. After one
warm-up epoch each, the timed epochs alternate baseline / MDS so that a change in machine load
hits both; each pair gives a ratio, and the median ratio is the result.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _adm(img):
    from rae_scale.data.transforms import adm_center_crop

    return adm_center_crop(img.convert("RGB"), 256)


def time_epoch(loader) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    return time.perf_counter() - t, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs per loader, alternating")
    args = ap.parse_args()

    import torch
    from torchvision import datasets, transforms

    from data_pipeline.images import make_photo_folder
    from data_pipeline.prepare import run_prepare
    from rae_scale.data import build_image_loader

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        make_photo_folder(work / "src", args.images)
        run_prepare(input=str(work / "src"), output=str(work / "mds"), resolution=256, num_workers=0)
        tf = transforms.Compose([transforms.Lambda(_adm), transforms.RandomHorizontalFlip(), transforms.ToTensor()])
        base = torch.utils.data.DataLoader(datasets.ImageFolder(str(work / "src"), transform=tf),
                                           batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                           drop_last=True, persistent_workers=args.workers > 0)
        ours = build_image_loader(str(work / "mds"), batch_size=args.batch, seed=0, num_workers=args.workers)
        time_epoch(base), time_epoch(ours)  # warm-up: page cache, worker start-up
        print(f"images={args.images} workers={args.workers} batch={args.batch} "
              f"load_avg_1m_start={os.getloadavg()[0]:.1f}")
        ratios = []
        for epoch in range(args.epochs):
            t_base, n_base = time_epoch(base)
            t_ours, n_ours = time_epoch(ours)
            ratios.append(t_base / n_base * n_ours / t_ours)
            print(f"epoch {epoch}: ImageFolder+DataLoader {n_base / t_base:.1f} img/s, "
                  f"MDS build_image_loader {n_ours / t_ours:.1f} img/s, ratio {ratios[-1]:.2f}x "
                  f"(load {os.getloadavg()[0]:.1f})")
        print(f"median ratio {statistics.median(ratios):.2f}x over {len(ratios)} epoch pair(s), "
              f"load_avg_1m_end={os.getloadavg()[0]:.1f}")
        del ours, base
        gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
