"""`rae-scale plan JOB CONFIG [k=v] --gpus N [--gpu h100] [--gpu-memory 80] [--json]`: the planner's table."""
from __future__ import annotations

import json

from rae_scale.plan import DEFAULT_MFU, build_job, get_gpu, plan
from rae_scale.plan.memory import fsdp_shard, optimizer_bytes

IMAGENET_TRAIN = 1_281_167
COLUMNS = ("weights", "gradients", "optimizer", "ema", "frozen", "activations", "transient", "headroom", "total")


def config_keys(strategy: str, ac: str, micro_batch: int, accum: int) -> str:
    """The overrides that select a planned setting in a job config."""
    par = (f"parallel.strategy={strategy}" if strategy in ("ddp", "fsdp")
           else f"parallel.strategy=deepspeed parallel.zero_stage={strategy[-1]}")
    return f"{par} parallel.activation_checkpointing={ac} training.micro_batch_size={micro_batch}"


def run_plan(job_name: str, cfg, *, gpus: int, gpu: str = "h100", gpu_memory: float | None = None,
             mfu: float = DEFAULT_MFU, dataset_size: int = IMAGENET_TRAIN, gpus_per_node: int = 8) -> dict:
    """The plan as plain data (what --json prints)."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    hw = get_gpu(gpu)
    capacity = hw.memory_gib if gpu_memory is None else gpu_memory
    job = build_job(job_name, cfg, dataset_size)
    rows = plan(job, hw, gpus=gpus, capacity_gib=capacity, precision=cfg.parallel.precision, mfu=mfu,
                gpus_per_node=gpus_per_node, ac_every=cfg.parallel.ac_every)
    shapes = job.trained.trainable
    optimizers = {kind: {"replicated_gib": optimizer_bytes(shapes, kind) / 2**30,
                         "fsdp_gib": optimizer_bytes(shapes, kind, lambda x: fsdp_shard(x, gpus)) / 2**30}
                  for kind in ("adamw", "muon")}
    return {"job": job_name, "model": job.name, "trainable_params": job.trained.n_trainable,
            "muon_2d_params": job.trained.n_2d, "optimizer_state": optimizers,
            "frozen_params": job.frozen_params, "tokens_per_sample": job.tokens, "global_batch": job.global_batch,
            "total_steps": job.total_steps, "optimizer": job.optimizer, "precision": cfg.parallel.precision,
            "gpu": hw.name, "gpus": gpus, "gpu_memory_gib": capacity, "mfu": mfu,
            "peak_flops": hw.peak_flops, "rows": [r.as_dict() for r in rows]}


def format_plan(p: dict) -> str:
    lines = [f"{p['job']}: {p['model']}, {p['trainable_params'] / 1e6:.2f} M trainable parameters, "
             f"{p['optimizer']}, {p['precision']}, global batch {p['global_batch']}, {p['total_steps']} steps",
             f"on {p['gpus']} x {p['gpu']} ({p['gpu_memory_gib']:g} GiB each); step time at MFU {p['mfu']:.0%} "
             f"of {p['peak_flops'] / 1e12:.0f} TFLOP/s; memory per GPU in GiB", ""]
    o = p["optimizer_state"]
    lines.insert(1, f"optimizer state per GPU (replicated / FSDP): AdamW {o['adamw']['replicated_gib']:.2f} / "
                    f"{o['adamw']['fsdp_gib']:.2f} GiB, Muon {o['muon']['replicated_gib']:.2f} / "
                    f"{o['muon']['fsdp_gib']:.2f} GiB ({p['muon_2d_params'] / 1e6:.1f} M 2-D parameters); "
                    f"the table uses {p['optimizer']}")
    if p["frozen_params"]:
        lines.insert(1, "frozen: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in p["frozen_params"].items()))
    head = f"{'':2}{'strategy':8} {'AC':8} {'mb':>4} {'acc':>4} " + " ".join(f"{c[:6]:>6}" for c in COLUMNS)
    head += f" {'step s':>7} {'img/s':>7} {'hours':>7} {'GPU-h':>8}"
    lines.append(head)
    for r in p["rows"]:
        mark = "* " if r["recommended"] else ("  " if r["fits"] else "x ")
        m = r["memory_gib"]
        lines.append(f"{mark}{r['strategy']:8} {r['activation_checkpointing']:8} {r['micro_batch']:>4} "
                     f"{r['grad_accum_steps']:>4} " + " ".join(f"{m[c]:6.1f}" for c in COLUMNS)
                     + f" {r['step_s']:7.3f} {r['images_per_s']:7.0f} {r['run_hours']:7.1f} {r['gpu_hours']:8.0f}")
    best = next(r for r in p["rows"] if r["recommended"])
    lines += ["", "(* recommended; x: does not fit even at micro-batch 1)",
              "recommended: " + config_keys(best["strategy"], best["activation_checkpointing"], best["micro_batch"],
                                            best["grad_accum_steps"])]
    return "\n".join(lines)


def main_plan(job_name: str, cfg, *, as_json: bool = False, **kw) -> str:
    p = run_plan(job_name, cfg, **kw)
    return json.dumps(p, indent=1) if as_json else format_plan(p)
