"""Rank workers for the checkpoint tests (spawned by conftest.run_ranks)."""
from __future__ import annotations

import random

import torch
import torch.distributed as dist
from conftest import Position as Counter  # noqa: E402


def tiny_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12),
                               torch.nn.Tanh(), torch.nn.Linear(12, 3))


def shard(model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train_steps(model, opt, steps: int, rank: int, start: int = 0) -> list[float]:
    """Deterministic data per (rank, step); loss is averaged over ranks for the record."""
    losses = []
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * s + rank)
        x = torch.randn(4, 6, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def portable(obj):
    """Tensors -> numpy arrays: torch tensors sent through the result queue would travel as shared
    memory handles that die with the rank process."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v) for v in obj)
    return obj


def full_params(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone()
    return out


def full_exp_avg(model, opt) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = opt.state[p]["exp_avg"]
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return out




def save_fsdp(rank, world_size, run_url, async_save):
    """Train 2 steps under FSDP2, save (async: then train on while it writes), report state."""
    from rae_scale.checkpoint import CheckpointManager, ModelOptimizerState, PerRank

    model = shard(tiny_mlp(), world_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, 2, rank)
    mgr = CheckpointManager(run_url, keep_last=2, async_save=async_save)
    torch.manual_seed(77 + rank)
    random.seed(88 + rank)
    loader = Counter(pos=100 + rank)
    app = {"train": ModelOptimizerState(model, opt), "loader": PerRank(loader)}
    saved = full_params(model), full_exp_avg(model, opt)
    mgr.save(2, app, metadata={"epoch": 0})
    next_draw = (torch.rand(1).item(), random.random())
    # training collectives on the default group while the writer uses its own gloo group
    later_losses = train_steps(model, opt, 2, rank, start=2)
    mgr.wait()
    return portable({"params": saved[0], "exp_avg": saved[1], "draw": next_draw,
                     "later_losses": later_losses, "after": full_params(model)})


def load_fsdp(rank, world_size, step_dir):
    """Load a checkpoint into a freshly seeded FSDP2 model, report full state and RNG draws."""
    from rae_scale.checkpoint import CheckpointManager, ModelOptimizerState, PerRank

    model = shard(tiny_mlp(seed=5), world_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run_url = step_dir.rsplit("/checkpoints/", 1)[0]
    mgr = CheckpointManager(run_url, async_save=False)
    assert mgr.resolve_resume("auto") == step_dir
    loader = Counter()
    meta = mgr.load(step_dir, {"train": ModelOptimizerState(model, opt), "loader": PerRank(loader)})
    loaded = full_params(model), full_exp_avg(model, opt)
    draw = (torch.rand(1).item(), random.random())
    losses = train_steps(model, opt, 2, rank, start=2)
    dist.barrier()
    return portable({"params": loaded[0], "exp_avg": loaded[1], "draw": draw, "pos": loader.pos,
                     "meta": meta, "later_losses": losses, "after": full_params(model)})


def preempt_agree(rank, world_size):
    """Only rank 1 gets SIGUSR2; both ranks must agree to stop at the same boundary."""
    import os
    import signal

    from rae_scale.checkpoint import PreemptionHandler

    with PreemptionHandler(signals=("SIGTERM", "SIGUSR2")) as handler:
        first = handler.should_stop()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
        dist.barrier()
        second = handler.should_stop()
        return {"first": first, "second": second, "local": handler.received is not None}  # this rank's own signal


def _ds_engine(world_size, load_universal=False):
    import deepspeed

    import rae_scale.parallel.deepspeed  # noqa: F401  (its CPU settings: no shared-memory op to compile)

    model = tiny_mlp(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "train_batch_size": 2 * world_size, "zero_optimization": {"stage": 2},
              "checkpoint": {"load_universal": load_universal}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _ds_train(engine, rank, steps, start=0):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * s + rank)
        loss = engine(torch.randn(2, 6, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()


def ds_save(rank, world_size, staging_dir):
    """ZeRO-2 on gloo/CPU: train 2 steps, save with universal-checkpoint info, report weights."""
    from rae_scale.checkpoint.deepspeed_format import UNIVERSAL_CLIENT_STATE

    engine = _ds_engine(world_size)
    _ds_train(engine, rank, 2)
    engine.save_checkpoint(staging_dir, tag="global_step2", client_state=UNIVERSAL_CLIENT_STATE)
    return portable({n: p.detach().clone() for n, p in engine.module.named_parameters()})


def ds_load_universal(rank, world_size, load_dir, tag):
    engine = _ds_engine(world_size, load_universal=True)
    engine.load_checkpoint(load_dir, tag=tag)
    return portable({n: p.detach().clone() for n, p in engine.module.named_parameters()})
