"""Stage-2 training throughput on CPU for DiT-DH-S at 256 px (768-channel 16x16 latents), 1 vs 2 threads.

The real loop (``rae_scale.train.stage2.main``) runs configs/stage2/dit_dh_s_256.yaml (DiT-DH-S: body
12 x 384, DDT head 2 x 2048, ~196 M parameters, 256 tokens per latent) in a fresh process per thread
count, reading a latent cache written here in the real format (MDS columns from
rae_scale.data.schema.latent_columns + latents.json) but filled with random N(0, 1) latents: the
numbers are throughput only, no learning. CPU changes to the config: strategy ddp on one rank (the
config's fsdp + bf16 are for GPUs), fp32 (--precision bf16 to try CPU autocast), a small global batch.
images/s, tokens/s and the phase times are the medians of the loop's own metrics.jsonl rows after the
warm-up steps; saves and sample grids fall after the last row (the loop's final save is not timed).
Prints each thread count's throughput as a ratio to 1 thread, measured in the same command.

    PYTHONPATH=. .venv/bin/python benchmarks/stage2_throughput.py [--batch 4 --steps 3 --warmup 1 --threads 1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = REPO / "configs/stage2/dit_dh_s_256.yaml"


def write_random_latent_cache(url: str, num: int, shape=(768, 16, 16), num_classes: int = 1000, seed: int = 0) -> None:
    """An fp32 latent cache of random latents, in the layout `rae-scale cache-latents` writes."""
    import numpy as np
    from streaming import MDSWriter

    from rae_scale import storage
    from rae_scale.data import schema

    rng = np.random.default_rng(seed)
    with MDSWriter(out=url, columns=schema.latent_columns(shape, "fp32", False), compression=None,
                   size_limit=1 << 28, progress_bar=False) as writer:
        for i in range(num):
            writer.write({"latent": rng.standard_normal(shape, dtype=np.float32), "label": int(i % num_classes),
                          "index": i})
    schema.write_json(storage.join(url, schema.LATENT_META),
                      {"dtype": "fp32", "shape": list(shape), "both_flips": False, "num_samples": num,
                       "source": "random N(0,1) latents (benchmarks/stage2_throughput.py)"})


def measure(args) -> dict:
    """In the child process: run the loop with args.child threads, return the steady-state metrics."""
    import torch

    sys.path.insert(0, str(HERE))
    from loop_overhead import quiet_overrides, run_real_loop, stage2_config, steady_state

    torch.set_num_threads(args.child)
    run_dir = os.path.join(args.work, f"run_{args.child}t")
    cfg = stage2_config(CONFIG, quiet_overrides(run_dir, args.warmup + args.steps) + [
        f"data.latents_url={args.work}/latents", "data.url=''", "parallel.strategy=ddp",
        f"parallel.precision={args.precision}", f"training.global_batch_size={args.batch}",
        "schedule.warmup_epochs=null", "schedule.decay_end_epoch=null"])
    rows, times = run_real_loop(cfg)
    shutil.rmtree(run_dir, ignore_errors=True)  # ~3 GB of final checkpoint
    result = steady_state(rows, times, args.warmup, args.batch)
    from rae_scale.builders import dit_kwargs
    from rae_scale.models.dit import build_dit

    with torch.device("meta"):  # count only, no memory
        result["params_m"] = sum(p.numel() for p in build_dit(cfg.dit.model, cfg.dit.preset,
                                                             **dit_kwargs(cfg.dit)).parameters()) / 1e6
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="global batch (one rank, no accumulation)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    work = tempfile.mkdtemp(prefix="bench_s2_")
    try:
        num = args.batch * (args.warmup + args.steps + 2)
        write_random_latent_cache(os.path.join(work, "latents"), num)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        results = {}
        for threads in [int(t) for t in args.threads.split(",")]:
            env["OMP_NUM_THREADS"] = str(threads)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(threads), "--work", work,
                   "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--precision", args.precision]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=REPO).stdout
            r = results[threads] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            print(f"{threads} thread(s): {r['images_per_s']:.3f} img/s, {r['tokens_per_s']:.1f} tokens/s, step "
                  f"{r['row_step_s']:.2f} s (data {r['data_s']:.3f} + fwd/bwd {r['fwd_bwd_s']:.2f} + optimizer "
                  f"{r['optimizer_s']:.2f} s; CPU {r['cpu_s']:.2f} s/step); {r['steps']} steps; load avg "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
        base = results[min(results)]
        print(f"\nDiT-DH-S ({base['params_m']:.1f} M params), batch {args.batch} x 256 tokens, {args.precision}; "
              f"ratio to {min(results)} thread(s):")
        for threads, r in results.items():
            print(f"  {threads} thread(s): tokens/s x{r['tokens_per_s'] / base['tokens_per_s']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
