"""`rae-scale sweep` for real: tiny stage-2 runs as Ray Tune trials on a local Ray instance.

One sweep folder, shared by the module (CI time): its first half (2 trials, one at a time) is SIGTERMed
once the first trial finished and the second is mid-run; then the same command with the whole grid (the
two and two more: four trials) runs to the end. Checked: the stopped sweep exits 75 through the trials'
preemption saves; the finished trial's folder is untouched by the second run; the stopped trial resumes
from the checkpoint its preemption save committed; the new trials run; the report's numbers are each
trial's own metrics.jsonl; and every trial's numbers equal those of its config trained uninterrupted with
`rae-scale train` (identical numbers; the stopped trial's config is the session's shared 5-step run), as
do their report rows', so the final report is the one an uninterrupted sweep writes.
"""
from __future__ import annotations

import csv
import functools
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from real_training import data_overrides, train_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from train_cli import STAGE2_5_STEPS, reference_run  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = str(REPO_ROOT / "configs/stage2/tiny_cpu.yaml")
STEPS = 5  # as STAGE2_5_STEPS: the session's uninterrupted run of the stopped trial's config is shared
# a sample grid is decoded after every step: slow enough for the stop signal to land mid-run, and no
# change to the training numbers (the EMA weights and its own seeded noise)
FIXED = [f"training.max_steps={STEPS}", "checkpoint.every_steps=1000", "logging.every_steps=1",
         "logging.sample_every_steps=1"]
# The first half runs in grid order: lr 3e-3 finishes, lr 1e-3 (the config's own) is stopped mid-run
# (in the other order uninterrupted_run would train the 3e-3 config once more, and the checks still hold).
# The whole grid adds two trials; ema_decay, a grid key of one value, is a second column of the report.
FIRST_HALF = ["--grid", "optimizer.lr=3e-3,1e-3", "--grid", "training.ema_decay=0.99"]
GRID = ["--grid", "optimizer.lr=3e-3,1e-3,1e-2,3e-4", "--grid", "training.ema_decay=0.99"]
LRS = ("0.003", "0.001", "0.01", "0.0003")


def sweep_cmd(data_root: Path, out: Path, grid: list[str], concurrent: int) -> list[str]:
    return [sys.executable, "-m", "rae_scale.commands.cli", "sweep", "stage2", CONFIG, *data_overrides(data_root),
            *FIXED, *grid, "--output", str(out), "--max-concurrent", str(concurrent)]


def uninterrupted_run(data_root: Path, values: dict) -> Path:
    """The run folder of these trial values trained alone, start to finish, by `rae-scale train` (the
    session's shared 5-step run when the values are the config's own: no run of its own then)."""
    from rae_scale import config as C

    base = C.load_config(C.Stage2Job, CONFIG)
    changed = [f"{k}={v}" for k, v in sorted(values.items())
               if functools.reduce(getattr, k.split("."), base) != v]
    return reference_run(data_root, "stage2", STAGE2_5_STEPS + changed)


def results(out: Path) -> list[dict]:
    with open(out / "results.csv") as fh:
        return list(csv.DictReader(fh))


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl parsed here with json alone (independent of the report's reader)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def stop_after_first_trial(data_root: Path, out: Path) -> tuple[int, str, str, str]:
    """Run the first half of the grid one trial at a time; SIGTERM the driver once one trial finished and
    the other has logged a step. Returns (exit code, its stderr, finished trial, stopped trial)."""
    driver = subprocess.Popen(sweep_cmd(data_root, out, FIRST_HALF, 1), cwd=REPO_ROOT, env=train_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = running = None
    deadline = time.monotonic() + 600
    while driver.poll() is None and time.monotonic() < deadline:
        states = {p.stem: json.loads(p.read_text()) for p in (out / "state").glob("*.json")} \
            if (out / "state").is_dir() else {}
        done = next((n for n, s in states.items() if s.get("exit_code") == 0), None)
        running = next((n for n, s in states.items() if s.get("running")), None)
        log_file = out / "trials" / str(running) / "metrics.jsonl"
        if done and running and log_file.is_file() and "\n" in log_file.read_text():  # a whole row is logged
            driver.send_signal(signal.SIGTERM)
            break
        time.sleep(0.1)
    _, err = driver.communicate(timeout=600)
    return driver.returncode, err, done, running


@pytest.fixture(scope="module")
def sweep(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "grid"
    code, err, done, stopped = stop_after_first_trial(tiny_data, out)
    assert code == 75, f"expected 75 from a stopped sweep, got {code}\n{err[-6000:]}"
    state = json.loads((out / "state" / f"{stopped}.json").read_text())
    saved = sorted((out / "trials" / stopped / "checkpoints").glob("step-*/COMMITTED"))
    before = snapshot(out / "trials" / done)
    proc = subprocess.run(sweep_cmd(tiny_data, out, GRID, 2), cwd=REPO_ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"sweep failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    trials = json.loads((out / "sweep.json").read_text())["trials"]
    return {"out": out, "summary": json.loads(proc.stdout.strip().splitlines()[-1]), "done": done,
            "stopped": stopped, "stopped_state": state, "saved": saved, "before": before,
            "uninterrupted": {name: uninterrupted_run(tiny_data, t["values"]) for name, t in trials.items()}}


def test_sweep_finishes_and_reports_each_trials_metrics(sweep):
    out, summary = sweep["out"], sweep["summary"]
    rows = results(out)
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows), rows
    assert {(r["optimizer.lr"], r["training.ema_decay"]) for r in rows} == {(lr, "0.99") for lr in LRS}
    final_loss = {}
    for r in rows:
        m = metrics_rows(out / "trials" / r["trial"])
        assert [x["step"] for x in m] == list(range(1, STEPS + 1))
        assert int(r["steps"]) == STEPS and int(r["logged_step"]) == STEPS
        loss_keys = sorted({k for x in m for k in x if k.startswith("loss")})
        assert loss_keys and all(f"final_{k}" in r and f"best_{k}" in r for k in loss_keys)
        for key in loss_keys:
            series = [x[key] for x in m if key in x]
            assert float(r[f"final_{key}"]) == series[-1], (r["trial"], key)
            assert float(r[f"best_{key}"]) == min(series), (r["trial"], key)
        final_loss[r["trial"]] = m[-1]["loss"]
    best = min(final_loss, key=final_loss.get)
    assert [r["trial"] for r in rows if r["best"] == "*"] == [best] == [summary["best"]]
    report = (out / "report.md").read_text()
    assert f"**{best}**" in report and all(r["trial"] in report for r in rows)
    for key in ("loss", "loss_avg"):
        png = out / "curves" / f"{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"curves/{key}.png" in report


def test_stopped_sweep_saved_and_resumed_only_the_unfinished_trial(sweep):
    out, stopped = sweep["out"], sweep["stopped"]
    assert sweep["stopped_state"]["exit_code"] == 75, sweep["stopped_state"]  # the trial's preemption exit: saved
    assert sweep["saved"], "the stopped trial committed no checkpoint"
    at = int(sweep["saved"][-1].parent.name.removeprefix("step-"))
    assert 1 <= at < STEPS
    assert snapshot(out / "trials" / sweep["done"]) == sweep["before"]  # finished: not rerun, not touched
    assert json.loads((out / "state" / f"{sweep['done']}.json").read_text())["attempts"] == 1
    log = (out / "logs" / f"{stopped}.log").read_text()
    resumed = [(int(a), int(b)) for a, b in re.findall(r"resumed from \S*step-(\d+) at step (\d+)", log)]
    assert resumed == [(at, at)], log[-3000:]
    assert json.loads((out / "state" / f"{stopped}.json").read_text())["attempts"] == 2


@pytest.mark.parametrize("which", ["stopped", "done", "new"])
def test_every_trial_equals_its_config_trained_uninterrupted(sweep, which):
    """The resumed trial, the one finished before the stop, and the ones the second run added."""
    out = sweep["out"]
    names = {"stopped": [sweep["stopped"]], "done": [sweep["done"]],
             "new": sorted(set(sweep["uninterrupted"]) - {sweep["stopped"], sweep["done"]})}[which]
    assert names and all(names)
    for name in names:
        swept, single = metrics_rows(out / "trials" / name), metrics_rows(sweep["uninterrupted"][name])
        assert [r["step"] for r in swept] == [r["step"] for r in single] == list(range(1, STEPS + 1))
        for a, b in zip(swept, single):
            for key in (k for k in a if k.startswith("loss") or k in ("lr", "grad_norm")):
                assert a[key] == b[key], (name, a["step"], key, a[key], b[key])  # identical, not close
        # so its report row is the one an uninterrupted sweep writes
        row = next(r for r in results(out) if r["trial"] == name)
        for key in ("loss", "loss_avg"):
            series = [x[key] for x in single]
            assert float(row[f"final_{key}"]) == series[-1] and float(row[f"best_{key}"]) == min(series)


def test_asha_stops_the_trial_that_does_not_learn(tiny_data, tmp_path):
    """--scheduler asha on the loss, one trial at a time in grid order: the lr-1e-3 trial runs to its end and
    sets the rungs; the lr-0 trial (its network never moves) falls below the cut at a rung and is stopped
    through the platform's preemption path (it saves), reported as early_stopped, and the sweep succeeds."""
    steps = 16  # ASHA rungs at steps 2, 4, 8, 16 (grace period steps // 8, reduction factor 2)
    out = tmp_path / "asha"
    cmd = [sys.executable, "-m", "rae_scale.commands.cli", "sweep", "stage2", CONFIG, *data_overrides(tiny_data),
           f"training.max_steps={steps}", "checkpoint.every_steps=1000", "logging.every_steps=1",
           "logging.sample_every_steps=1", "--grid", "optimizer.lr=1e-3,0", "--output", str(out),
           "--max-concurrent", "1", "--scheduler", "asha", "--metric", "loss"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sweep failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = results(out)
    learning = next(r for r in rows if r["optimizer.lr"] == "0.001")
    frozen = next(r for r in rows if r is not learning)
    assert learning["status"] == "finished" and int(learning["steps"]) == steps, rows
    assert frozen["status"] == "early_stopped" and int(frozen["logged_step"]) < steps, rows
    # the attempt is recorded as over (Ray may end the trial's worker before the training's own exit code is in)
    state = json.loads((out / "state" / f"{frozen['trial']}.json").read_text())
    assert state["early_stopped"] and not state["running"] and state["attempts"] == 1 and state["wall_s"] > 0, state
    # stopped by SIGTERM through the platform's preemption path: saved where it stood, not failed
    log = (out / "logs" / f"{frozen['trial']}.log").read_text()
    saved = re.findall(r"stop signal received: saved step (\d+), exiting with code 75", log)
    assert saved == [frozen["logged_step"]], log[-3000:]
    assert (out / "trials" / frozen["trial"] / "checkpoints" / f"step-{int(saved[0]):08d}" / "COMMITTED").is_file()
