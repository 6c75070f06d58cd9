"""Sharded save/load across world sizes: FSDP2 on 2 gloo ranks <-> one process."""
from __future__ import annotations

import random

import pytest
import torch
from _workers_checkpoint import (Counter, full_exp_avg, full_params, load_fsdp, save_fsdp,
                                 tiny_mlp, train_steps)
from conftest import run_ranks

from rae_scale.checkpoint import CheckpointManager, ModelOptimizerState, PerRank


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


@pytest.mark.slow
def test_fsdp_async_save_then_resume_on_same_world(tmp_path):
    run = str(tmp_path / "run")
    saved = run_ranks(save_fsdp, 2, run, True)
    step_dir = run + "/checkpoints/step-00000002"
    loaded = run_ranks(load_fsdp, 2, step_dir)
    for rank in range(2):
        s, l = saved[rank], loaded[rank]
        _assert_same(s["params"], l["params"])
        _assert_same(s["exp_avg"], l["exp_avg"])
        assert l["pos"] == 100 + rank  # each rank its own loader state
        assert l["draw"] == s["draw"]  # each rank its own RNG streams
        assert l["meta"]["world_size"] == 2 and l["meta"]["epoch"] == 0
        # the resumed run continues exactly like the uninterrupted one
        assert l["later_losses"] == s["later_losses"]
        _assert_same(s["after"], l["after"])
    # the full parameters agree across ranks
    _assert_same(saved[0]["params"], saved[1]["params"])


@pytest.mark.slow
def test_reshard_2_ranks_to_1_process(tmp_path):
    run = str(tmp_path / "run")
    saved = run_ranks(save_fsdp, 2, run, False)[0]
    model = tiny_mlp(seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mgr = CheckpointManager(run, async_save=False)
    loader = Counter()
    meta = mgr.load(mgr.resolve_resume("auto"),
                    {"train": ModelOptimizerState(model, opt), "loader": PerRank(loader)})
    assert meta["world_size"] == 2 and loader.pos == 100
    _assert_same(full_params(model), saved["params"])
    _assert_same(full_exp_avg(model, opt), saved["exp_avg"])
    assert (torch.rand(1).item(), random.random()) == saved["draw"]  # rank 0's streams


@pytest.mark.slow
def test_reshard_1_process_to_2_ranks(tmp_path):
    run = str(tmp_path / "run")
    model = tiny_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, 2, rank=0)
    mgr = CheckpointManager(run, async_save=True)
    mgr.save(2, {"train": ModelOptimizerState(model, opt), "loader": PerRank(Counter(pos=42))})
    mgr.wait()
    loaded = run_ranks(load_fsdp, 2, mgr.step_url(2))
    for rank in range(2):
        _assert_same(loaded[rank]["params"], full_params(model))
        _assert_same(loaded[rank]["exp_avg"], full_exp_avg(model, opt))
        assert loaded[rank]["pos"] == 42  # rank 1 takes rank 0's loader state
        assert loaded[rank]["meta"]["world_size"] == 1
