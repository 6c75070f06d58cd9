"""E@FID-k: the first step and epoch at which the online FID reached each configured k, kept in the
checkpointed TrainState (resume keeps it), and only for an unguided online FID."""
from __future__ import annotations

import logging
from pathlib import Path

from rae_scale import config as C
from rae_scale.train.online_eval import FIDMilestones, OnlineEvaluation, fid_k_values
from rae_scale.train.state import TrainState

TINY2 = Path(__file__).resolve().parents[2] / "configs/stage2/tiny_cpu.yaml"


def test_each_k_is_recorded_once_at_the_first_evaluation_that_reaches_it():
    state = TrainState()
    m = FIDMilestones([5, 10, 2], state, steps_per_epoch=4)
    assert m.offer(12.0, 2) == {}
    assert m.offer(float("nan"), 3) == {} and m.offer(None, 3) == {}
    assert m.offer(6.0, 6) == {"eval_steps_to_fid_10": 6, "eval_epochs_to_fid_10": 1.5}
    assert m.offer(9.0, 8) == {}  # 10 was reached already; 5 not yet
    assert m.offer(1.5, 10) == {"eval_steps_to_fid_5": 10, "eval_epochs_to_fid_5": 2.5,
                                "eval_steps_to_fid_2": 10, "eval_epochs_to_fid_2": 2.5}
    # kept in the checkpointed state: a resumed run does not record them again
    resumed = TrainState()
    resumed.load_state_dict(state.state_dict())
    assert resumed.extra["fid_k_reached"]["10"] == {"step": 6, "epoch": 1.5}
    assert FIDMilestones([10, 5, 2], resumed, steps_per_epoch=4).offer(1.0, 12) == {}


def test_online_evaluation_rows_carry_the_milestones():
    state = TrainState()
    fids = iter([20.0, 8.0])
    ev = OnlineEvaluation(lambda strategy, step: {"eval_fid": next(fids), "eval_time_s": 0.0}, state, "fid",
                          every_steps=2, rank=0, fid_k=[10.0], steps_per_epoch=2)
    row, _ = ev.run(None, 2)
    assert "eval_steps_to_fid_10" not in row
    row, _ = ev.run(None, 4)
    assert row["eval_steps_to_fid_10"] == 4 and row["eval_epochs_to_fid_10"] == 2.0


def test_fid_k_counts_unguided_stage2_fid_only(caplog):
    cfg = C.load_config(C.Stage2Job, TINY2, ["eval.fid_k=[10, 5]"])
    assert fid_k_values(cfg, "fid") == [10.0, 5.0]
    assert fid_k_values(cfg, "rfid") == []
    guided = C.load_config(C.Stage2Job, TINY2, ["eval.fid_k=[10]", "guidance.method=cfg", "guidance.scale=2"])
    with caplog.at_level(logging.WARNING):
        assert fid_k_values(guided, "fid") == []
    assert "E@FID-k counts unguided FID" in caplog.text and "guidance.method=cfg" in caplog.text
