"""Helpers both training loops share: batch arithmetic, LR schedules, metrics, timing, grids, numerics."""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
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
    """What both loops do first: process group, logging, TF32, the batch layout, and the lease on
    the run folder (one training per folder). The resolved config is written by resume_or_start,
    once resume has succeeded. Returns (DistInfo, BatchLayout)."""
    from rae_scale.logs import setup_logging
    from rae_scale.parallel.dist import init_distributed
    from rae_scale.lifetime import die_with_parent
    from rae_scale.parallel.precision import set_tf32

    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun agent's worker: end with the agent
        die_with_parent()
    info = init_distributed()
    setup_logging(info.rank, info.world_size)
    set_tf32(cfg.parallel.tf32)
    t = cfg.training
    layout = batch_layout(t.global_batch_size, t.micro_batch_size, t.grad_accum_steps, info.world_size)
    _take_lease(cfg, info)
    if info.rank == 0:
        log.info("%d rank(s) on %s, global batch %d = %d x %d x %d", info.world_size, info.device,
                 layout.global_batch, layout.micro_batch, layout.accum_steps, layout.world_size)
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


def _json_safe(value: Any, key: str, nonfinite: dict[str, str]) -> Any:
    """A metrics value as strict JSON: NaN / inf become null and are recorded in `nonfinite` by key."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, dict):
        return {k: _json_safe(v, f"{key}.{k}", nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{key}.{i}", nonfinite) for i, v in enumerate(value)]
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        value = float(value)
        if not math.isfinite(value):
            nonfinite[key] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            return None
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    elif isinstance(value, str):
        from rae_scale.config import redact

        value = redact(value)
    return value


def parse_metrics_line(line: str) -> dict | None:
    """One metrics.jsonl line as a dict with the non-finite values restored as floats (NaN, inf), or
    None for a blank or torn line. The file holds them as null plus `"nonfinite": {key: "nan"|"inf"|"-inf"}`
    (bare NaN is not JSON); every reader of metrics.jsonl goes through here."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None  # a torn last line from a killed run
    for key, kind in (row.get("nonfinite") or {}).items():
        if key in row and row[key] is None:
            row[key] = float(kind)
    return row


def read_metrics(run_dir: str, storage_options: Mapping | None = None) -> list[dict]:
    """Every row of `<run_dir>/metrics.jsonl` (see parse_metrics_line); [] when there is none yet."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_dir.rstrip("/") + "/metrics.jsonl", **(storage_options or {}))
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as fh:
        return [row for row in map(parse_metrics_line, fh) if row is not None]


def _progress_line(step: int, total: int | None, row: Mapping[str, Any]) -> str:
    """`step 40/200 | loss 0.1234 | loss_l1 0.05 | lr 1.00e-04 | grad_norm 0.81 | 512.3 img/s` for logs
    without a progress bar (Slurm, redirected stderr)."""
    def num(v):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return str(v)
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.4g}"

    parts = [f"step {step}/{total}" if total else f"step {step}"]
    for k, v in row.items():
        if k.startswith("loss") or k in ("lr", "grad_norm") or (k.startswith("eval_") and k != "eval_time_s"):
            parts.append(f"{k} {num(v)}")
    if isinstance(row.get("images_per_s"), (int, float)):
        parts.append(f"{row['images_per_s']:.1f} img/s")
    return " | ".join(parts)


class MetricsLogger:
    """Writes `<run>/metrics.jsonl` (strict JSON, full float precision, rank 0), mirrors to wandb if
    enabled, and logs a plain step line where no progress bar shows (stderr not a terminal)."""

    def __init__(self, run_dir: str, *, rank: int, wandb_mode: str = "off", project: str = "rae_scale",
                 entity: str | None = None, run_name: str | None = None, config: Mapping | None = None,
                 storage_options: Mapping | None = None, resume_step: int = 0, total_steps: int | None = None):
        import fsspec

        from rae_scale.logs import progress_enabled

        self.rank = rank
        self.enabled = rank == 0
        self._fh = None
        self._wandb = None
        self.total_steps = total_steps
        self._plain_lines = not progress_enabled(rank)
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

            from rae_scale.config import redact

            name = redact(run_name or os.path.basename(run_dir.rstrip("/")))
            run_id = str(int(hashlib.sha256(run_dir.encode()).hexdigest(), 16) % 10**10)
            # wandb records sys.argv as the run's command (and `wandb sync` uploads it): it sees the redacted
            # one while it starts; the config is redacted by the caller (config.to_dict)
            argv, sys.argv = sys.argv, redact(sys.argv)
            try:
                self._wandb = wandb.init(project=project, entity=entity, name=name, id=run_id, resume="allow",
                                         mode=wandb_mode, config=redact(dict(config or {})),
                                         dir=os.environ.get("WANDB_DIR") or None)
            finally:
                sys.argv = argv

    def _flush_all(self):
        # Local files append; object stores have no append, so the whole (small) file is rewritten.
        with self.fs.open(self.path, "w") as fh:
            fh.writelines(self._lines)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step)}
        nonfinite: dict[str, str] = {}
        for k, v in metrics.items():
            row[k] = _json_safe(v, k, nonfinite)
        if nonfinite:
            row["nonfinite"] = nonfinite
        self._lines.append(json.dumps(row, allow_nan=False) + "\n")
        if self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol:
            with self.fs.open(self.path, "a") as fh:
                fh.write(self._lines[-1])
        else:
            self._flush_all()
        if self._plain_lines:
            log.info("%s", _progress_line(int(step), self.total_steps, parse_metrics_line(self._lines[-1])))
        if self._wandb is not None:  # wandb takes NaN as it is
            self._wandb.log({k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()},
                            step=int(step))

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


# ----------------------------------------------------------------------------- run folder: lease, resume, config

_LEASE = None  # the lease this process holds (rank 0); one training per process at a time


def _take_lease(cfg, info) -> None:
    """Rank 0 takes the run folder's lease; every rank fails alike when another training holds it."""
    from rae_scale.checkpoint.lease import RunFolderBusyError, RunLease
    from rae_scale.parallel.dist import broadcast_object

    global _LEASE
    end_run()  # a lease left by an earlier run in this process (e.g. one that raised)
    error = None
    if info.rank == 0:
        lease = RunLease(cfg.run.dir, timeout_s=cfg.checkpoint.lease_timeout_s,
                         storage_options=cfg.run.storage_options)
        try:
            lease.acquire()
            _LEASE = lease
        except RunFolderBusyError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error:
        raise TrainingSetupError(error)


def end_run() -> None:
    """Release the run folder's lease (rank 0; a no-op elsewhere and when none is held)."""
    global _LEASE
    if _LEASE is not None:
        _LEASE.release()
        _LEASE = None


# Config keys that define a job's trained architecture: a resumed checkpoint must agree on them.
# Listed as dotted prefixes; the ignored ones are init-only or where weights come from.
ARCHITECTURE_KEYS = {
    "stage1": ("rae.encoder", "rae.decoder", "rae.image_size", "gan.disc_depth", "gan.disc_width",
               "gan.disc_heads", "gan.disc_patch", "gan.kernel_size", "gan.norm_type", "gan.spectral_norm"),
    "stage2": ("dit",),
}
ARCHITECTURE_IGNORED = ("rae.encoder.pretrained", "dit.checkpoint", "dit.class_dropout_prob", "dit.label_embed_std")


def architecture_mismatch(job: str, current: Mapping, saved: Mapping) -> list[str]:
    """'key: saved -> now' for every architecture key (ARCHITECTURE_KEYS) on which two configs differ."""
    from rae_scale.checkpoint.export import flatten_state_dict  # dotted leaves of a nested dict

    def pick(cfg):
        return {k: v for k, v in flatten_state_dict(cfg).items()
                if any(k == p or k.startswith(p + ".") for p in ARCHITECTURE_KEYS[job])
                and not any(k == i or k.startswith(i + ".") for i in ARCHITECTURE_IGNORED)}

    now, then = pick(current), pick(saved)
    missing = object()
    return [f"{k}: {then.get(k, missing)!r} in the checkpoint, {now.get(k, missing)!r} now".replace(
                repr(missing), "absent")
            for k in sorted(set(now) | set(then)) if now.get(k, missing) != then.get(k, missing)]


def _clear_run_outputs(cfg, manager) -> None:
    """checkpoint.overwrite: delete the earlier run's checkpoints, metrics, grids and config (only those)."""
    from rae_scale.checkpoint.storage import join

    for name in ("checkpoints", "metrics.jsonl", "samples", "config.yaml"):
        url = join(manager.run_url, name)
        if manager.storage.exists(url):
            manager.storage.rm(url, recursive=manager.storage.isdir(url))
    manager.storage.invalidate()
    log.warning("checkpoint.overwrite=true: deleted the earlier run's checkpoints, metrics and grids in %s",
                manager.run_url)


def resume_or_start(cfg, info, ckpt_io, job: str) -> str | None:
    """Resume as checkpoint.resume says, refusing what does not fit, then write the resolved config.

    never: a folder that holds committed checkpoints is refused (retention would delete each new
    save as older than the old run's) unless checkpoint.overwrite clears it. auto / URL: the
    checkpoint's architecture keys must equal the config's. The resolved config is written only
    after this succeeded, so a refused start leaves the folder as it was. Returns the step folder
    resumed from, or None for a fresh start.
    """
    from rae_scale.config import save_resolved
    from rae_scale.parallel.dist import barrier, broadcast_object

    c, manager = cfg.checkpoint, ckpt_io.manager
    if c.overwrite and c.resume != "never":
        raise TrainingSetupError(f"checkpoint.overwrite=true needs checkpoint.resume=never (got {c.resume!r}): "
                                 "overwrite deletes the run folder's checkpoints, so it never applies to a resume")
    problem = None
    if info.rank == 0:
        if c.resume == "never":
            steps = manager.committed_steps()
            if steps and not c.overwrite:
                problem = (f"checkpoint.resume=never, but run.dir {cfg.run.dir} holds committed checkpoints "
                           f"(steps {steps[0]}..{steps[-1]}); set checkpoint.resume=auto to continue that run, "
                           "checkpoint.overwrite=true to delete it and start anew, or choose another run.dir")
            elif steps:
                _clear_run_outputs(cfg, manager)
        else:
            problem = _check_architecture(cfg, manager, job)
    problem = broadcast_object(problem)
    if problem:
        raise TrainingSetupError(problem)
    barrier()
    resumed = ckpt_io.resume(c.resume)
    if info.rank == 0:
        url = save_resolved(cfg, cfg.run.dir, cfg.run.storage_options)
        log.info("run folder %s (resolved config at %s)", cfg.run.dir, url)
    return resumed


def _check_architecture(cfg, manager, job: str) -> str | None:
    """An error message when the checkpoint to resume was trained with another architecture, else None."""
    from rae_scale.checkpoint.storage import join
    from rae_scale.config import to_dict

    try:
        step_dir = manager.resolve_resume(cfg.checkpoint.resume) if cfg.checkpoint.resume != "auto" \
            else manager.latest_committed()
    except ValueError as exc:  # a URL that names no committed checkpoint: the user's to fix
        return str(exc)
    if not step_dir:
        return None
    try:
        meta = json.loads(manager._storage_for(step_dir).read_bytes(join(step_dir, "metadata.json")))
    except Exception as exc:  # the manager's load reports unreadable checkpoints (and falls back)
        log.debug("no metadata to compare at %s: %r", step_dir, exc)
        return None
    saved = meta.get("config")
    if not isinstance(saved, Mapping):
        log.warning("%s records no config; cannot check that its architecture matches", step_dir)
        return None
    diff = architecture_mismatch(job, to_dict(cfg), saved)
    if diff:
        return (f"cannot resume {step_dir}: it was trained with another architecture ({'; '.join(diff)}); "
                "use the checkpoint's values, or start a new run (another run.dir, or checkpoint.resume=never "
                "with checkpoint.overwrite=true)")
    return None
