"""The planner's memory model against measured memory on 2 gloo ranks (CPU), as a table.

Default: a DiT-DH-S-sized model (the S preset: body 12 x 384, DDT head 2 x 2048, ~196 M parameters,
on DINOv2-B-shaped latents [768, 16, 16]), fp32, AdamW, EMA, two training steps under DDP, FSDP2 and
DeepSpeed ZeRO-1/2/3 at DeepSpeed's default settings. The measurement is
tests/distributed/test_plan_memory.py's (peak RSS minus the resident size before the model was built,
each strategy in fresh processes and first warmed up on a minute model, glibc returning freed tensors to
the OS and writing every block it hands out, so resident = allocated); the prediction is
`rae_scale.plan.plan_memory` (no GPU headroom). Needs ~2 x 8 GB of memory at the default size.

    PYTHONPATH=. .venv/bin/python benchmarks/plan_memory.py [--micro-batch 2] [--strategies ddp,fsdp,zero2]
        [--config configs/stage2/dit_dh_s_256.yaml] [--tiny] [k=v ...]

--tiny: the CI test's case instead (its model, micro-batch 8, its reduce_bucket_size).
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
    ap.add_argument("--strategies", default="ddp,fsdp,zero1,zero2,zero3")
    ap.add_argument("--tiny", action="store_true", help="the CI test's case")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests/distributed")]
    import test_plan_memory as T

    from rae_scale.plan import Setting, build_job, plan_memory

    os.environ.update(T.ALLOCATION_FAITHFUL_ENV)  # read by glibc when the ranks start
    if args.tiny:
        config, overrides, micro_batch, deepspeed = "configs/stage2/tiny_cpu.yaml", T.OVERRIDES, T.MICRO_BATCH, T.DEEPSPEED
    else:
        config, micro_batch, deepspeed = args.config, args.micro_batch, {}
        overrides = S_OVERRIDES + [f"training.global_batch_size={2 * micro_batch}"] + args.overrides
    strategies = tuple(args.strategies.split(","))
    t0 = time.perf_counter()
    ranks = T.measure_strategies(strategies, overrides, micro_batch, config, deepspeed)
    wall = time.perf_counter() - t0
    job = build_job("stage2", T._config(overrides, config, deepspeed), dataset_size=1000)
    mib = 2**20
    print(f"{job.name}: {job.trained.n_trainable / 1e6:.2f} M trainable, fp32 AdamW + EMA, 2 ranks, micro-batch "
          f"{micro_batch}, {job.tokens} tokens, parallel.deepspeed={deepspeed} ({wall:.0f} s)\n")
    print("| strategy | weights MiB (meas. = plan) | optimizer MiB (meas. = plan) | reduction buffers MiB (plan) "
          "| activations MiB (plan) | peak MiB measured (rank 0 / 1) | peak MiB planned | planned / measured |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in strategies:
        m = plan_memory(job, Setting(kind, "none", micro_batch, 2, "fp32"), gpu=False)
        r0, r1 = ranks[0][kind], ranks[1][kind]
        same = lambda key, want: ("(=)" if r0[key] == want else f"(!= {r0[key] / mib:.2f})") if key in r0 else ""  # noqa: E731
        print(f"| {kind} | {m.weights / mib:.1f} {same('weights', m.weights)} | {m.optimizer / mib:.1f} "
              f"{same('optimizer', m.optimizer)} | {m.parts['comm'] / mib:.1f} {same('comm', m.parts['comm'])} | "
              f"{m.activations / mib:.1f} | {r0['peak'] / mib:.1f} / {r1['peak'] / mib:.1f} | {m.peak / mib:.1f} | "
              f"{m.peak / max(r0['peak'], r1['peak']):.3f} |")


if __name__ == "__main__":
    main()
