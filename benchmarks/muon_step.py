"""One gmuon optimizer step (Muon on the 2-D parameters, AdamW on the rest) against one AdamW step.

Both optimizers step the same parameter set in the same process, with the same fixed gradients:
the parameter shapes of a DiT-DH-IG (RAEv2's DiT: body of `--depth` blocks at `--width`, a head of
`--head-depth` adaLN blocks at `--head-width`, RAEv2's 1x1 patch embeddings as 4-D convs, label
table, in-context time and condition tokens, the internal-guidance base head), written out from
the architecture (shared/reference/raev2_method.md section 3), so the benchmark needs no model code.
Defaults: DiT-DH-IG-S (body 384 x 12, 6 heads; head 2048 x 2, 16 heads; 1024 latent channels).

The baseline is torch.optim.AdamW (betas (0.9, 0.95), eps 1e-8) over every parameter, RAEv2's
plain-AdamW recipe. Printed: the median step time of each and the ratio (gmuon / AdamW), with the
Newton-Schulz share of the gmuon step measured separately on the same update matrices.

    PYTHONPATH=. .venv/bin/python benchmarks/muon_step.py [--threads 2 --muon-steps 1 --adamw-steps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def dit_dh_ig_shapes(width: int, depth: int, heads: int, head_width: int, head_depth: int, head_heads: int,
                     channels: int = 1024, num_classes: int = 1000, t_tokens: int = 4, c_tokens: int = 8,
                     mlp_ratio: float = 4.0) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every trainable parameter of a label-conditioned DiT-DH-IG with 1x1 patches."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name, out_f, in_f):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out_f, in_f), (out_f,)

    def block(prefix, d, n_heads, ada_ln):
        for proj in ("q", "k", "v", "proj"):
            linear(f"{prefix}.attn.{proj}", d, d)
        shapes[f"{prefix}.attn.q_norm.weight"] = shapes[f"{prefix}.attn.k_norm.weight"] = (d // n_heads,)
        shapes[f"{prefix}.norm1.weight"] = shapes[f"{prefix}.norm2.weight"] = (d,)
        hidden = int(2 / 3 * mlp_ratio * d)
        linear(f"{prefix}.mlp.w1", hidden, d)
        linear(f"{prefix}.mlp.w2", hidden, d)
        linear(f"{prefix}.mlp.w3", d, hidden)
        if ada_ln:
            linear(f"{prefix}.adaLN", 6 * d, d)

    def final_layer(prefix, d):
        shapes[f"{prefix}.norm.weight"] = (d,)
        linear(f"{prefix}.adaLN", 2 * d, d)
        linear(f"{prefix}.linear", channels, d)

    shapes["s_embedder.proj.weight"], shapes["s_embedder.proj.bias"] = (width, channels, 1, 1), (width,)
    shapes["x_embedder.proj.weight"], shapes["x_embedder.proj.bias"] = (head_width, channels, 1, 1), (head_width,)
    shapes["t_embedder.W"] = (256,)
    linear("t_embedder.mlp.0", width, 512)
    linear("t_embedder.mlp.2", width, width)
    shapes["t_embedder.learnable_tokens"] = (t_tokens, width)
    shapes["c_embedder.embedding_table.weight"] = (num_classes + 1, width)
    shapes["c_embedder.learnable_tokens"] = (c_tokens, width)
    for i in range(depth):
        block(f"blocks.{i}", width, heads, ada_ln=False)
    linear("s_projector", head_width, width)
    for i in range(head_depth):
        block(f"head_blocks.{i}", head_width, head_heads, ada_ln=True)
    final_layer("final_layer", head_width)
    final_layer("base_final_layer", width)
    return shapes


def median_step_time(opt: torch.optim.Optimizer, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from rae_scale.optim.muon import MuonWithAdamW
    from rae_scale.optim.newton_schulz import orthogonalize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-width", type=int, default=2048)
    ap.add_argument("--head-depth", type=int, default=2)
    ap.add_argument("--head-heads", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adamw-steps", type=int, default=5)
    ap.add_argument("--muon-steps", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    shapes = dit_dh_ig_shapes(args.width, args.depth, args.heads, args.head_width, args.head_depth, args.head_heads)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes.values()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    n_total = sum(p.numel() for p in params)
    n_muon = sum(p.numel() for p in params if p.ndim == 2)
    print(f"DiT-DH-IG body {args.width}x{args.depth}, head {args.head_width}x{args.head_depth}: "
          f"{len(params)} tensors, {n_total / 1e6:.1f} M parameters, {n_muon / n_total:.1%} in 2-D matrices (Muon); "
          f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}")

    adamw = torch.optim.AdamW(params, lr=1e-9, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    adamw.step()  # state allocation outside the timing
    t_adamw = median_step_time(adamw, args.adamw_steps)

    gmuon = MuonWithAdamW(params, lr=1e-9)
    gmuon.step()  # state allocation; a step is too slow on CPU to throw more than one away
    t_muon = median_step_time(gmuon, args.muon_steps)

    # the Newton-Schulz part alone, on the same matrices batched as the optimizer batches them
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.ndim == 2:
            by_shape.setdefault(tuple(p.shape), []).append(gmuon.state[p]["momentum_buffer"].to(torch.bfloat16))
    t0 = time.perf_counter()
    for mats in by_shape.values():
        orthogonalize(torch.stack(mats))
    t_ns = time.perf_counter() - t0

    print(f"AdamW step  {t_adamw * 1e3:10.1f} ms  (median of {args.adamw_steps})")
    print(f"gmuon step  {t_muon * 1e3:10.1f} ms  (median of {args.muon_steps}); Newton-Schulz alone "
          f"{t_ns * 1e3:.1f} ms = {t_ns / t_muon:.0%}")
    print(f"ratio gmuon / AdamW = {t_muon / t_adamw:.1f}x   (load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
