"""`rae-scale sweep stage1|stage2 CONFIG [k=v ...] --grid key=v1,v2 ...`: a grid of training runs as
Ray Tune trials in one sweep folder, resumable, with a comparison report at the end.

Before any trial starts the grid is expanded, counted (--max-trials) and loaded as job configs (an
unknown key is the config loader's one-line nearest-key error). Running the same command again skips
finished trials (their folders are not touched), resumes unfinished ones from their newest committed
checkpoints (the training CLI's own resume) and adds trials a changed grid brings; trials of an earlier
grid stay in the folder and in the report. Layout and report: rae_scale/sweep_report.py.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Sequence

from rae_scale import config as C
from rae_scale import sweep_grid as G
from rae_scale import sweep_report as R

log = logging.getLogger(__name__)

REPO_ROOT = str(Path(__file__).resolve().parents[2])
DEFAULT_METRIC = "loss"


def _sweep_record(out: Path, stage: str, config: str | None, fixed: Sequence[str], trials: Sequence[G.Trial],
                  max_steps: dict[str, int | None]) -> dict:
    """sweep.json merged with this grid: the same stage, config and fixed overrides, or an error
    (trial names are made from the grid alone, so those must not change under them)."""
    path = out / R.SWEEP_FILE
    record = R.read_json(path)
    if record is None:
        if out.exists() and any(out.iterdir()):
            raise C.ConfigError(f"--output {out} is a non-empty folder without {R.SWEEP_FILE}; choose a new or "
                                "empty folder (or an earlier sweep's)")
        record = {"stage": stage, "config": config, "overrides": list(fixed), "trials": {}}
    else:
        for key, now in (("stage", stage), ("config", config), ("overrides", list(fixed))):
            if record.get(key) != now:
                raise C.ConfigError(f"--output {out} holds a sweep with {key} {record.get(key)!r}, not {now!r}; "
                                    "run the same stage, config and fixed overrides there, or choose another --output")
    for t in trials:
        record["trials"].setdefault(t.name, {"values": dict(t.values), "max_steps": max_steps[t.name]})
    R.write_json(path, record)
    return record


def _report_trials(record: dict, current: Sequence[str]) -> tuple[list[dict], list[str]]:
    """The report's trials (the current grid's in grid order, then those of earlier grids) and grid keys."""
    names = list(current) + [n for n in record["trials"] if n not in set(current)]
    trials = [{"name": n, "values": record["trials"][n]["values"], "max_steps": record["trials"][n]["max_steps"],
               "in_grid": n in current} for n in names]
    keys = sorted({k for t in trials for k in t["values"]})
    return trials, keys


def _data_builder(stage: str, loaded: dict):
    """Build what tiny configs point at once, before any trial (inside the sweep's Ray instance)."""
    def prepare():
        from data_pipeline.tiny import ensure_tiny_data

        seen = set()
        for cfg in loaded.values():
            if not cfg.data.build_if_missing:
                continue
            ident = (cfg.data.url, cfg.data.latents_url, cfg.rae.encoder.pretrained, cfg.rae.stats_path)
            if ident not in seen:
                seen.add(ident)
                ensure_tiny_data(cfg, stage=stage)
    return prepare


def run_sweep(stage: str, config: str | None, fixed: Sequence[str], grid_args: Sequence[str], *,
              grid_file: str | None = None, output: str | None = None, ray_address: str | None = None,
              max_concurrent: int | None = None, ranks_per_trial: int | None = None,
              cpus_per_trial: float | None = None, gpus_per_trial: float = 0.0, scheduler: str | None = None,
              metric: str | None = None, mode: str | None = None, max_trials: int = 64,
              allow_large: bool = False) -> dict:
    """Run (or continue) a sweep; returns a summary with "exit_code" (0, 75 when stopped by a signal,
    1 when a trial failed)."""
    spec = G.load_grid_file(grid_file) if grid_file else G.GridSpec()
    if spec.stage and spec.stage != stage:
        raise C.ConfigError(f"--grid-file {grid_file} is a {spec.stage} sweep, not {stage}")
    config = config or spec.config
    if config is not None:
        if not Path(config).is_file():
            raise C.ConfigError(f"config file '{config}' does not exist")
        config = str(Path(config).resolve())
    fixed = [*spec.overrides, *fixed]
    for item in fixed:
        G.check_key(item.split("=", 1)[0].strip(), f"override {item}", swept=False)
    metric, mode = metric or spec.metric or DEFAULT_METRIC, mode or spec.mode or "min"
    if mode not in ("min", "max"):
        raise C.ConfigError(f"--mode {mode!r}: allowed: min, max")
    if scheduler not in (None, "none", "asha"):
        raise C.ConfigError(f"--scheduler {scheduler!r}: allowed: none, asha")
    scheduler = None if scheduler == "none" else scheduler
    for flag, value in (("--max-concurrent", max_concurrent), ("--ranks-per-trial", ranks_per_trial)):
        if value is not None and value < 1:
            raise C.ConfigError(f"{flag} must be at least 1, got {value}")
    trials = G.expand(G.merge_grid(spec.grid, grid_args))
    G.check_size(len(trials), max_trials, allow_large)
    ranks = [f"parallel.nproc={ranks_per_trial}"] if ranks_per_trial else []
    loaded = G.validate(C.JOBS[stage], config, [*fixed, *ranks], trials)
    base = loaded[trials[0].name]
    max_steps = {t.name: G.trial_max_steps(t, base) for t in trials}

    out = Path(output or f"runs/sweeps/{stage}_{Path(config).stem if config else 'defaults'}").resolve()
    record = _sweep_record(out, stage, config, fixed, trials, max_steps)
    stop_file = out / R.STOP_FILE
    stop_file.unlink(missing_ok=True)

    pending, skipped = [], {}
    for t in trials:
        status = R.trial_status(R.trial_dir(out, t.name), max_steps[t.name], R.read_json(R.state_path(out, t.name)))
        if status == "finished" or (status == "early_stopped" and scheduler):
            skipped[t.name] = status
        else:
            pending.append(t)
    log.info("sweep %s: %d trial(s), %d to run, %d done (%s)", out, len(trials), len(pending), len(skipped),
             ", ".join(sorted(set(skipped.values()))) or "none")

    stopped_by = None
    if pending:
        nproc = ranks_per_trial or max(cfg.parallel.nproc for cfg in loaded.values())
        specs = [_trial_spec(out, stage, config, [*fixed, *ranks], t, stop_file, metric, report_rows=bool(scheduler))
                 for t in pending]
        shutil.rmtree(out / "tune", ignore_errors=True)  # Tune's own bookkeeping: never restored from
        from launchers.ray_sweep import run_trials

        try:
            result = run_trials(specs, storage_path=str(out), stop_file=str(stop_file), address=ray_address,
                                max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial or nproc,
                                gpus_per_trial=gpus_per_trial or 0, scheduler=scheduler, metric=metric, mode=mode,
                                max_t=max((max_steps[t.name] or 0 for t in pending), default=0) or None,
                                prepare=_data_builder(stage, loaded))
        except ValueError as exc:  # the launcher's word on resources
            raise C.ConfigError(str(exc)) from None
        stopped_by = result["stopped_by"]

    report_trials, keys = _report_trials(record, [t.name for t in trials])
    summary = R.write_report(out, report_trials, keys, metric=metric, mode=mode,
                             title=f"Sweep {out.name}: {stage} {Path(config).name if config else '(defaults)'}")
    failed = sorted(n for n, s in summary["statuses"].items() if s == "failed")
    if stopped_by:
        summary["exit_code"] = 75
        log.warning("sweep stopped by %s; run the same command again to resume", stopped_by)
    elif failed:
        summary["exit_code"] = 1
        log.error("%d trial(s) failed: %s (their output: %s)", len(failed), ", ".join(failed), out / R.LOGS_DIR)
    else:
        summary["exit_code"] = 0
    summary["sweep"] = str(out)
    return summary


def _trial_spec(out: Path, stage: str, config: str | None, fixed: Sequence[str], trial: G.Trial, stop_file: Path,
                metric: str, report_rows: bool) -> dict:
    """What launchers.ray_sweep.run_trial needs: the training CLI's argv and where things go."""
    run_dir = R.trial_dir(out, trial.name)
    argv = ["train", stage, *([config] if config else []), *fixed, *trial.overrides, f"run.dir={run_dir}"]
    env = {"RAE_SCALE_PROGRESS": "0"}
    if os.environ.get("RAE_SCALE_DEBUG"):
        env["RAE_SCALE_DEBUG"] = os.environ["RAE_SCALE_DEBUG"]
    return {"name": trial.name, "argv": argv, "run_dir": str(run_dir), "cwd": os.getcwd(),
            "log": str(out / R.LOGS_DIR / f"{trial.name}.log"), "state": str(R.state_path(out, trial.name)),
            "stop_file": str(stop_file), "start_lock": str(out / f".start.{socket.gethostname()}.lock"),
            "metric": metric, "report_rows": report_rows, "pythonpath": REPO_ROOT,
            "env": env}
