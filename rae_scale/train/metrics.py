"""metrics.jsonl: the writer (strict JSON, full float precision, wandb mirror) and its one reader."""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
from typing import Any, Mapping

import torch

from rae_scale.storage import filesystem, join

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # beside the run's checkpoints/ and config.yaml


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
    fs, path = filesystem(join(run_dir, METRICS_FILE), storage_options)
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
        from rae_scale.logs import progress_enabled

        self.rank = rank
        self.enabled = rank == 0
        self._wandb = None
        self.total_steps = total_steps
        self._plain_lines = not progress_enabled(rank)
        if not self.enabled:
            return
        self.fs, self.path = filesystem(join(run_dir, METRICS_FILE), storage_options)
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


def global_sums(values, device: torch.device) -> list[float]:
    """Sum each value (tensors or numbers) over all ranks in one all-reduce of a float64 vector; one
    host synchronisation for all of them."""
    import torch.distributed as dist

    packed = torch.stack([torch.as_tensor(v, device=device).detach().double().reshape(()) for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed.tolist()

