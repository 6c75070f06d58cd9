"""Activation checkpointing on DiT^DH-S (CPU): peak-memory saving and time cost against no checkpointing.

Model: rae_scale.models.dit DiT^DH-S (body 12 x 384, head 2 x 2048, 256 latent tokens of 768 channels,
~196 M parameters), one forward + backward of a batch per step, no optimizer (AC only changes what the
forward keeps for backward). Each mode runs in a fresh process so the measurements do not mix:
- activation memory = peak resident memory during the timed steps minus the resident memory before them
  (weights and already-allocated gradients). The peak is Linux's VmHWM, reset through /proc/self/clear_refs;
  MALLOC_MMAP_THRESHOLD_ makes glibc return every large tensor to the OS when freed, so the resident
  size follows live tensors.
- step time = the fastest of the timed steps (other processes on a shared machine only ever add time),
  and the CPU time of the process per step (less sensitive to sharing; use --threads 1 so idle OpenMP
  threads spinning do not count). On a busy machine compare the CPU-time ratios.
Prints each mode's activation memory and step time as ratios to mode "none" measured in the same run.

    python benchmarks/ac_memory.py [--batch 2 --steps 3 --threads 1 --modes none,every_k,full]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def measure(mode: str, batch: int, steps: int, threads: int, every: int) -> dict:
    """Run in the child process: build, warm up, then time `steps` forward+backward passes."""
    import torch

    from rae_scale.models.dit import build_dit
    from rae_scale.parallel.ac import apply_ac

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_dit("dit_dh", preset="S")
    params = sum(p.numel() for p in model.parameters())
    checkpointed = apply_ac(model.blocks, mode, every)
    x = torch.randn(batch, 768, 16, 16)
    t = torch.rand(batch)
    y = torch.randint(0, 1000, (batch,))

    def step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        model(x, t, y).square().mean().backward()
        return time.perf_counter() - start, time.process_time() - cpu

    step()  # warm-up: allocates the gradients, which then stay (zero_grad keeps them)
    model.zero_grad(set_to_none=False)
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter to the current RSS
    times, cpu_times = [], []
    for _ in range(steps):
        wall, cpu = step()
        times.append(wall)
        cpu_times.append(cpu)
        model.zero_grad(set_to_none=False)
    peak = _rss_kib("VmHWM")
    return {"mode": mode, "checkpointed_blocks": len(checkpointed), "params_m": params / 1e6,
            "activation_mib": (peak - base) / 1024, "step_s": min(times), "times": times,
            "cpu_s": min(cpu_times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=2, help="k for mode every_k")
    ap.add_argument("--modes", default="none,every_k,full")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.steps, args.threads, args.every)))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    results = {}
    for mode in args.modes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--batch", str(args.batch),
               "--steps", str(args.steps), "--threads", str(args.threads), "--every", str(args.every)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:8s} blocks={r['checkpointed_blocks']:2d} activations={r['activation_mib']:8.1f} MiB "
              f"step={r['step_s']:.2f} s cpu={r['cpu_s']:.2f} s  (wall per step {', '.join(f'{s:.2f}' for s in r['times'])})",
              flush=True)
    base = results.get("none")
    if base is None:
        return
    print(f"\nDiT^DH-S ({base['params_m']:.1f} M params), batch {args.batch} x 256 tokens, "
          f"{args.threads} threads; ratios to 'none':")
    for mode, r in results.items():
        print(f"  {mode:8s} activation memory x{r['activation_mib'] / base['activation_mib']:.3f}   "
              f"step time x{r['step_s'] / base['step_s']:.3f}   CPU time x{r['cpu_s'] / base['cpu_s']:.3f}")


if __name__ == "__main__":
    main()
