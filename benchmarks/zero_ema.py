"""The EMA update under DeepSpeed ZeRO-2 in bf16, on 2 gloo ranks: the partitioned EMA (each rank lerps the
fp32 masters it holds; rae_scale.parallel.deepspeed.PartitionedEMA) against the earlier update (every full
fp32 master gathered with safe_get_full_fp32_param, then a lerp of the full copy), in the same processes
on the same engine. Model: a real DiT-DH (`--preset`, 768-channel 16x16 latents as DiT-DH-XL's).
Printed by rank 0: the collectives per update and the median update time of each, and the ratio.

    PYTHONPATH=. .venv/bin/python benchmarks/zero_ema.py [--preset S --repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from deepspeed.utils import safe_get_full_fp32_param

    from rae_scale.models.dit import build_dit
    from rae_scale.parallel import build_strategy, init_distributed

    info = init_distributed()
    torch.manual_seed(0)
    model = build_dit("dit_dh", args.preset, input_size=16, in_channels=768, num_classes=1000)
    strategy = build_strategy("deepspeed", dist=info, zero_stage=2, precision="bf16", micro_batch_size=1)
    strategy.wrap(model, blocks=model.transformer_blocks(), ema_decay=0.9999,
                  optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=1e-4))
    trainable = [p for p in strategy.module.parameters() if p.requires_grad]
    full_copy = [p.detach().float().clone() for p in trainable]  # the earlier EMA's full fp32 copy

    def gathered_update():
        torch._foreach_lerp_(full_copy, [safe_get_full_fp32_param(p) for p in trainable], 1.0 - 0.9999)

    def partitioned_update():
        strategy.ema.update()

    calls = {"n": 0}
    real = dist.all_reduce

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    results = {}
    for name, fn in (("gathered (before)", gathered_update), ("partitioned (now)", partitioned_update)):
        fn()  # warm-up
        dist.all_reduce = counting
        calls["n"] = 0
        fn()
        dist.all_reduce = real
        n_calls = calls["n"]
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        results[name] = (n_calls, statistics.median(times))
    if rank == 0:
        n = sum(p.numel() for p in trainable)
        print(f"DiT-DH-{args.preset}: {n / 1e6:.1f} M trained parameters in {len(trainable)} tensors, ZeRO-2 bf16, "
              f"{world} gloo ranks, {torch.get_num_threads()} thread each")
        base = results["gathered (before)"][1]
        for name, (n_calls, t) in results.items():
            print(f"  {name:18s} all-reduces per update {n_calls:4d}   median {t * 1e3:9.1f} ms   "
                  f"ratio {t / base:.3f}")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="S")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
