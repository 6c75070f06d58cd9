"""GPU bring-up: exercise every GPU path once, within minutes, and record what happened.

Runs through the real CLI (`rae-scale train`) on synthetic data built by the tiny-data machinery
(digits at 256 px, a seeded random DINOv2-B encoder, its latents and statistics; nothing downloaded):
  - stage 2 DiT-DH-S, bf16: DDP with compile off and on; DiT-DH-XL, bf16: FSDP and ZeRO-2;
    on a multi-GPU machine also DiT-DH-XL FSDP on every GPU
  - stage 1 decoder-XL with the GAN on from the first steps (LPIPS with a random VGG backbone)
From each run's metrics.jsonl: images/s, MFU and peak memory (the rows after the first, which holds
compile and warm-up), and beside it the planner's predicted peak for the same setting. Then the SDPA
backend a DiT-XL attention actually runs (CUDA kernel names from the profiler), Inception featurisation
throughput (benchmarks/eval_featurize.py) and Euler-sampling throughput of DiT-DH-XL.
Writes OUT/gpu_check.json and OUT/gpu_check.md. Without a CUDA GPU it says so and exits 0.

    benchmarks/gpu_check.sh [--out gpu_check_out] [--budget-s 600] [--only NAME,...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
S2_XL = "configs/stage2/dit_dh_xl_256.yaml"
S2_S = "configs/stage2/dit_dh_s_256.yaml"
S1_XL = "configs/stage1/dinov2_b_decxl_256.yaml"


def data_overrides(data: Path, stage: str) -> list[str]:
    """Synthetic inputs built on first use (data.build_if_missing): digits, random encoder, latents, stats."""
    common = [f"rae.encoder.pretrained={data / 'encoder'}", f"data.url={data / 'shards'}",
              "data.build_if_missing=true", "data.num_workers=2", "logging.wandb='off'", "eval.every_steps=0",
              "checkpoint.every_steps=100000", "checkpoint.async_save=false", "checkpoint.resume=never",
              "checkpoint.overwrite=true", "logging.sample_every_steps=100000", "logging.every_steps=5"]
    if stage == "stage2":
        return common + [f"data.latents_url={data / 'latents'}", f"rae.stats_path={data / 'stats.safetensors'}",
                         "rae.decoder_checkpoint=null"]
    return common + ["gan.dino_checkpoint=null", "gan.lpips_random_backbone=true", "gan.disc_start_epoch=0.0",
                     "gan.disc_update_start_epoch=0.0", "data.hflip=false"]


def runs(ngpu: int) -> list[dict]:
    """(name, stage, config, overrides, nproc, planner strategy) of every training run."""
    steps = ["training.max_steps=15"]
    out = [
        dict(name="S_ddp_bf16", stage="stage2", config=S2_S, nproc=1, plan="ddp",
             overrides=steps + ["parallel.strategy=ddp", "training.global_batch_size=256"]),
        dict(name="S_ddp_bf16_compile", stage="stage2", config=S2_S, nproc=1, plan="ddp",
             overrides=steps + ["parallel.strategy=ddp", "parallel.compile=true", "training.global_batch_size=256"]),
        dict(name="XL_fsdp_bf16", stage="stage2", config=S2_XL, nproc=1, plan="fsdp",
             overrides=steps + ["parallel.strategy=fsdp", "training.global_batch_size=64"]),
        dict(name="XL_zero2_bf16", stage="stage2", config=S2_XL, nproc=1, plan="zero2",
             overrides=steps + ["parallel.strategy=deepspeed", "parallel.zero_stage=2",
                                "training.global_batch_size=64"]),
        dict(name="stage1_gan_decXL", stage="stage1", config=S1_XL, nproc=1, plan="fsdp",
             overrides=["training.max_steps=10", "parallel.strategy=fsdp", "training.global_batch_size=16"]),
    ]
    if ngpu > 1:
        out.append(dict(name=f"XL_fsdp_bf16_{ngpu}gpu", stage="stage2", config=S2_XL, nproc=ngpu, plan="fsdp",
                        overrides=steps + ["parallel.strategy=fsdp", f"training.global_batch_size={64 * ngpu}"]))
    return out


def read_metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "images_per_s" in r]
    steady = rows[1:] or rows  # the first window holds compile and warm-up
    pick = lambda k: [r[k] for r in steady if r.get(k) is not None]  # noqa: E731
    ips, mfu = pick("images_per_s"), pick("mfu")
    return {"images_per_s": sum(ips) / len(ips) if ips else None, "mfu": sum(mfu) / len(mfu) if mfu else None,
            "peak_mem_gb": max((r.get("peak_mem_gb") or 0) for r in rows) if rows else None, "rows": len(rows)}


def predicted_peak_gib(run: dict, ngpu: int) -> float | None:
    """The planner's peak (with headroom) per GPU for the run's setting."""
    from rae_scale import config as C
    from rae_scale.plan import Setting, build_job, plan_memory

    cfg = C.load_config(C.JOBS[run["stage"]], REPO / run["config"], [o for o in run["overrides"]
                                                                     if not o.startswith("parallel.compile")])
    job = build_job(run["stage"], cfg, dataset_size=1_281_167)
    world = run["nproc"]
    mem = plan_memory(job, Setting(run["plan"], cfg.parallel.activation_checkpointing,
                                   cfg.training.global_batch_size // world, world, cfg.parallel.precision))
    return mem.peak / 2**30


def train(run: dict, out: Path, data: Path, timeout: float) -> dict:
    run_dir = out / "runs" / run["name"]
    cmd = [sys.executable, "-m", "rae_scale.commands.cli", "train", run["stage"], str(REPO / run["config"]),
           *data_overrides(data, run["stage"]), *run["overrides"], f"run.dir={run_dir}",
           f"parallel.nproc={run['nproc']}"]
    env = dict(os.environ, RAE_SCALE_PROGRESS="0", WANDB_MODE="disabled")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        code, tail = "timeout", str(exc)[-3000:]
    result = {"name": run["name"], "exit": code, "wall_s": time.perf_counter() - t0, "cmd": " ".join(cmd[2:])}
    if code == 0:
        result.update(read_metrics(run_dir))
    else:
        result["log_tail"] = tail
    return result


def sdpa_backend() -> dict:
    """Which attention kernel a bf16 DiT-XL-shaped SDPA call runs (profiler kernel names)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(8, 16, 256, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
        torch.cuda.synchronize()
    names = sorted({e.key for e in prof.key_averages() if any(s in e.key.lower() for s in
                                                                   ("flash", "fmha", "efficient", "cudnn", "attention",
                                                                    "softmax"))})
    kind = ("flash" if any("flash" in n.lower() for n in names) else "cudnn" if any("cudnn" in n.lower() for n in names)
            else "efficient" if any("fmha" in n.lower() or "efficient" in n.lower() for n in names) else "math")
    return {"backend": kind, "kernels": names[:12]}


def sampling_throughput(batch: int = 64, steps: int = 50) -> dict:
    """Euler sampling images/s of a random DiT-DH-XL (bf16 autocast): the network evaluations only."""
    import torch

    from rae_scale.models.dit import build_dit

    model = build_dit("dit_dh", "XL", input_size=16, in_channels=768, num_classes=1000).cuda().eval()
    x = torch.randn(batch, 768, 16, 16, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, torch.rand(batch, device="cuda"), y)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            t = torch.full((batch,), 1 - i / steps, device="cuda")
            x = x - model(x, t, y).float() / steps
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"images_per_s": batch / dt, "batch": batch, "steps": steps, "seconds": dt}


def featurize_throughput() -> dict:
    proc = subprocess.run([sys.executable, "benchmarks/eval_featurize.py", "--device", "cuda", "--batch", "200",
                           "--iters", "5"], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    return {"exit": proc.returncode, "output": proc.stdout.strip().splitlines()[-3:] or proc.stderr[-500:]}


def markdown(report: dict) -> str:
    lines = [f"GPU check on {report['gpus']} x {report['gpu_name']} (torch {report['torch']}, CUDA {report['cuda']})",
             "", "| run | exit | images/s | MFU | peak GB (measured) | peak GiB (planner) |",
             "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        fmt = lambda v, f: (f.format(v) if isinstance(v, (int, float)) else "-")  # noqa: E731
        lines.append(f"| {r['name']} | {r['exit']} | {fmt(r.get('images_per_s'), '{:.1f}')} | "
                     f"{fmt(r.get('mfu'), '{:.1%}')} | {fmt(r.get('peak_mem_gb'), '{:.1f}')} | "
                     f"{fmt(r.get('planned_peak_gib'), '{:.1f}')} |")
    for key in ("sdpa", "sampling", "featurize"):
        lines.append(f"\n{key}: {json.dumps(report.get(key))}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--budget-s", type=float, default=600.0, help="stop starting new parts after this")
    ap.add_argument("--only", help="comma-separated run names (default all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        msg = "gpu_check: no CUDA GPU on this machine; nothing was run (the GPU checks need one)"
        print(msg)
        (out / "gpu_check.json").write_text(json.dumps({"gpu": None, "skipped": msg}) + "\n")
        return 0
    start = time.perf_counter()
    ngpu = torch.cuda.device_count()
    report = {"gpu_name": torch.cuda.get_device_name(0), "gpus": ngpu, "torch": torch.__version__,
              "cuda": torch.version.cuda, "runs": []}
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    for key, fn in (("sdpa", sdpa_backend), ("sampling", sampling_throughput), ("featurize", featurize_throughput)):
        try:
            report[key] = fn()
        except Exception as exc:  # a failing part is recorded, the others still run
            report[key] = {"error": f"{type(exc).__name__}: {exc}"}
        torch.cuda.empty_cache()
    wanted = set(args.only.split(",")) if args.only else None
    for run in runs(ngpu):
        if wanted and run["name"] not in wanted:
            continue
        if left() < 60:
            report["runs"].append({"name": run["name"], "exit": "skipped (time budget)"})
            continue
        result = train(run, out, out / "data", timeout=max(60.0, left() - 10))
        try:
            result["planned_peak_gib"] = predicted_peak_gib(run, ngpu)
        except Exception as exc:
            result["planned_peak_gib"] = None
            result["plan_error"] = f"{type(exc).__name__}: {exc}"
        report["runs"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}), flush=True)
    report["wall_s"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
