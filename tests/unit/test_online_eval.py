"""Online evaluation bookkeeping: the best checkpoint is saved pinned, survives retention and resume,
and the previous best is released; weights reach a plain copy on every rank."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from rae_scale.checkpoint import CheckpointManager
from rae_scale.parallel import build_strategy
from rae_scale.train.state import TrainState
from rae_scale.train.online_eval import BestCheckpoint, OnlineEvaluation, broadcast_module_state, is_due



def _training(tmp_path, info, keep_last=1):
    torch.manual_seed(0)
    strategy = build_strategy("ddp", dist=info)
    model = nn.Sequential(nn.Linear(3, 2))
    strategy.wrap(model, blocks=[model[0]], optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.1),
                  ema_decay=0.5)
    state = TrainState()
    manager = CheckpointManager(tmp_path / "run", keep_last=keep_last, async_save=True, rank=0)
    return strategy, state, manager, strategy.checkpoint_io(manager, {"train_state": state})


def test_best_checkpoint_is_pinned_kept_by_retention_and_released(tmp_path, one_rank):
    strategy, state, manager, ckpt_io = _training(tmp_path, one_rank)
    scores = {2: 5.0, 4: 3.0, 6: 4.0, 8: float("nan"), 10: 2.0}  # FID per evaluated step
    online = OnlineEvaluation(lambda s, step: {"eval_fid": scores[step]}, state, "fid", every_steps=2, rank=0)
    rows = {}
    for step in range(1, 12):
        state.step = step
        row, new_best = online.run(strategy, step) if online.due(step) else ({}, False)
        rows[step] = row
        ckpt_io.save(step, pin=new_best)  # the loop saves every step here (keep_last=1)
        if new_best:
            online.after_save(ckpt_io)
        if step in (4, 6, 8):  # the best so far (step 4) outlives keep_last=1
            ckpt_io.wait()
            assert manager.pinned_steps() == [4] and 4 in manager.committed_steps()
    ckpt_io.wait()
    manager.apply_retention()
    assert manager.pinned_steps() == [10]
    assert manager.committed_steps() == [10, 11]  # step 4 released once step 10 became the best
    assert rows[6]["eval_best_fid"] == 3.0 and rows[10]["eval_best_fid"] == 2.0
    assert state.extra == {"best_metric": "fid", "best_value": 2.0, "best_step": 10}
    assert not online.due(0) and not online.due(3) and online.due(12)


def test_best_survives_resume(tmp_path, one_rank):
    strategy, state, manager, ckpt_io = _training(tmp_path, one_rank, keep_last=3)
    best = BestCheckpoint(state, "rfid")
    assert best.offer(7.0, 1) == (True, None)
    state.step = 1
    ckpt_io.save(1)
    ckpt_io.wait()
    strategy2, state2, _, ckpt_io2 = _training(tmp_path, one_rank, keep_last=3)
    ckpt_io2.resume("auto")
    resumed = BestCheckpoint(state2, "rfid")
    assert (resumed.value, resumed.step) == (7.0, 1)
    assert resumed.offer(8.0, 2) == (False, None)  # worse than the best before the restart
    assert resumed.offer(6.0, 3) == (True, 1)
    assert not resumed.offer(math.inf, 4)[0]


def test_broadcast_module_state_loads_the_weights():
    torch.manual_seed(0)
    src, dst = nn.Sequential(nn.Linear(3, 3)), nn.Sequential(nn.Linear(3, 3))
    broadcast_module_state(dst, src.state_dict(), rank=0)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    try:
        broadcast_module_state(dst, {}, rank=0)
    except RuntimeError as exc:
        assert "lack" in str(exc)
    else:
        raise AssertionError("missing weights must be an error")
    assert is_due(5, 10) and not is_due(0, 10) and not is_due(5, 0)
