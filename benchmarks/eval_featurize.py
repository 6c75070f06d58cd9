"""Inception featurisation images/s (CPU or GPU): our module vs the wheel's TorchScript net (baseline).

Both include nothing but the network on already-resized input; ours is also timed end to end
(uint8 256x256 -> TF1 resize -> pool + spatial).

    PYTHONPATH=. .venv/bin/python benchmarks/eval_featurize.py [--batch 8] [--iters 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch

from rae_scale.eval.inception import build_inception, default_weights_path, resize_bilinear_tf1


def rate(fn, batch, iters, device):
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    ours = build_inception(device=args.device)
    wheel = torch.jit.load(str(default_weights_path()), map_location=args.device).eval()
    images = torch.randint(0, 256, (args.batch, 3, 256, 256), dtype=torch.uint8, device=args.device)
    x = (resize_bilinear_tf1(images.float()) - 128) / 128
    with torch.no_grad():
        base = rate(lambda: wheel(x), args.batch, args.iters, args.device)
        trunk = rate(lambda: ours.layers(x), args.batch, args.iters, args.device)
    full = rate(lambda: ours(images), args.batch, args.iters, args.device)
    print(f"device={args.device} batch={args.batch} threads={torch.get_num_threads()}")
    print(f"wheel TorchScript net (baseline): {base:8.2f} img/s")
    print(f"ours, network only:               {trunk:8.2f} img/s  ({trunk / base:.2f}x)")
    print(f"ours, uint8 -> resize -> features: {full:8.2f} img/s  ({full / base:.2f}x)")


if __name__ == "__main__":
    main()
