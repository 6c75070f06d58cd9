"""Rank workers for the parallel-package tests, and the tiny transformer they train.

Each world function runs a single-process reference on every rank (same seed, full batch) and then the
strategies under test on the ranks' shards of the same batch, and returns plain numbers/tensors; the test
process does the asserting.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from rae_scale.parallel import build_strategy, init_distributed

IN_DIM, DIM, HIDDEN, TOKENS, OUT_DIM, DEPTH, HEADS = 8, 32, 64, 8, 8, 3, 2
GLOBAL_BATCH = 8
STEPS = 5
LR = 1e-2
CLIP = 0.5
EMA_DECAY = 0.9
INIT_SEED = 1234


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 3)  # a short warmup, so the schedule is exercised


def make_optimizer(params):
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.01)


class TinyBlock(nn.Module):
    """Pre-LN attention + MLP block, the shape of a DiT block without adaLN."""

    def __init__(self, dim: int = DIM, hidden: int = HIDDEN, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        # no qkv bias: the key bias gets an exactly-zero gradient (softmax ignores a per-query shift), and
        # Adam turns that direction's rounding noise into O(lr) updates that differ between reductions
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Embed -> blocks -> norm -> head, with a learned and a frozen position parameter on the root."""

    def __init__(self, depth: int = DEPTH) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_DIM, DIM)
        self.pos = nn.Parameter(torch.randn(1, TOKENS, DIM) * 0.02)
        pos = torch.arange(TOKENS, dtype=torch.float32)[:, None] / 10 ** (torch.arange(DIM) / DIM)
        self.fixed_pos = nn.Parameter(torch.sin(pos)[None], requires_grad=False)
        self.register_buffer("out_scale", torch.tensor(1.5))
        self.blocks = nn.ModuleList(TinyBlock() for _ in range(depth))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, OUT_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos + self.fixed_pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)) * self.out_scale


def build_model() -> TinyTransformer:
    """The same initial weights on every rank (the strategies do not broadcast them), the rank's stream untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(INIT_SEED)
        return TinyTransformer()


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)  # gloo has no AVG
        out /= dist.get_world_size()
    return out


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (local shards for DTensors)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def local_state_bytes(strategy) -> dict[str, int]:
    """Bytes this rank holds for parameters and optimizer state (shards only); DeepSpeed also its fp32 master
    partition, and its parameters are the local partitions under ZeRO-3."""
    if strategy.kind != "deepspeed":
        states = [t for st in strategy.optimizer.state.values() for t in st.values()
                  if isinstance(t, torch.Tensor) and t.dim() > 0]  # skip Adam's scalar step counters
        return {"params": tensor_bytes(strategy.module.parameters()), "optimizer": tensor_bytes(states)}
    zero = strategy.optimizer
    inner = getattr(zero, "optimizer", zero)  # ZeRO wraps the torch optimizer
    states = [t for st in inner.state.values() for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    # ZeRO-3 swaps its fp32 partitions into the inner optimizer only during step(); ZeRO-1/2 keep them
    masters = (getattr(zero, "fp32_partitioned_groups_flat", None)
               or getattr(zero, "single_partition_of_fp32_groups", None)
               or [p for group in inner.param_groups for p in group["params"]])
    params = [getattr(p, "ds_tensor", p) for p in strategy.module.parameters()]
    return {"params": tensor_bytes(params), "optimizer": tensor_bytes(states), "master": tensor_bytes(masters)}


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, TOKENS, IN_DIM, generator=g)
    y = torch.randn(GLOBAL_BATCH, TOKENS, OUT_DIM, generator=g)
    return x, y


def reference_run(steps: int = STEPS, ema_decay: float = EMA_DECAY) -> dict:
    """One process, full batch, plain torch: the numbers every strategy must reproduce."""
    model = build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ema = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    losses, norms = [], []
    for step in range(steps):
        x, y = global_batch(step)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
        coef = min(1.0, CLIP / (float(norm) + 1e-6))
        for p in params:
            p.grad.mul_(coef)
        opt.step()
        opt.zero_grad()
        sched.step()
        # EMA by hand, in float64: ema = d * ema + (1 - d) * param
        for n, p in model.named_parameters():
            ema[n] = ema_decay * ema[n] + (1 - ema_decay) * p.detach().double()
        losses.append(loss.item())
        norms.append(norm.item())
    return {"losses": losses, "norms": norms,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "ema": {n: v.float() for n, v in ema.items()}}


def train_with(kind: str, rank: int, world: int, *, steps: int = STEPS, accum: int = 1,
               ema_decay: float | None = EMA_DECAY, model: nn.Module | None = None, gathered_ema: bool = False,
               **kwargs) -> dict:
    """Train the tiny model with a strategy on this rank's shard of each global batch. gathered_ema
    (DeepSpeed): also average the full fp32 masters gathered after every step, the EMA by its definition."""
    info = init_distributed()
    model = build_model() if model is None else model
    by_definition = None
    if gathered_ema:
        from deepspeed.utils import safe_get_full_fp32_param

        by_definition = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    per_rank = GLOBAL_BATCH // world
    strategy = build_strategy(kind, dist=info, grad_accum_steps=accum, grad_clip=CLIP,
                              micro_batch_size=per_rank // accum, **kwargs)
    wrapped = strategy.wrap(model, blocks=model.blocks, optimizer_factory=make_optimizer,
                            lr_lambda=lr_lambda, ema_decay=ema_decay)
    losses, norms = [], []
    for step in range(steps):
        losses.append(train_step(strategy, wrapped, step, rank, world, accum))
        norms.append(float(strategy.step()))
        if by_definition is not None:
            for name, param in strategy.module.named_parameters():
                if name in by_definition:
                    by_definition[name].lerp_(safe_get_full_fp32_param(param), 1.0 - ema_decay)
    out = {"losses": losses, "norms": norms, "params": strategy.full_state_dict(),
           "bytes": local_state_bytes(strategy), "strategy": strategy}
    if by_definition is not None:
        out["ema_by_definition"] = by_definition
    if ema_decay is not None:
        out["ema"] = strategy.ema_full_state_dict()
    return out


def train_step(strategy, wrapped, step: int, rank: int, world: int, accum: int) -> float:
    """Forward/backward of one global batch (this rank's shard, in `accum` micro-batches); returns the loss."""
    x, y = global_batch(step)
    per_rank = GLOBAL_BATCH // world
    xs, ys = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
    total = torch.zeros(())
    for i, (xm, ym) in enumerate(zip(xs.chunk(accum), ys.chunk(accum))):
        with strategy.accumulate(is_last=i == accum - 1):
            with strategy.autocast():
                out = wrapped(xm.to(strategy.dist.device))
            loss = F.mse_loss(out.float(), ym.to(strategy.dist.device))
            strategy.backward(loss)
        total += loss.detach().float().cpu() / accum
    return float(mean_over_ranks(total))


def _without_strategy(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "strategy"}


def grads_after_one_backward(kind: str, mode: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    info = init_distributed()
    model = build_model()
    strategy = build_strategy(kind, dist=info, activation_checkpointing=mode, ac_every=2)
    wrapped = strategy.wrap(model, blocks=model.blocks, optimizer_factory=make_optimizer)
    train_step(strategy, wrapped, 0, rank, world, 1)
    from rae_scale.parallel.ema import local_tensor

    return {n: local_tensor(p.grad).clone() for n, p in strategy.module.named_parameters() if p.grad is not None}


# ---- worlds ---------------------------------------------------------------------------------------------
TORCH_CASES = {
    "ddp": dict(kind="ddp"),
    "ddp_accum2": dict(kind="ddp", accum=2),
    "fsdp": dict(kind="fsdp"),
    "fsdp_accum2_ac": dict(kind="fsdp", accum=2, activation_checkpointing="full"),
    "fsdp_no_reshard_ac_every2": dict(kind="fsdp", reshard_after_forward=False,
                                      activation_checkpointing="every_k", ac_every=2),
    "hsdp_2x1": dict(kind="fsdp", hsdp_replicas=2),
    "hsdp_1x2": dict(kind="fsdp", hsdp_replicas=1),
}
BF16_CASES = {
    "ddp_bf16": dict(kind="ddp", precision="bf16"),
    "fsdp_bf16": dict(kind="fsdp", precision="bf16"),
}


def torch_world(rank: int, world: int) -> dict:
    """Reference vs DDP / FSDP2 / HSDP (fp32, bf16, accumulation, AC)."""
    results = {"reference": reference_run()}
    for name, case in TORCH_CASES.items():
        results[name] = _without_strategy(train_with(rank=rank, world=world, **case))
    return plain(results)


def torch_state_world(rank: int, world: int, ckpt_dir: str) -> dict:
    """bf16 runs, AC on/off gradients under DDP and FSDP2, and a DCP save/load round trip of FSDP2 state."""
    results = {"reference": reference_run()}
    for name, case in BF16_CASES.items():
        results[name] = _without_strategy(train_with(rank=rank, world=world, **case))
    results["ac_grads"] = {mode: grads_after_one_backward(kind, mode, rank, world)
                           for kind in ("ddp",) for mode in ("none", "full", "every_k")}
    results["fsdp_ac_grads"] = {mode: grads_after_one_backward("fsdp", mode, rank, world)
                                for mode in ("none", "full")}
    results["dcp_roundtrip"] = dcp_roundtrip(rank, world, ckpt_dir)
    return plain(results)


def dcp_roundtrip(rank: int, world: int, path: str) -> dict:
    """Save FSDP2 model/optimizer/EMA/schedule through DCP, load into a fresh strategy, compare next losses."""
    import torch.distributed.checkpoint as dcp

    first = train_with("fsdp", rank, world, steps=3)
    strategy = first["strategy"]
    dcp.save(strategy.checkpoint_states(), checkpoint_id=path)
    continued = [train_step(strategy, strategy.model, 3 + i, rank, world, 1) for i in range(1)]
    strategy.step()

    second = train_with("fsdp", rank, world, steps=0)  # fresh weights, fresh optimizer
    fresh = second["strategy"]
    states = fresh.checkpoint_states()
    dcp.load(states, checkpoint_id=path)
    resumed = [train_step(fresh, fresh.model, 3 + i, rank, world, 1) for i in range(1)]
    fresh.step()
    return {"continued": continued, "resumed": resumed,
            "lr_continued": strategy.scheduler.get_last_lr(), "lr_resumed": fresh.scheduler.get_last_lr(),
            "ema_equal": all(torch.equal(a, b) for a, b in zip(strategy.ema_full_state_dict().values(),
                                                                fresh.ema_full_state_dict().values()))}


ZERO3_OVERRIDES = {
    # partition every parameter: by default ZeRO-3 keeps tensors under 1e5 elements whole on each rank
    "zero_optimization.stage3_param_persistence_threshold": 0,
}


def deepspeed_world(rank: int, world: int, ckpt_dir: str) -> dict:
    """Reference vs DeepSpeed ZeRO-1/2/3 (fp32, bf16, accumulation), memory, EMA, native save/load."""
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    results = {"reference": reference_run()}
    cases = {
        "zero1": dict(zero_stage=1),
        "zero2": dict(zero_stage=2),
        "zero3": dict(zero_stage=3, deepspeed_overrides=ZERO3_OVERRIDES),
        "zero2_accum2": dict(zero_stage=2, accum=2),
        "zero3_accum2": dict(zero_stage=3, accum=2, deepspeed_overrides=ZERO3_OVERRIDES),
        "zero2_bf16": dict(zero_stage=2, precision="bf16", gathered_ema=True),
    }
    for name, case in cases.items():
        out = train_with("deepspeed", rank, world, **case)
        if name == "zero3":
            results["zero3_save_load"] = native_roundtrip(out["strategy"], rank, world, ckpt_dir)
        results[name] = _without_strategy(out)
    results["ddp"] = _without_strategy(train_with("ddp", rank, world, ema_decay=None))
    return plain(results)


def native_roundtrip(strategy, rank: int, world: int, ckpt_dir: str) -> dict:
    strategy.save_native(ckpt_dir, tag="step5", client_state={"step": 5})
    continued = train_step(strategy, strategy.model, 5, rank, world, 1)
    strategy.step()
    fresh = train_with("deepspeed", rank, world, steps=0, zero_stage=3, deepspeed_overrides=ZERO3_OVERRIDES)
    client = fresh["strategy"].load_native(ckpt_dir, tag="step5")
    resumed = train_step(fresh["strategy"], fresh["strategy"].model, 5, rank, world, 1)
    fresh["strategy"].step()
    return {"continued": continued, "resumed": resumed, "client_step": client.get("step"),
            "ema_equal": all(torch.equal(a, b) for a, b in zip(strategy.ema_full_state_dict().values(),
                                                                fresh["strategy"].ema_full_state_dict().values()))}


def plain(obj):
    """Tensors -> numpy arrays: results cross the process boundary by value, not by shared memory
    (a rank exits before the test process reads its queue)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().float().cpu().numpy()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def universal_resume_world(rank: int, world: int, ckpt_dir: str, tag: str) -> dict:
    """Load a universal checkpoint (converted from a 2-rank ZeRO-3 save) on this world and take one step."""
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    out = train_with("deepspeed", rank, world, steps=0, zero_stage=3, deepspeed_overrides=ZERO3_OVERRIDES)
    strategy = out["strategy"]
    client = strategy.load_native(ckpt_dir, tag=tag, load_universal=True)
    loss = train_step(strategy, strategy.model, 5, rank, world, 1)
    strategy.step()
    return plain({"loss": loss, "client_step": client.get("step"), "ema": strategy.ema_full_state_dict()})


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


__all__ = ["TinyTransformer", "deepspeed_world", "torch_world"]
