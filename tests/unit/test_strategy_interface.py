"""The Strategy methods the loops use instead of reaching inside a strategy: skip_step, current_lr,
checkpoint_io; the factory from the `parallel` config section; the AdamW builder."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from rae_scale.checkpoint import CheckpointManager
from rae_scale.optim import adamw, lr_factor_fn
from rae_scale.parallel import build_strategy_from_config, replicated_strategy
from rae_scale.parallel.checkpoint_io import CheckpointIO

PARALLEL = dict(strategy="ddp", precision="fp32", zero_stage=2, reshard_after_forward=True, hsdp_replicas=None,
                activation_checkpointing="none", ac_every=2, compile=False, deepspeed={})
OPTIMIZER = SimpleNamespace(lr=0.1, betas=[0.8, 0.9], weight_decay=0.01, eps=1e-7)


def _wrapped(info, **parallel):
    torch.manual_seed(0)
    strategy = build_strategy_from_config(SimpleNamespace(**{**PARALLEL, **parallel}), dist=info,
                                          grad_accum_steps=1, micro_batch_size=4, grad_clip=1.0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    net = strategy.wrap(model, blocks=[model[0], model[1]], optimizer_factory=adamw(OPTIMIZER),
                        lr_lambda=lambda step: 1.0 / (step + 1), ema_decay=0.5)
    return strategy, net


def _backward(strategy, net):
    with strategy.accumulate(is_last=True):
        strategy.backward(net(torch.ones(4, 3)).pow(2).mean())


def test_factory_reads_the_parallel_section_and_adamw_its_optimizer_section(one_rank):
    strategy, _ = _wrapped(one_rank)
    assert strategy.grad_clip == 1.0 and strategy.grad_accum_steps == 1
    group = strategy.optimizer.param_groups[0]
    assert isinstance(strategy.optimizer, torch.optim.AdamW)
    assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.8, 0.9), 0.01, 1e-7)
    heads = replicated_strategy(dist=one_rank, grad_accum_steps=3)
    assert heads.grad_accum_steps == 3 and heads.precision == "fp32"


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_skip_step_discards_gradients_and_leaves_weights_schedule_and_ema(one_rank, kind):
    strategy, net = _wrapped(one_rank, strategy=kind)
    _backward(strategy, net)
    assert strategy.step().isfinite()
    assert strategy.current_lr() == pytest.approx(0.1 / 2)  # the schedule stepped once
    before = {k: v.detach().clone() for k, v in strategy.module.state_dict().items()}
    ema_before = {k: v.detach().clone() for k, v in strategy.ema.module.state_dict().items()}
    _backward(strategy, net)
    norm = strategy.skip_step()
    assert math.isnan(float(norm))
    assert all(p.grad is None for p in strategy.module.parameters())
    assert strategy.current_lr() == pytest.approx(0.1 / 2)
    for k, v in strategy.module.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in strategy.ema.module.state_dict().items():
        assert torch.equal(v, ema_before[k])


def test_checkpoint_io_saves_the_strategy_state_beside_the_loops_entries(one_rank, tmp_path):
    strategy, net = _wrapped(one_rank)
    counter = {"n": 0}

    class Counter:
        def state_dict(self):
            return {"n": counter["n"]}

        def load_state_dict(self, state):
            counter["n"] = int(state["n"])

    io = strategy.checkpoint_io(CheckpointManager(tmp_path / "run", async_save=False, rank=0), {"counter": Counter()})
    assert isinstance(io, CheckpointIO)
    assert list(io.app_state()) == ["model", "optimizer", "lr_scheduler", "ema", "counter"]
    _backward(strategy, net)
    strategy.step()
    counter["n"] = 7
    io.save(1)
    saved = {k: v.detach().clone() for k, v in strategy.module.state_dict().items()}
    _backward(strategy, net)
    strategy.step()
    counter["n"] = 8
    assert io.resume("auto").rstrip("/").endswith("step-00000001")
    assert counter["n"] == 7
    for k, v in strategy.module.state_dict().items():
        assert torch.equal(v, saved[k])


def test_lr_factor_warmup_then_cosine_to_final():
    schedule = SimpleNamespace(kind="cosine", warmup_steps=2, warmup_epochs=None, decay_end_step=None,
                               decay_end_epoch=None, final_lr=0.01, warmup_from_zero=True)
    factor = lr_factor_fn(schedule, total_steps=10, steps_per_epoch=5, base_lr=0.1)
    assert [factor(0), factor(1), factor(2)] == [0.5, 1.0, 1.0]
    assert factor(10) == pytest.approx(0.1) and factor(6) == pytest.approx(0.1 + 0.9 * 0.5)
