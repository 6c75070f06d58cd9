"""CheckpointManager(writer="process"): async saves written by a child process from shared memory.

Checked against the thread writer / the model itself: what is loaded back is the state at the
save() call, the commit marker and retention behave as with the thread, and a failing write in the
child is retried, then raised at the next wait(), and the child keeps serving later saves.
"""
from __future__ import annotations

import os

import pytest
import torch

from rae_scale.checkpoint import CheckpointManager, CheckpointSaveError, ModelOptimizerState, PerRank
from conftest import Position as _Pos  # noqa: E402




def _model_opt(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).pow(2).mean().backward()
    opt.step()
    return model, opt


def _load(mgr, step):
    model, opt = _model_opt(seed=9)
    pos = _Pos()
    meta = mgr.load(mgr.step_url(step), {"train": ModelOptimizerState(model, opt), "loader": PerRank(pos)})
    return model, opt, pos, meta


@pytest.mark.slow  # spawning the writer (a fresh interpreter importing torch) takes 10-20 s here
def test_process_writer_round_trip_snapshot_and_retention(tmp_path):
    model, opt = _model_opt(seed=0)
    mgr = CheckpointManager(tmp_path / "run", keep_last=2, writer="process")
    expected = []
    for step in (1, 2, 3):
        expected.append(({k: v.clone() for k, v in model.state_dict().items()},
                         {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}))
        mgr.save(step, {"train": ModelOptimizerState(model, opt), "loader": PerRank(_Pos(10 * step))},
                 metadata={"epoch": step})
        with torch.no_grad():  # in-place updates while the child writes: must not reach the file
            for p in model.parameters():
                p.add_(1.0)
        opt.state_dict()["state"][0]["exp_avg"].mul_(3.0)
    mgr.close()
    assert mgr.committed_steps() == [2, 3]  # keep_last=2, applied by the child after each commit
    for step in (2, 3):
        weights, adam = expected[step - 1]
        model2, opt2, pos, meta = _load(mgr, step)
        assert meta["epoch"] == step and pos.pos == 10 * step
        for k, v in model2.state_dict().items():
            assert torch.equal(v, weights[k]), (step, k)
        for k, v in opt2.state_dict()["state"][0].items():
            assert torch.equal(torch.as_tensor(v), adam[k]), (step, k)
    d = tmp_path / "run" / "checkpoints" / "step-00000003"
    names = [n for n in os.listdir(d) if n != "dcp"]
    assert max(names, key=lambda n: (d / n).stat().st_mtime_ns) == "COMMITTED"


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["thread", "process"])  # the process writer behaves as the thread
def test_failure_is_retried_surfaced_and_survived(tmp_path, writer):
    model, opt = _model_opt(seed=0)
    mgr = CheckpointManager(tmp_path / "run", writer=writer, max_attempts=2, retry_backoff_s=0.01)
    app = {"train": ModelOptimizerState(model, opt)}
    mgr.save(1, app)
    mgr.wait()
    folder = tmp_path / "run" / "checkpoints"
    folder.rename(tmp_path / "aside")
    folder.write_text("a file where the checkpoints folder must be")  # every write attempt fails
    mgr.save(2, app)  # returns: the failure happens in the background
    with pytest.raises(CheckpointSaveError, match="step 2"):
        mgr.wait()
    folder.unlink()
    (tmp_path / "aside").rename(folder)
    mgr.save(3, app)  # the same writer takes the next save
    mgr.close()
    assert mgr.committed_steps() == [1, 3]


def test_writer_argument_is_checked(tmp_path):
    with pytest.raises(ValueError, match="writer"):
        CheckpointManager(tmp_path / "run", writer="fork")
