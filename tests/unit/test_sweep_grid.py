"""The sweep's grid, its bad-input errors, its state rules and its report numbers (no Ray, no training)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from rae_scale import config as C
from rae_scale import sweep_grid as G
from rae_scale import sweep_report as R
from rae_scale.config.load import parse_override

REPO = Path(__file__).resolve().parents[2]
STAGE2 = str(REPO / "configs/stage2/tiny_cpu.yaml")


def test_grid_values_read_like_config_overrides():
    assert G.parse_grid_arg("optimizer.lr=1e-4,2.5e-4") == ("optimizer.lr", [1e-4, 2.5e-4])
    assert G.parse_grid_arg("optimizer.betas=[0.9,0.95], [0.9,0.99]") == ("optimizer.betas", [[0.9, 0.95], [0.9, 0.99]])
    assert G.parse_grid_arg("parallel.strategy=ddp,fsdp") == ("parallel.strategy", ["ddp", "fsdp"])
    assert G.parse_grid_arg("gan.spectral_norm=true,false") == ("gan.spectral_norm", [True, False])
    for value in (1e-4, 0.8, 3, True, None, "fsdp", [0.9, 0.95], 0.0):
        assert parse_override(f"k={G.format_value(value)}")[1] == value  # what a trial's override reads back
    for bad, says in (("optimizer.lr", "key=v1,v2"), ("optimizer.lr=", "empty value"), ("optimizer.lr=1,,2", "empty"),
                      ("run.dir=a,b", "set by the sweep"), ("parallel.nproc=1,2", "--ranks-per-trial"),
                      ("optimizer..lr=1", "dotted config key")):
        with pytest.raises(C.ConfigError, match=says):
            G.parse_grid_arg(bad)
    with pytest.raises(C.ConfigError, match="given twice"):
        G.merge_grid({}, ["optimizer.lr=1", "optimizer.lr=2"])
    # the command line replaces a key of the grid file, keeps the others
    assert G.merge_grid({"optimizer.lr": [1.0], "rae.noise_tau": [0.0]}, ["optimizer.lr=2,3"]) == {
        "optimizer.lr": [2, 3], "rae.noise_tau": [0.0]}


def test_expand_is_the_cartesian_product_with_stable_names():
    trials = G.expand({"optimizer.lr": [1e-4, 2e-4, 4e-4], "rae.noise_tau": [0.0, 0.8]})
    assert len(trials) == 6
    assert {t.values for t in trials} == {(("optimizer.lr", lr), ("rae.noise_tau", tau))
                                          for lr in (1e-4, 2e-4, 4e-4) for tau in (0.0, 0.8)}
    assert len({t.name for t in trials}) == 6
    assert all(t.name == t.name.strip() and "/" not in t.name and " " not in t.name for t in trials)
    assert trials[0].overrides == ["optimizer.lr=0.0001", "rae.noise_tau=0.0"]
    # the same grid written in another key order or spelling gives the same names
    again = G.expand({"rae.noise_tau": [0.0, 0.8], "optimizer.lr": [G.parse_grid_arg("x=1e-4")[1][0], 2e-4, 4e-4]})
    assert {t.name for t in again} == {t.name for t in trials}
    # keys with the same last part stay apart
    a = G.trial_name([("optimizer.lr", 1e-4)])
    b = G.trial_name([("gan.disc_optimizer.lr", 1e-4)])
    assert a != b and a.startswith("lr=0.0001-") and b.startswith("lr=0.0001-")
    assert G.expand({})[0].name.startswith("base-") and G.expand({})[0].overrides == []


def test_shipped_sweep_files_use_real_config_keys():
    abl = G.load_grid_file(REPO / "configs/sweeps/stage1_ablations.yaml")
    assert abl.stage == "stage1" and abl.grid == {"gan.disc_weight": [0.0, 0.75], "rae.noise_tau": [0.0, 0.8],
                                                  "optimizer.lr": [1e-4, 2e-4, 4e-4],
                                                  "gan.perceptual_weight": [0.5, 1.0, 2.0]}
    trials = G.expand(abl.grid)
    assert len(trials) == 36
    loaded = G.validate(C.Stage1Job, str(REPO / abl.config), abl.overrides, trials)
    assert len(loaded) == 1 + 1 + 1 + 2 + 2  # each key and value loaded once
    first = loaded[trials[0].name]
    assert (first.gan.disc_weight, first.rae.noise_tau, first.optimizer.lr, first.gan.perceptual_weight) == \
        (0.0, 0.0, 1e-4, 0.5)
    tiny = G.load_grid_file(REPO / "configs/sweeps/tiny_cpu.yaml")
    tiny_trials = G.expand(tiny.grid)
    assert len(tiny_trials) == 4
    cfg = G.validate(C.Stage1Job, str(REPO / tiny.config), tiny.overrides, tiny_trials)[tiny_trials[0].name]
    assert G.trial_max_steps(tiny_trials[0], cfg) == cfg.training.max_steps == 20


def _cli(argv, capsys):
    from rae_scale.commands.cli import main

    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_grid_is_a_one_line_error_before_any_trial(tmp_path, capsys):
    out = tmp_path / "sweep"
    code, err = _cli(["sweep", "stage2", STAGE2, "--grid", "optimizer.lrr=1e-4,2e-4", "--output", str(out)], capsys)
    assert code == 2 and err[-1] == "rae-scale: error: unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'?"
    assert not out.exists()
    # 3 x 3 = 9 trials against --max-trials 8; the default is 64 (65 = 5 x 13)
    code, err = _cli(["sweep", "stage2", STAGE2, "--grid", "optimizer.lr=1,2,3", "--grid", "training.ema_decay=0.1,0.2,0.3",
                      "--max-trials", "8", "--output", str(out)], capsys)
    assert code == 2 and "9 trials, more than --max-trials 8" in err[-1] and "--allow-large" in err[-1]
    code, err = _cli(["sweep", "stage2", STAGE2, "--grid", "run.seed=" + ",".join(map(str, range(13))),
                      "--grid", "training.ema_decay=0.1,0.2,0.3,0.4,0.5", "--output", str(out)], capsys)
    assert code == 2 and "65 trials, more than --max-trials 64" in err[-1]
    # --allow-large passes the count; the bad key below still stops the sweep before any trial
    code, err = _cli(["sweep", "stage2", STAGE2, "--grid", "run.seed=" + ",".join(map(str, range(65))),
                      "--grid", "dit.depthh=1", "--allow-large", "--output", str(out)], capsys)
    assert code == 2 and "unknown config key 'dit.depthh'; did you mean 'dit.depth'?" in err[-1]
    assert not out.exists()


def test_sweep_folder_keeps_earlier_trials_and_refuses_another_sweep(tmp_path):
    from rae_scale.commands.sweep import _report_trials, _sweep_record

    out = tmp_path / "s"
    first = G.expand({"optimizer.lr": [1e-3, 2e-3]})
    _sweep_record(out, "stage2", STAGE2, ["training.max_steps=4"], first, {t.name: 4 for t in first})
    second = G.expand({"optimizer.lr": [2e-3, 4e-3]})
    record = _sweep_record(out, "stage2", STAGE2, ["training.max_steps=4"], second, {t.name: 4 for t in second})
    assert set(record["trials"]) == {t.name for t in first + second}
    trials, keys = _report_trials(record, [t.name for t in second])
    assert [t["name"] for t in trials] == [second[0].name, second[1].name, first[0].name] and keys == ["optimizer.lr"]
    assert [t["in_grid"] for t in trials] == [True, True, False]
    for stage, fixed, says in (("stage1", ["training.max_steps=4"], "stage"),
                               ("stage2", ["training.max_steps=5"], "overrides")):
        with pytest.raises(C.ConfigError, match=f"holds a sweep with {says}"):
            _sweep_record(out, stage, STAGE2, fixed, second, {t.name: 4 for t in second})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(C.ConfigError, match="non-empty folder"):
        _sweep_record(tmp_path / "other", "stage2", STAGE2, [], first, {t.name: 4 for t in first})


def _commit(run: Path, step: int, committed: bool = True) -> None:
    d = run / "checkpoints" / f"step-{step:08d}"
    (d / "dcp").mkdir(parents=True)
    if committed:
        (d / "COMMITTED").write_text("ok")


def test_trial_status_follows_the_committed_checkpoints(tmp_path):
    run = tmp_path / "t"
    assert R.trial_status(run, 4, None) == "pending"
    _commit(run, 2)
    _commit(run, 4, committed=False)  # a save cut short: not a checkpoint
    assert R.trial_status(run, 4, {"exit_code": 75}) == "unfinished"
    assert R.trial_status(run, 4, {"exit_code": 1}) == "failed"
    assert R.trial_status(run, 4, {"exit_code": 75, "early_stopped": True}) == "early_stopped"
    (run / "checkpoints" / "step-00000004" / "COMMITTED").write_text("ok")
    assert R.trial_status(run, 4, {"exit_code": 75, "early_stopped": True}) == "finished"
    # epoch-based runs (no max_steps): the last attempt's clean exit at a committed checkpoint
    assert R.trial_status(run, None, {"exit_code": 0}) == "finished"
    assert R.trial_status(run, None, {"exit_code": 75}) == "unfinished"


def test_report_numbers_are_those_of_metrics_jsonl(tmp_path):
    from rae_scale.train.metrics import MetricsLogger

    series = {"a": [(1, 2.0), (2, 1.25), (3, 1.5)], "b": [(1, 3.0), (2, 0.75)]}
    for name, rows in series.items():
        logger = MetricsLogger(str(R.trial_dir(tmp_path, name)), rank=0)
        for step, loss in rows:
            l1 = float("nan") if (name, step) == ("a", 2) else loss / 3  # written as null + "nonfinite"
            logger.log(step, {"loss": loss, "loss_l1": l1, "images_per_s": 10.0 * step, "lr": 0.1})
        logger.close()
    # an evaluation row as the harness writes it (its own metrics line at that step)
    with open(R.trial_dir(tmp_path, "a") / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 3, "eval_fid": 30.5, "eval_time_s": 2.0}) + "\n")
    _commit(R.trial_dir(tmp_path, "a"), 3)
    _commit(R.trial_dir(tmp_path, "b"), 2)
    R.write_json(R.state_path(tmp_path, "a"), {"exit_code": 0, "wall_s": 12.5})
    trials = [{"name": "a", "values": {"optimizer.lr": 0.1}, "max_steps": 3},
              {"name": "b", "values": {"optimizer.lr": 0.2}, "max_steps": 3}]
    summary = R.write_report(tmp_path, trials, ["optimizer.lr"], metric="loss", mode="min", title="t")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    a, b = rows
    assert (a["status"], b["status"]) == ("finished", "unfinished") and (a["steps"], b["steps"]) == ("3", "2")
    assert float(a["final_loss"]) == 1.5 and float(a["best_loss"]) == 1.25 and float(b["final_loss"]) == 0.75
    assert float(a["final_loss_l1"]) == float(a["best_loss_l1"]) == 1.5 / 3  # bit for bit; the NaN is no best
    assert float(a["final_eval_fid"]) == 30.5 and b["final_eval_fid"] == "" and "final_eval_time_s" not in a
    assert float(a["images_per_s"]) == 20.0 and float(a["wall_s"]) == 12.5 and b["wall_s"] == ""
    assert (a["best"], b["best"]) == ("", "*") and summary["best"] == "b"
    rows_max, _ = R.build_rows(tmp_path, trials, ["optimizer.lr"])
    assert R.mark_best(rows_max, "loss", "max") == "a" and R.mark_best(rows_max, "eval_fid", "min") == "a"
    assert R.mark_best(rows_max, "no_such_metric", "min") is None
    assert set(summary["figures"]) == {"curves/loss.png", "curves/loss_l1.png", "curves/eval_fid.png"}
    text = (tmp_path / "report.md").read_text()
    assert "**b**" in text and all(f"]({f})" in text for f in summary["figures"])
