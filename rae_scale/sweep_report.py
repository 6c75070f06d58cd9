"""A sweep's state on disk and its comparison report, built from each trial's own run folder.

A sweep folder holds::

    sweep.json          the sweep: stage, config, fixed overrides, every trial ever in its grid
    trials/<name>/      each trial's run folder (checkpoints/, metrics.jsonl, config.yaml)
    state/<name>.json   what the sweep saw of each attempt: exit code, wall time, early stop
    logs/<name>.log     each trial's output
    report.md, results.csv, curves/<metric>.png

A trial is finished when its newest committed checkpoint is at training.max_steps (the platform's own
rule: what a resume would continue from), or, for epoch-based runs, when its last attempt exited 0 at
that checkpoint. Everything in the report comes from metrics.jsonl, the checkpoints and state/.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
TRIALS_DIR = "trials"
STATE_DIR = "state"
LOGS_DIR = "logs"
CURVES_DIR = "curves"
REPORT_FILE = "report.md"
RESULTS_FILE = "results.csv"
STOP_FILE = "STOP"  # written by a stopping driver; running trials see it and stop their run (SIGTERM)
TIMING_COLUMNS = ("images_per_s", "wall_s")  # differ between two runs of the same sweep
EXIT_PREEMPTED = 75  # rae_scale.checkpoint.preemption.EXIT_CODE_PREEMPTED (not imported: that pulls in torch)


def trial_dir(sweep_dir: str | Path, name: str) -> Path:
    return Path(sweep_dir) / TRIALS_DIR / name


def state_path(sweep_dir: str | Path, name: str) -> Path:
    return Path(sweep_dir) / STATE_DIR / f"{name}.json"


def read_json(path: str | Path, default: Any = None) -> Any:
    p = Path(path)
    if not p.is_file():
        return default
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return default


def write_json(path: str | Path, data: Any) -> None:
    """Write through a temporary file and a rename: a reader never sees half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(p)


def committed_steps(run_dir: str | Path) -> list[int]:
    """Steps of the run's committed checkpoints (checkpoint/layout.py's rule), ascending."""
    from rae_scale.checkpoint.layout import committed_steps as layout_committed
    from rae_scale.checkpoint.storage import Storage
    from rae_scale.storage import normalize

    url = normalize(str(run_dir))
    if not Path(run_dir).is_dir():
        return []
    return layout_committed(Storage(url), url)


def trial_status(run_dir: str | Path, max_steps: int | None, state: Mapping | None) -> str:
    """finished | early_stopped | failed | unfinished | pending (never started)."""
    state = state or {}
    steps = committed_steps(run_dir)
    last = steps[-1] if steps else None
    if last is not None:
        if max_steps is not None and last >= max_steps:
            return "finished"
        if max_steps is None and state.get("exit_code") == 0:  # the training ends with 0 only at its last step
            return "finished"
    if state.get("early_stopped"):
        return "early_stopped"
    code = state.get("exit_code")
    if code not in (None, 0, EXIT_PREEMPTED) and not state.get("stopped"):  # stopped by the sweep: unfinished
        return "failed"
    return "unfinished" if (last is not None or state) else "pending"


# ----------------------------------------------------------------------------- one trial's numbers


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_loss_key(key: str) -> bool:
    return key.startswith("loss")


def is_eval_key(key: str) -> bool:
    return key.startswith("eval_") and key != "eval_time_s"


def summarize_metrics(rows: Sequence[Mapping]) -> dict[str, Any]:
    """final_<k> and best_<k> (lowest) of each loss term, final_<k> of each online-evaluation metric,
    mean images/s, and the last logged step."""
    out: dict[str, Any] = {"logged_step": max((r["step"] for r in rows if "step" in r), default=0)}
    keys = sorted({k for r in rows for k in r if is_loss_key(k) or is_eval_key(k)})
    for key in keys:
        series = [r[key] for r in rows if _number(r.get(key))]
        if not series:
            continue
        out[f"final_{key}"] = series[-1]
        if is_loss_key(key):
            finite = [v for v in series if math.isfinite(v)]
            out[f"best_{key}"] = min(finite) if finite else series[-1]
    ips = [r["images_per_s"] for r in rows if _number(r.get("images_per_s"))]
    out["images_per_s"] = sum(ips) / len(ips) if ips else None
    return out


def curve(rows: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metrics.jsonl column."""
    pts = [(r["step"], r[key]) for r in rows if "step" in r and _number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def read_trial_metrics(run_dir: str | Path) -> list[dict]:
    """The trial's metrics.jsonl rows, through the one reader (non-finite values restored)."""
    from rae_scale.train.metrics import read_metrics

    return read_metrics(str(run_dir)) if Path(run_dir).is_dir() else []


# ----------------------------------------------------------------------------- the report


def build_rows(sweep_dir: str | Path, trials: Iterable[Mapping], grid_keys: Sequence[str]) -> tuple[list[dict], dict]:
    """One row per trial (trials: {"name", "values": {key: value}, "max_steps", "in_grid"}), and the
    metrics rows of every trial by name (for the curves)."""
    rows, metrics = [], {}
    for t in trials:
        run_dir = trial_dir(sweep_dir, t["name"])
        state = read_json(state_path(sweep_dir, t["name"]), {})
        m = read_trial_metrics(run_dir)
        metrics[t["name"]] = m
        steps = committed_steps(run_dir)
        row: dict[str, Any] = {"trial": t["name"]}
        row.update({k: t["values"].get(k, "") for k in grid_keys})
        row["status"] = trial_status(run_dir, t.get("max_steps"), state)
        if not t.get("in_grid", True):
            row["status"] += " (not in the current grid)"
        row["steps"] = steps[-1] if steps else 0
        row.update(summarize_metrics(m))
        row["wall_s"] = state.get("wall_s")
        rows.append(row)
    return rows, metrics


def mark_best(rows: list[dict], metric: str, mode: str) -> str | None:
    """Set row["best"] = "*" on the trial whose final value of `metric` is best; returns its name."""
    column = metric if metric in TIMING_COLUMNS or metric.startswith(("final_", "best_")) else f"final_{metric}"
    scored = [r for r in rows if _number(r.get(column)) and math.isfinite(r[column])]
    for r in rows:
        r["best"] = ""
    if not scored:
        return None
    pick = min if mode == "min" else max
    best = pick(scored, key=lambda r: r[column])
    best["best"] = "*"
    return best["trial"]


def _columns(rows: Sequence[Mapping], grid_keys: Sequence[str]) -> list[str]:
    head = ["trial", *grid_keys, "status", "steps", "logged_step"]
    metric_cols = sorted({k for r in rows for k in r if k.startswith(("final_", "best_"))},
                         key=lambda k: (k.split("_", 1)[1].startswith("eval_"), k.split("_", 1)[1], k))
    return [*head, *metric_cols, *TIMING_COLUMNS, "best"]


def results_csv(rows: Sequence[Mapping], grid_keys: Sequence[str]) -> str:
    """CSV text; floats at full precision (repr), so the numbers equal those in metrics.jsonl."""
    buf = io.StringIO()
    cols = _columns(rows, grid_keys)
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ("" if r.get(c) is None else _csv_value(r.get(c, ""))) for c in cols})
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v).replace("|", "\\|")


def report_md(rows: Sequence[Mapping], grid_keys: Sequence[str], *, title: str, metric: str, mode: str,
              best: str | None, figures: Sequence[str], notes: Sequence[str] = ()) -> str:
    cols = _columns(rows, grid_keys)
    lines = [f"# {title}", ""]
    if best:
        lines.append(f"Best trial by final `{metric}` ({mode}): **{best}** (marked * below).")
    else:
        lines.append(f"No trial has logged `{metric}` yet: no best trial.")
    done = sum(1 for r in rows if r["status"] == "finished")
    lines += [f"{done} of {len(rows)} trials finished. Numbers are from each trial's metrics.jsonl "
              "(final = last logged value, best = lowest); images/s is the mean over logged windows; "
              "full precision in results.csv.", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    if figures:
        lines += ["", "## Curves", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in figures]
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_curves(out_dir: Path, metrics: Mapping[str, Sequence[Mapping]], best: str | None) -> tuple[list[str], list[str]]:
    """One PNG per loss term / evaluation metric, every trial overlaid (the best one drawn thicker).
    Returns (relative paths written, notes); without matplotlib, no figures and a note saying so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["matplotlib is not installed: no curve figures (pip install matplotlib)"]
    keys = sorted({k for rows in metrics.values() for r in rows for k in r if is_loss_key(k) or is_eval_key(k)})
    written = []
    (out_dir / CURVES_DIR).mkdir(parents=True, exist_ok=True)
    for key in keys:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = 0
        for name, rows in metrics.items():
            xs, ys = curve(rows, key)
            if xs:
                ax.plot(xs, ys, label=name + (" (best)" if name == best else ""), lw=2.5 if name == best else 1.0,
                        marker="o" if len(xs) < 20 else None, ms=3)
                drawn += 1
        if drawn:
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.set_title(key)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
            rel = f"{CURVES_DIR}/{key}.png"
            fig.tight_layout()
            fig.savefig(out_dir / rel, dpi=100)
            written.append(rel)
        plt.close(fig)
    return written, []


def write_report(sweep_dir: str | Path, trials: Sequence[Mapping], grid_keys: Sequence[str], *, metric: str,
                 mode: str, title: str) -> dict:
    """report.md, results.csv and curves/*.png in the sweep folder; returns a summary."""
    out = Path(sweep_dir)
    rows, metrics = build_rows(out, trials, grid_keys)
    best = mark_best(rows, metric, mode)
    figures, notes = plot_curves(out, metrics, best)
    (out / RESULTS_FILE).write_text(results_csv(rows, grid_keys))
    (out / REPORT_FILE).write_text(report_md(rows, grid_keys, title=title, metric=metric, mode=mode, best=best,
                                             figures=figures, notes=notes))
    statuses = {r["trial"]: r["status"] for r in rows}
    return {"report": str(out / REPORT_FILE), "results": str(out / RESULTS_FILE), "best": best,
            "figures": figures, "statuses": statuses}
