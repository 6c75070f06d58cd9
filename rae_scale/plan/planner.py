"""Every setting of a job on N GPUs: memory, step time, images/s, run cost; which fit; which to use.

Step time = compute + exposed communication:
  compute  FLOPs / (MFU x peak). FLOPs per sample are the harness's MFU count, 6 x trainable params
           per token (rae_scale.train.run), so the stated MFU is the one metrics.jsonl reports; stage 1
           adds the frozen networks (encoder forward, discriminator forward and backward to its input,
           LPIPS measured with torch's FLOP counter); activation checkpointing adds one forward
           (2 N per token) of every checkpointed block.
  comm     bytes each GPU moves per step at the bus bandwidth (ring: (W-1)/W of the buffer per pass):
           DDP all-reduce fp32 gradients (2 passes); FSDP all-gather the compute-dtype parameters in
           forward and again in backward for every micro-batch, reduce-scatter fp32 gradients;
           ZeRO-1/2 reduce-scatter fp32 gradients and all-gather updated parameters; ZeRO-3 also
           gathers parameters twice per micro-batch. A stated share (OVERLAP) hides behind compute.
The recommended setting is the fitting one with the most images/s; among those within 1% of it, the one
with the most memory to spare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rae_scale.plan.hardware import GPU, bus_bandwidth
from rae_scale.plan.inventory import Job
from rae_scale.plan.memory import AC_MODES, STRATEGIES, Memory, Setting, _checkpointed, plan_memory

DEFAULT_MFU = 0.35
OVERLAP = 0.5  # share of the communication hidden behind compute


@dataclass
class Row:
    setting: Setting
    accum: int
    memory: Memory
    fits: bool
    step_s: float
    compute_s: float
    comm_s: float
    images_per_s: float
    run_hours: float
    gpu_hours: float
    recommended: bool = False

    def as_dict(self) -> dict:
        s = self.setting
        return {"strategy": s.strategy, "activation_checkpointing": s.ac, "micro_batch": s.micro_batch,
                "grad_accum_steps": self.accum, "fits": self.fits, "recommended": self.recommended,
                "memory_gib": {k: v / 2**30 for k, v in self.memory.as_dict().items()},
                "step_s": self.step_s, "compute_s": self.compute_s, "comm_s": self.comm_s,
                "images_per_s": self.images_per_s, "run_hours": self.run_hours, "gpu_hours": self.gpu_hours}


def step_flops(job: Job, s: Setting, global_batch: int) -> float:
    """FLOPs of one optimizer step on one GPU."""
    n = job.trained.n_trainable
    per_sample = 6 * n * job.tokens + job.extra_flops_per_sample
    if job.lpips_flops is not None:
        per_sample += job.lpips_flops(s.mode)
    if s.ac != "none":
        blocks = job.trained.blocks
        ckpt = _checkpointed(len(blocks), s.ac, s.ac_every)
        recomputed = sum(sum(math.prod(x) for x in b) for b, c in zip(blocks, ckpt) if c)
        per_sample += 2 * recomputed * job.tokens
    return per_sample * global_batch / s.world


def comm_bytes(job: Job, s: Setting, accum: int) -> float:
    n, w = job.trained.n_trainable, s.world
    if w == 1:
        return 0.0
    ring = (w - 1) / w
    cb = s.compute_bytes
    if s.strategy == "ddp":
        return 2 * ring * 4 * n
    if s.strategy == "fsdp":
        return ring * (2 * cb * n * accum + 4 * n)
    if s.strategy in ("zero1", "zero2"):
        return ring * (4 * n + cb * n)
    return ring * (2 * cb * n * accum + 4 * n + cb * n)


def evaluate(job: Job, gpu: GPU, s: Setting, capacity: float, *, mfu: float, gpus_per_node: int) -> Row | None:
    per_step = s.micro_batch * s.world
    if job.global_batch % per_step:
        return None
    accum = job.global_batch // per_step
    mem = plan_memory(job, s)
    compute = step_flops(job, s, job.global_batch) / (mfu * gpu.peak_flops)
    comm = comm_bytes(job, s, accum) / bus_bandwidth(gpu, s.world, gpus_per_node)
    step = compute + (1 - OVERLAP) * comm + max(0.0, OVERLAP * comm - compute)
    ips = job.global_batch / step
    hours = job.total_steps * step / 3600
    return Row(s, accum, mem, mem.total <= capacity, step, compute, comm, ips, hours, hours * s.world)


def micro_batches(global_batch: int, world: int) -> list[int]:
    """Per-GPU micro-batches that divide the per-GPU batch, largest first."""
    per_gpu = global_batch // world
    return [b for b in range(per_gpu, 0, -1) if per_gpu % b == 0] if global_batch % world == 0 else []


def plan(job: Job, gpu: GPU, *, gpus: int, capacity_gib: float, precision: str = "bf16", mfu: float = DEFAULT_MFU,
         gpus_per_node: int = 8, strategies=STRATEGIES, ac_modes=AC_MODES, ac_every: int = 2) -> list[Row]:
    """For each strategy and AC mode: the largest micro-batch that fits (or, when none does, micro-batch 1
    marked as not fitting). Marks the recommended row. Raises ValueError when nothing fits."""
    if job.global_batch % gpus:
        raise ValueError(f"training.global_batch_size={job.global_batch} is not divisible by --gpus {gpus}")
    capacity = capacity_gib * 2**30
    rows = []
    sizes = micro_batches(job.global_batch, gpus)
    for strategy in strategies:
        for ac in ac_modes:
            best = None
            for b in sizes:
                row = evaluate(job, gpu, Setting(strategy, ac, b, gpus, precision, ac_every), capacity, mfu=mfu,
                               gpus_per_node=gpus_per_node)
                if row is not None and (row.fits or b == 1):
                    best = row
                    if row.fits:
                        break
            if best is not None:
                rows.append(best)
    fitting = [r for r in rows if r.fits]
    if not fitting:
        least = min(rows, key=lambda r: r.memory.total)
        short = (least.memory.total - capacity) / 2**30
        s = least.setting
        raise ValueError(
            f"{job.name} does not fit on {gpus} x {capacity_gib:g} GiB in any setting: the smallest "
            f"({s.strategy}, activation checkpointing {s.ac}, micro-batch 1) needs "
            f"{least.memory.total / 2**30:.1f} GiB per GPU, {short:.1f} GiB more than there is; use more GPUs (sharded state shrinks with them) "
            f"or GPUs with more memory")
    # the fastest; within 1% of it (the model's resolution) the one with the most memory to spare, then
    # the least persistent state
    top = max(r.images_per_s for r in fitting)
    close = [r for r in fitting if r.images_per_s >= 0.99 * top]
    best = min(close, key=lambda r: (round(r.memory.total / 2**30, 1), r.memory.weights + r.memory.gradients
                                     + r.memory.optimizer + r.memory.ema))
    best.recommended = True
    return rows
