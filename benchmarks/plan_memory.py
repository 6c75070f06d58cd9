"""The planner's memory model against measured memory on 2 gloo ranks (CPU), as a table.

Default: a DiT-DH-S-sized model (the S preset: body 12 x 384, DDT head 2 x 2048, ~196 M parameters,
on DINOv2-B-shaped latents [768, 16, 16]), fp32, AdamW, EMA, two training steps under DDP, FSDP2 and
DeepSpeed ZeRO-2. The measurement is tests/distributed/test_plan_memory.py's (peak RSS minus the
resident size before the model was built, each strategy first warmed up on a minute model, glibc
returning freed tensors to the OS); the prediction is `rae_scale.plan.plan_memory` (no GPU headroom).
Needs ~2 x 6 GB of memory at the default size.

    PYTHONPATH=. .venv/bin/python benchmarks/plan_memory.py [--micro-batch 2] [--strategies ddp,fsdp,zero2]
        [--config configs/stage2/dit_dh_s_256.yaml] [k=v ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
S_OVERRIDES = ["rae.encoder.pretrained=null", "rae.decoder_checkpoint=null", "rae.stats_path=null",
               "parallel.precision=fp32"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/stage2/dit_dh_s_256.yaml")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--strategies", default="ddp,fsdp,zero2")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the ranks start
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests/distributed")]
    from conftest import run_ranks
    from test_plan_memory import memory_world

    from rae_scale import config as C
    from rae_scale.plan import Setting, build_job, plan_memory

    overrides = S_OVERRIDES + [f"training.global_batch_size={2 * args.micro_batch}"] + args.overrides
    strategies = tuple(args.strategies.split(","))
    t0 = time.perf_counter()
    ranks = run_ranks(memory_world, 2, overrides, args.micro_batch, strategies, args.config, timeout=7200)
    wall = time.perf_counter() - t0
    job = build_job("stage2", C.load_config(C.Stage2Job, REPO / args.config, overrides), dataset_size=1000)
    mib = 2**20
    print(f"{job.name}: {job.trained.n_trainable / 1e6:.2f} M trainable, fp32 AdamW + EMA, 2 ranks, micro-batch "
          f"{args.micro_batch}, {job.tokens} tokens ({wall:.0f} s)\n")
    print("| strategy | weights MiB (meas. = plan) | optimizer MiB (meas. = plan) | activations MiB (plan) "
          "| peak MiB measured (rank 0 / 1) | peak MiB planned | planned / measured |")
    print("|---|---|---|---|---|---|---|")
    for kind in strategies:
        m = plan_memory(job, Setting(kind, "none", args.micro_batch, 2, "fp32"), gpu=False)
        r0, r1 = ranks[0][kind], ranks[1][kind]
        same = lambda got, want: "=" if got == want else f"!= {got / mib:.2f}"  # noqa: E731
        print(f"| {kind} | {m.weights / mib:.1f} {same(r0['weights'], m.weights)} | {m.optimizer / mib:.1f} "
              f"{same(r0['optimizer'], m.optimizer)} | {m.activations / mib:.1f} | {r0['peak'] / mib:.1f} / "
              f"{r1['peak'] / mib:.1f} | {m.peak / mib:.1f} | {m.peak / max(r0['peak'], r1['peak']):.3f} |")


if __name__ == "__main__":
    main()
