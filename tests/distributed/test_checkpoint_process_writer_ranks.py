"""writer="process" on 2 gloo ranks: the ranks' writer processes form their own group, every rank's
files are in the step folder before COMMITTED, and one process loads back what each rank saved."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import run_ranks

from rae_scale.checkpoint import CheckpointManager, ModelOptimizerState, PerRank
from conftest import Position as _Pos  # noqa: E402




def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def save_with_process_writer(rank, world_size, run_url):
    """Same replicated weights on both ranks (as DDP keeps them), a per-rank loader position."""
    model = _model()
    mgr = CheckpointManager(run_url, writer="process")
    for step in (1, 2):
        mgr.save(step, {"m": ModelOptimizerState(model), "loader": PerRank(_Pos(100 * step + rank))})
        expected = {k: v.clone() for k, v in model.state_dict().items()} if step == 2 else None
        with torch.no_grad():  # changes after save() must not reach the checkpoint
            for p in model.parameters():
                p.mul_(-1.0)
    mgr.close()
    return expected


@pytest.mark.slow
def test_process_writer_on_two_ranks(tmp_path):
    run = str(tmp_path / "run")
    saved = run_ranks(save_with_process_writer, 2, run)
    step_dir = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert {"rank_0.pt", "rank_1.pt", "COMMITTED"} <= set(os.listdir(step_dir))
    mgr = CheckpointManager(run, async_save=False)
    assert mgr.committed_steps() == [1, 2]
    model, pos = _model(seed=3), _Pos()
    meta = mgr.load(mgr.resolve_resume("auto"), {"m": ModelOptimizerState(model), "loader": PerRank(pos)})
    assert meta["world_size"] == 2 and pos.pos == 200  # rank 0's own entry
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[0][k]) and torch.equal(v, saved[1][k]), k
