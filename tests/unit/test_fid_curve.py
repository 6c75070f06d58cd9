"""FID against epochs (train.fid_curve): the CSV holds exactly the online-FID rows of metrics.jsonl as the
harness's writer leaves them after a resume, the PNG is written, and `rae-scale report fid` does both."""
from __future__ import annotations

import csv
import json
import math

import pytest

from rae_scale.commands.cli import main
from rae_scale.train.fid_curve import FID_PLOT, fid_curve
from rae_scale.train.metrics import MetricsLogger, read_metrics

STEPS_PER_EPOCH = 4
SPEC = {"guidance": {"method": "none"}, "samples": {"num_samples": 12}}


def _eval_row(step: int, fid: float, **extra) -> dict:
    """What the stage-2 loop logs at an evaluation: training columns plus OnlineEvaluation.run's."""
    return {"loss": 0.5, "epoch": step // STEPS_PER_EPOCH, "eval_fid": fid, "eval_sfid": 2 * fid,
            "eval_best_fid": fid, "eval_epoch": step / STEPS_PER_EPOCH, "eval_time_s": 0.1,
            "sampling_spec": {**SPEC, "checkpoint": {"step": step}}, **extra}


def _log(run_dir, resume_step: int, rows: dict) -> None:
    logger = MetricsLogger(str(run_dir), rank=0, resume_step=resume_step)
    for step, row in rows.items():
        logger.log(step, row)
    logger.close()


@pytest.fixture
def resumed_run(tmp_path):
    """A run evaluated every 2 steps, killed after step 8 and resumed from its step-4 checkpoint: the writer
    drops steps 5-8 and the resumed attempt logs them again with other numbers."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("eval:\n  every_steps: 2\n  fid_k: [10, 3]\n")
    _log(run, 0, {1: {"loss": 0.9, "epoch": 0}, 2: _eval_row(2, 40.0), 4: _eval_row(4, 25.0),
                  6: _eval_row(6, 9.0, eval_steps_to_fid_10=6, eval_epochs_to_fid_10=1.5), 8: _eval_row(8, 8.5)})
    _log(run, 4, {5: {"loss": 0.4, "epoch": 1}, 6: _eval_row(6, 11.0), 8: _eval_row(8, float("nan")),
                  10: _eval_row(10, 7.25, eval_steps_to_fid_10=10, eval_epochs_to_fid_10=2.5)})
    return run


def _csv_rows(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_csv_equals_the_online_fid_rows_and_the_png_is_written(resumed_run, tmp_path, capsys):
    rows = [r for r in read_metrics(str(resumed_run)) if "eval_fid" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]  # each step once: the resumed attempt's 6 and 8
    assert main(["report", "fid", str(resumed_run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["png"] == str(resumed_run / FID_PLOT) and out["points"] == 5
    # 10 from the rows (first reached at step 10 after the resume), 3 from config.yaml: not reached
    assert out["e_at_fid_k"] == {"10": {"step": 10, "epoch": 2.5}, "3": None}
    png = resumed_run / FID_PLOT
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = _csv_rows(out["csv"])
    assert out["csv"] == str(resumed_run / "fid_vs_epochs.csv")
    assert [int(r["step"]) for r in table] == [r["step"] for r in rows]
    assert [float(r["epoch"]) for r in table] == [r["eval_epoch"] for r in rows]
    for got, row in zip(table, rows):  # full precision; the NaN FID is kept as nan
        assert float(got["fid"]) == row["eval_fid"] or (math.isnan(row["eval_fid"]) and got["fid"] == "nan")
    assert [r["reached_k"] for r in table] == ["", "", "", "", "10"]

    # --output: the PNG there, the CSV beside it with the same stem
    target = tmp_path / "figs" / "curve.png"
    assert main(["report", "fid", str(resumed_run), "--output", str(target)]) == 0
    assert target.exists() and (tmp_path / "figs" / "curve.csv").read_text() == (resumed_run / "fid_vs_epochs.csv").read_text()


def test_epochs_without_eval_epoch_and_guided_runs():
    rows = [{"step": 3, "epoch": 0, "eval_fid": 20.0}, {"step": 6, "epoch": 1, "eval_fid": 10.0}]
    assert fid_curve(rows, steps_per_epoch=4).epochs == [0.75, 1.5]  # the harness knows steps per epoch
    assert fid_curve(rows).epochs == [0.0, 1.0]  # else the rows' whole epochs
    guided = [{**r, "sampling_spec": {"guidance": {"method": "cfg"}}} for r in rows]
    assert fid_curve(guided, ks=[10]).ks == []  # a guided online FID tracks no k: no k lines


def test_report_fid_refuses_a_run_without_online_fid(tmp_path, capsys):
    _log(tmp_path / "plain", 0, {1: {"loss": 0.9}})
    capsys.readouterr()
    assert main(["report", "fid", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert "has no online FID rows" in err and "eval.every_steps > 0" in err and len(err.strip().splitlines()) == 1
    assert main(["report", "fid", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
