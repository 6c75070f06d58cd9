"""Helpers both training loops share: batch arithmetic, LR schedules, metrics, timing, grids, numerics."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)


from rae_scale.config import ConfigError


class TrainingSetupError(ConfigError):
    """A configuration that cannot train as asked; the message says what to change."""


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- batch arithmetic


@dataclass(frozen=True)
class BatchLayout:
    global_batch: int
    micro_batch: int
    accum_steps: int
    world_size: int


def batch_layout(global_batch: int, micro_batch: int | None, accum_steps: int, world_size: int) -> BatchLayout:
    """global batch = micro-batch x accumulation x world size, checked before anything is built."""
    if micro_batch is None:
        denom = accum_steps * world_size
        if global_batch % denom:
            raise TrainingSetupError(
                f"training.global_batch_size={global_batch} is not divisible by grad_accum_steps x world size = "
                f"{accum_steps} x {world_size} = {denom}; choose a global batch that is a multiple of {denom}")
        micro_batch = global_batch // denom
    if micro_batch * accum_steps * world_size != global_batch:
        raise TrainingSetupError(
            f"training.global_batch_size={global_batch} != micro_batch_size x grad_accum_steps x world size = "
            f"{micro_batch} x {accum_steps} x {world_size} = {micro_batch * accum_steps * world_size}")
    return BatchLayout(global_batch, micro_batch, accum_steps, world_size)


def start_run(cfg) -> tuple[Any, BatchLayout]:
    """What both loops do first: process group, logging, TF32, the batch layout, and (rank 0) the
    resolved config written into the run folder. Returns (DistInfo, BatchLayout)."""
    from rae_scale.config import save_resolved
    from rae_scale.logs import setup_logging
    from rae_scale.parallel.dist import init_distributed
    from rae_scale.parallel.precision import set_tf32

    info = init_distributed()
    setup_logging(info.rank, info.world_size)
    set_tf32(cfg.parallel.tf32)
    t = cfg.training
    layout = batch_layout(t.global_batch_size, t.micro_batch_size, t.grad_accum_steps, info.world_size)
    if info.rank == 0:
        url = save_resolved(cfg, cfg.run.dir, cfg.run.storage_options)
        log.info("run folder %s (resolved config at %s); %d rank(s) on %s, global batch %d = %d x %d x %d",
                 cfg.run.dir, url, info.world_size, info.device, layout.global_batch, layout.micro_batch,
                 layout.accum_steps, layout.world_size)
    return info, layout


def resolve_total_steps(max_steps: int | None, epochs: float | None, steps_per_epoch: int) -> int:
    if max_steps is not None:
        return int(max_steps)
    if epochs is not None:
        return max(1, int(math.ceil(epochs * steps_per_epoch)))
    raise TrainingSetupError("set training.max_steps or training.epochs")


# ----------------------------------------------------------------------------- schedules


def lr_factor_fn(schedule, total_steps: int, steps_per_epoch: int, base_lr: float):
    """Multiplier of base_lr per optimizer step: warmup, then cosine/linear to final_lr, then constant.

    `warmup_from_zero=False` holds base_lr through the warmup span (upstream's stage-2 recipe:
    constant, then linear decay); True ramps (step + 1) / warmup.
    """
    warm = schedule.warmup_steps
    if schedule.warmup_epochs is not None:
        warm = int(round(schedule.warmup_epochs * steps_per_epoch))
    end = schedule.decay_end_step if schedule.decay_end_step is not None else total_steps
    if schedule.decay_end_epoch is not None:
        end = int(round(schedule.decay_end_epoch * steps_per_epoch))
    final = schedule.final_lr / base_lr if base_lr > 0 else 1.0
    kind = schedule.kind

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm if schedule.warmup_from_zero else 1.0
        if kind == "constant" or step >= end or end <= warm:
            return 1.0 if kind == "constant" else (final if step >= end else 1.0)
        progress = (step - warm) / (end - warm)
        if kind == "cosine":
            return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 + (final - 1.0) * progress

    return factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- timing and metrics


class StepTimer:
    """Splits a step's wall time into data wait, forward+backward and optimizer."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except Exception:  # pragma: no cover - non-Linux
        return float("nan")


# Dense bf16 peak FLOP/s of common accelerators, for MFU; unknown devices report no MFU.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def count_params(module: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class MetricsLogger:
    """Writes `<run>/metrics.jsonl` (full float precision, rank 0) and mirrors to wandb if enabled."""

    def __init__(self, run_dir: str, *, rank: int, wandb_mode: str = "off", project: str = "rae_scale",
                 entity: str | None = None, run_name: str | None = None, config: Mapping | None = None,
                 storage_options: Mapping | None = None, resume_step: int = 0):
        import fsspec

        self.rank = rank
        self.enabled = rank == 0
        self._fh = None
        self._wandb = None
        if not self.enabled:
            return
        url = run_dir.rstrip("/") + "/metrics.jsonl"
        self.fs, self.path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.fs.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # A resumed run drops lines logged after the step of the checkpoint it resumed from, so the file has each
        # step once and matches an uninterrupted run.
        kept: list[str] = []
        if self.fs.exists(self.path):
            with self.fs.open(self.path, "r") as fh:
                for line in fh:
                    try:
                        if json.loads(line).get("step", -1) <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except json.JSONDecodeError:
                        continue  # a torn last line from a killed run
        self._lines = kept
        self._flush_all()
        if wandb_mode != "off":
            import hashlib

            import wandb

            name = run_name or os.path.basename(run_dir.rstrip("/"))
            run_id = str(int(hashlib.sha256(run_dir.encode()).hexdigest(), 16) % 10**10)
            self._wandb = wandb.init(project=project, entity=entity, name=name, id=run_id, resume="allow",
                                     mode=wandb_mode, config=dict(config or {}),
                                     dir=os.environ.get("WANDB_DIR") or None)

    def _flush_all(self):
        # Local files append; object stores have no append, so the whole (small) file is rewritten.
        with self.fs.open(self.path, "w") as fh:
            fh.writelines(self._lines)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            row[k] = v
        self._lines.append(json.dumps(row) + "\n")
        if self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol:
            with self.fs.open(self.path, "a") as fh:
                fh.write(self._lines[-1])
        else:
            self._flush_all()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def log_image(self, step: int, key: str, path: str) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(path)}, step=int(step))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def check_finite(losses: Mapping[str, torch.Tensor], step: int, policy: str) -> bool:
    """True if every loss term is finite. Otherwise stop with the step and term named, or skip."""
    for name, value in losses.items():
        value = torch.as_tensor(value).detach().float()
        if not torch.isfinite(value).all():
            msg = f"non-finite loss at step {step}: term '{name}' = {value.item()}"
            if policy == "skip":
                log.warning("%s; skipping this step (training.on_nonfinite=skip)", msg)
                return False
            raise NonFiniteLossError(msg + " (set training.on_nonfinite=skip to skip such steps)")
    return True


def all_finite_across_ranks(ok: bool, device: torch.device) -> bool:
    """Every rank must agree to skip a step, or the collectives go out of step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def save_image_grid(images: torch.Tensor, url: str, nrow: int | None = None,
                    storage_options: Mapping | None = None) -> str:
    """Images in [0, 1] (B, 3, H, W) -> one PNG grid at url (local path or fsspec URL)."""
    import io

    import fsspec
    from PIL import Image
    from torchvision.utils import make_grid

    images = images.detach().float().clamp(0, 1).cpu()
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(buf.getvalue())
    return url


@dataclass
class TrainState:
    """Counters saved in every checkpoint (the loop's own position)."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        # `extra` as one JSON string: DCP loads only the keys the target already has, and a fresh
        # TrainState's extra is empty, so a nested dict's entries would be dropped on resume
        return {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
                "extra": json.dumps(self.extra, sort_keys=True)}

    def load_state_dict(self, state: Mapping) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.samples_seen = int(state.get("samples_seen", 0))
        extra = state.get("extra", {})
        self.extra = json.loads(extra) if isinstance(extra, str) else dict(extra)


def global_mean(value: torch.Tensor, denom: float) -> float:
    """Sum a per-rank tensor over all ranks and divide by denom (a float, full precision)."""
    import torch.distributed as dist

    total = value.detach().double().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total.item() / denom)


def strategy_from_config(p, info, layout: BatchLayout, *, grad_clip: float):
    """The trained model's strategy from the `parallel` section (both loops build it the same way)."""
    from rae_scale.parallel.strategy import build_strategy

    return build_strategy(p.strategy, dist=info, precision=p.precision, zero_stage=p.zero_stage,
                          reshard_after_forward=p.reshard_after_forward, hsdp_replicas=p.hsdp_replicas,
                          activation_checkpointing=p.activation_checkpointing, ac_every=p.ac_every,
                          compile_blocks=p.compile, deepspeed_overrides=p.deepspeed or None,
                          grad_clip=grad_clip, grad_accum_steps=layout.accum_steps,
                          micro_batch_size=layout.micro_batch)
