"""FID against epochs of a stage-2 run with online evaluation: the report half of E@FID-k.

The run's metrics.jsonl holds the numbers (online_eval.OnlineEvaluation: `eval_fid`, `eval_epoch`, and
`eval_steps_to_fid_<k>` / `eval_epochs_to_fid_<k>` in the row that first reached each k); this turns
them into `fid_vs_epochs.png` (one horizontal line per configured eval.fid_k, the epoch at which each
was first reached marked) and `fid_vs_epochs.csv` with the same points, so a curve can be compared
with a paper's without reading JSON. The harness writes both at the end of a run
(train.run.Run.finish); `rae-scale report fid RUN` writes them for any run folder.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from rae_scale.storage import filesystem, join

FID_PLOT = "fid_vs_epochs.png"
FID_COLUMN = "eval_fid"
_REACHED = "eval_epochs_to_fid_"


@dataclass
class FIDCurve:
    """The online FIDs of a run in step order, and E@FID-k: {k: (step, epoch)} of every k reached."""

    steps: list[int] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    fids: list[float] = field(default_factory=list)
    ks: list[float] = field(default_factory=list)  # configured and reached, largest first
    reached: dict[float, tuple[int, float]] = field(default_factory=dict)
    guidance: str | None = None  # the online evaluation's guidance.method (E@FID-k counts unguided FID)


def fid_curve(rows: Sequence[Mapping], ks: Sequence[float] = (), steps_per_epoch: int | None = None) -> FIDCurve:
    """The curve of metrics rows (train.metrics.read_metrics). A row's epoch is its `eval_epoch`, else
    step / steps_per_epoch when given, else its whole-epoch `epoch`. One point per step (the last row of
    a step wins), in step order."""
    by_step = {int(r["step"]): r for r in rows if isinstance(r.get(FID_COLUMN), (int, float))}
    out = FIDCurve(ks=sorted({float(k) for k in ks}))
    for step in sorted(by_step):
        row = by_step[step]
        if isinstance(row.get("eval_epoch"), (int, float)):
            epoch = float(row["eval_epoch"])
        elif steps_per_epoch:
            epoch = step / steps_per_epoch
        else:
            epoch = float(row.get("epoch", 0))
        out.steps.append(step)
        out.epochs.append(epoch)
        out.fids.append(float(row[FID_COLUMN]))
        for key, value in row.items():
            if key.startswith(_REACHED) and isinstance(value, (int, float)):
                k = float(key[len(_REACHED):])
                out.reached.setdefault(k, (int(row.get(f"eval_steps_to_fid_{key[len(_REACHED):]}", step)),
                                           float(value)))
        spec = row.get("sampling_spec")
        if isinstance(spec, dict) and isinstance(spec.get("guidance"), dict):
            out.guidance = spec["guidance"].get("method")
    # a guided online FID tracks no k (online_eval.fid_k_values): no lines for the configured ones
    configured = out.ks if out.guidance in (None, "none") else []
    out.ks = sorted(set(configured) | set(out.reached), reverse=True)
    return out


def curve_csv(curve: FIDCurve) -> str:
    """step, epoch, fid per evaluation; reached_k lists the ks (';') this evaluation reached first."""
    first = {}
    for k, (step, _) in curve.reached.items():
        first.setdefault(step, []).append(f"{k:g}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "epoch", "fid", "reached_k"])
    for step, epoch, fid in zip(curve.steps, curve.epochs, curve.fids):
        writer.writerow([step, repr(epoch), repr(fid), ";".join(first.get(step, []))])
    return buf.getvalue()


def plot_curve(curve: FIDCurve, title: str) -> bytes:
    """The PNG: FID against epochs, a dashed line per k, each reached k's E@FID-k marked on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(e, f) for e, f in zip(curve.epochs, curve.fids) if math.isfinite(f)]  # a NaN FID has no point
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if pts:
        ax.plot(*zip(*pts), marker="o", ms=3, lw=1.5, color="C0", label="online FID")
        if min(f for _, f in pts) > 0 and max(f for _, f in pts) / min(f for _, f in pts) > 20:
            ax.set_yscale("log")  # FID falls from hundreds to single digits
    for i, k in enumerate(curve.ks):
        color = f"C{i + 1}"
        if k in curve.reached:
            step, epoch = curve.reached[k]
            label = f"FID {k:g}: reached at epoch {epoch:.4g} (step {step})"
            ax.plot([epoch], [k], marker="v", ms=9, color=color, ls="none")
            ax.axvline(epoch, color=color, ls=":", lw=1)
        else:
            label = f"FID {k:g}: not reached"
        ax.axhline(k, color=color, ls="--", lw=1, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("FID")
    guided = f" (guidance {curve.guidance}: E@FID-k not tracked)" if curve.guidance not in (None, "none") else ""
    ax.set_title(title + guided, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def configured_ks(run_dir: str, storage_options: Mapping | None = None) -> list[float]:
    """eval.fid_k of the run's saved config.yaml ([] without one)."""
    import yaml

    from rae_scale.config.save import CONFIG_FILE

    fs, path = filesystem(join(run_dir, CONFIG_FILE), storage_options)
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as fh:
        cfg = yaml.safe_load(fh) or {}
    return [float(k) for k in ((cfg.get("eval") or {}).get("fid_k") or [])]


def write_fid_curve(run_dir: str, output: str | None = None, *, ks: Sequence[float] | None = None,
                    steps_per_epoch: int | None = None, storage_options: Mapping | None = None) -> dict | None:
    """Write the PNG to `output` (default <run_dir>/fid_vs_epochs.png) and the CSV beside it (same stem);
    ks default to the run's config.yaml. Returns {"png", "csv", "points", "e_at_fid_k"}, or None when
    the run has no online FID rows; FileNotFoundError without a metrics.jsonl."""
    from rae_scale.train.metrics import METRICS_FILE, read_metrics

    fs, path = filesystem(join(run_dir, METRICS_FILE), storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{join(run_dir, METRICS_FILE)} does not exist: is {run_dir} a run folder?")
    rows = read_metrics(run_dir, storage_options)
    curve = fid_curve(rows, configured_ks(run_dir, storage_options) if ks is None else ks, steps_per_epoch)
    if not curve.steps:
        return None
    png = output or join(run_dir, FID_PLOT)
    csv_url = os.path.splitext(png)[0] + ".csv"
    name = os.path.basename(str(run_dir).rstrip("/")) or str(run_dir)
    fs, path = filesystem(png, storage_options)
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(plot_curve(curve, f"{name}: online FID against epochs"))
    fs, path = filesystem(csv_url, storage_options)
    with fs.open(path, "w") as fh:
        fh.write(curve_csv(curve))
    e_at_fid_k = {f"{k:g}": dict(zip(("step", "epoch"), curve.reached[k])) if k in curve.reached else None
                  for k in curve.ks}
    return {"png": png, "csv": csv_url, "points": len(curve.steps), "e_at_fid_k": e_at_fid_k}
