"""DiT-DH-IG forward + backward time against RAEv2's own module on the same weights (ratio <= 1 wanted).

RAEv2's `DiTwDDTHeadIG` is imported from a checkout of its source (nanovisionx/RAEv2 @ 8a0d238, the
`src` folder; it needs timm and einops: `pip install timm einops`), built with the given sizes, and
its state dict loaded into rae_scale's `dit_dh_ig` with strict=True. The outputs are compared first
(max abs difference), then both run --iters fwd+bwd passes on the same batch, interleaved, after a
warm-up; the medians are printed and ours / RAEv2's as the ratio.

    git --git-dir=<RAEv2 mirror> archive HEAD src | tar -x -C /tmp/raev2
    PYTHONPATH=. .venv/bin/python benchmarks/dit_dh_ig_vs_raev2.py --raev2-src /tmp/raev2/src \\
        [--hidden 384,2048 --depth 12,2 --heads 6,16 --channels 768 --size 16 --batch 4 --iters 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def pair(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def fwd_bwd_seconds(model, x, t, y) -> float:
    start = time.perf_counter()
    x_full, x_base = model(x, t, y)
    (x_full.square().mean() + x_base.square().mean()).backward()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raev2-src", required=True, help="RAEv2's src folder (holds stage2/ and configs/)")
    p.add_argument("--hidden", type=pair, default=[384, 2048])
    p.add_argument("--depth", type=pair, default=[12, 2])
    p.add_argument("--heads", type=pair, default=[6, 16])
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, args.raev2_src)
    from configs.stage2 import ConditioningArchConfig  # RAEv2's
    from stage2.models.DDT import DiTwDDTHeadIG  # RAEv2's

    from rae_scale.models.dit import build_dit

    base_depth = min(8, args.depth[0])
    common = dict(input_size=args.size, in_channels=args.channels, hidden_size=args.hidden, depth=args.depth,
                  num_heads=args.heads, mlp_ratio=4.0, num_classes=1000)
    torch.manual_seed(0)
    theirs = DiTwDDTHeadIG(patch_size=[1, 1], base_model_depth=base_depth, condition_type="label",
                           cond_arch=ConditioningArchConfig(num_t_tokens=4, num_c_tokens=8), **common)
    with torch.no_grad():  # RAEv2 zero-initialises its outputs: random values make the comparison real
        for prm in theirs.parameters():
            prm.normal_(0, 0.02)
    ours = build_dit("dit_dh_ig", None, patch_size=1, base_model_depth=base_depth, num_t_tokens=4, num_c_tokens=8,
                     **common)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    n = sum(p.numel() for p in ours.parameters())

    x = torch.randn(args.batch, args.channels, args.size, args.size)
    t, y = torch.rand(args.batch), torch.randint(0, 1000, (args.batch,))
    with torch.no_grad():
        diff = max((a - b).abs().max().item() for a, b in zip(ours(x, t, y), theirs(x, t, context=y)))

    def ours_step():
        return fwd_bwd_seconds(ours, x, t, y)

    def theirs_step():
        return fwd_bwd_seconds(lambda *a: theirs(a[0], a[1], context=a[2]), x, t, y)

    ours_step(), theirs_step()  # warm-up
    times = {"ours": [], "raev2": []}
    for _ in range(args.iters):
        times["ours"].append(ours_step())
        times["raev2"].append(theirs_step())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"DiT-DH-IG {args.hidden}x{args.depth} heads {args.heads}, {n / 1e6:.1f} M params, latent "
          f"{args.channels}x{args.size}x{args.size}, batch {args.batch}, {torch.get_num_threads()} threads: "
          f"max |ours - RAEv2| {diff:.2e}; fwd+bwd median ours {med['ours']:.3f} s, RAEv2 {med['raev2']:.3f} s, "
          f"ratio ours/RAEv2 {med['ours'] / med['raev2']:.3f}")


if __name__ == "__main__":
    main()
