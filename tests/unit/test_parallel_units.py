"""Single-process pieces of rae_scale.parallel: AC, EMA, DeepSpeed config, frozen modules, precision, errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rae_scale.parallel import EMA, apply_ac, build_strategy, prepare_frozen, set_tf32
from rae_scale.parallel.ac import blocks_to_checkpoint
from rae_scale.parallel.dist import DistInfo
from rae_scale.parallel.ema import trainable_local_params
from rae_scale.parallel.precision import autocast, check_precision

CPU_ONE = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                   is_distributed=False)


class CountingBlock(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(0.5)  # RNG inside the block: recomputation must replay the same mask
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.fc2(self.drop(F.gelu(self.fc1(x))))


class Stack(nn.Module):
    def __init__(self, depth: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(CountingBlock() for _ in range(depth))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def grads_and_calls(model: Stack, x: torch.Tensor) -> tuple[dict, list[int]]:
    torch.manual_seed(0)  # same dropout masks for every model
    model(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, [b.calls for b in model.blocks]


@pytest.mark.parametrize("mode,every,chosen", [("none", 2, []), ("full", 2, [0, 1, 2, 3, 4]),
                                               ("every_k", 2, [0, 2, 4]), ("every_k", 3, [0, 3])])
def test_ac_recomputes_chosen_blocks_with_identical_gradients(mode, every, chosen):
    torch.manual_seed(1)
    base = Stack()
    model = copy.deepcopy(base)
    keys = list(model.state_dict())
    assert apply_ac(model.blocks, mode, every) == chosen
    x = torch.randn(6, 4)
    ref_grads, ref_calls = grads_and_calls(base, x)
    grads, calls = grads_and_calls(model, x)
    assert ref_calls == [1] * 5
    assert calls == [2 if i in chosen else 1 for i in range(5)]  # checkpointed blocks ran again in backward
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    assert list(model.state_dict()) == keys  # names unchanged: checkpoints interchangeable
    apply_ac(model.blocks, mode, every)  # idempotent: no nested checkpoints
    model.zero_grad()
    grads, calls = grads_and_calls(model, x)
    assert calls == [2 * c for c in [2 if i in chosen else 1 for i in range(5)]]


def test_ac_bad_settings_are_named():
    with pytest.raises(ValueError, match="activation_checkpointing='some'.*none, full, every_k"):
        blocks_to_checkpoint(4, "some")
    with pytest.raises(ValueError, match="ac_every must be >= 1"):
        blocks_to_checkpoint(4, "every_k", 0)


def test_ema_matches_hand_computed_recursion():
    torch.manual_seed(0)
    live = Stack(depth=2)
    live.out.bias.requires_grad_(False)  # frozen parameters are not averaged
    ema = EMA(copy.deepcopy(live), 0.8, lambda: trainable_local_params(live))
    expected = {n: p.detach().double().clone() for n, p in live.named_parameters()}
    frozen_before = live.out.bias.detach().clone()
    for _ in range(4):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for n, p in live.named_parameters():
            if p.requires_grad:
                expected[n] = 0.8 * expected[n] + 0.2 * p.detach().double()
    got = dict(ema.module.named_parameters())
    for n, v in expected.items():
        torch.testing.assert_close(got[n].double(), v, rtol=0, atol=1e-6, msg=n)
    assert torch.equal(got["out.bias"], frozen_before)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    # state round trip into a differently initialised EMA
    other = EMA(Stack(depth=2), 0.8, lambda: trainable_local_params(live))
    other.load_state_dict(ema.state_dict())
    for (n, a), (_, b) in zip(other.module.state_dict().items(), ema.module.state_dict().items()):
        assert torch.equal(a, b), n


def test_ema_decay_must_be_a_fraction():
    with pytest.raises(ValueError, match=r"ema decay must be in \[0, 1\]"):
        EMA(Stack(1), 1.5, list)


def test_deepspeed_config_and_dotted_overrides():
    from rae_scale.parallel.deepspeed import apply_dotted_overrides, build_deepspeed_config

    cfg = build_deepspeed_config(zero_stage=3, precision="bf16", micro_batch_size=4, grad_accum_steps=2,
                                 world_size=8, grad_clip=1.0,
                                 overrides={"zero_optimization.overlap_comm": True, "bf16.enabled": False,
                                            "zero_optimization.offload_optimizer.device": "cpu"})
    assert cfg["train_batch_size"] == 4 * 2 * 8
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 1.0 and cfg["communication_data_type"] == "fp32"
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True, "offload_optimizer": {"device": "cpu"}}
    assert cfg["bf16"] == {"enabled": False}  # the override wins
    with pytest.raises(ValueError, match="'gradient_clipping' is a value"):
        apply_dotted_overrides(cfg, {"gradient_clipping.max": 2})
    with pytest.raises(ValueError, match="malformed"):
        apply_dotted_overrides(cfg, {"zero_optimization..stage": 2})
    fp32 = build_deepspeed_config(zero_stage=1, precision="fp32", micro_batch_size=1, grad_accum_steps=1,
                                  world_size=1)
    assert "communication_data_type" not in fp32 and fp32["bf16"] == {"enabled": False}


def test_frozen_module_is_in_eval_mode_and_never_wrapped():
    enc = prepare_frozen(nn.Linear(4, 4), "cpu", torch.bfloat16)
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    assert enc.weight.dtype == torch.bfloat16
    strategy = build_strategy("ddp", dist=CPU_ONE)
    with pytest.raises(ValueError, match="frozen networks are never wrapped"):
        strategy.wrap(enc, blocks=[enc], optimizer_factory=torch.optim.SGD)


def test_precision_helpers():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
    before = torch.get_float32_matmul_precision()
    try:
        set_tf32(True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.allow_tf32 = True
    with pytest.raises(ValueError, match="precision='fp16'.*fp32, bf16"):
        check_precision("fp16")


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="horovod"), "strategy='horovod'.*ddp, fsdp, deepspeed"),
    (dict(kind="ddp", precision="fp8"), "precision='fp8'"),
    (dict(kind="deepspeed", zero_stage=4, micro_batch_size=1), "zero_stage=4.*1, 2, 3"),
    (dict(kind="deepspeed", zero_stage=2), "needs micro_batch_size"),
    (dict(kind="ddp", deepspeed_overrides={"a": 1}), "deepspeed_overrides.*'ddp'"),
    (dict(kind="deepspeed", hsdp_replicas=2, micro_batch_size=1), "hsdp_replicas=2 applies to strategy 'fsdp'"),
    (dict(kind="fsdp", activation_checkpointing="selective"), "activation_checkpointing='selective'"),
    (dict(kind="fsdp", grad_accum_steps=0), "grad_accum_steps must be >= 1"),
    (dict(kind="ddp", grad_clip=-1.0), "grad_clip must be >= 0"),
])
def test_bad_strategy_settings_are_named(kwargs, message):
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError, match=message):
        build_strategy(kind, dist=CPU_ONE, **kwargs)


def test_wrap_rejects_blocks_outside_the_model():
    strategy = build_strategy("ddp", dist=CPU_ONE)
    with pytest.raises(ValueError, match="block 0 .*not a submodule"):
        strategy.wrap(Stack(1), blocks=[nn.Linear(2, 2)], optimizer_factory=torch.optim.SGD)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    from rae_scale.parallel import apply_compile

    torch.manual_seed(0)
    eager = Stack(depth=2).eval()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled.blocks)
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
    assert list(compiled.state_dict()) == list(eager.state_dict())
