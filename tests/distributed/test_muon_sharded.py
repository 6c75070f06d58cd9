"""gmuon (MuonWithAdamW) under DDP, FSDP2 and HSDP on 2 gloo ranks reproduces one process; 2 -> 1 resume.

The model has what decides Muon's split and sharding: tall, wide and square Linear weights (two of
the same shape, batched together), an embedding table with 11 rows (uneven over 2 ranks), a 4-D
conv kernel, biases and a 1-D scale (AdamW). The single-process reference sums the two ranks'
half-batch gradients and halves them, which is what DDP's and FSDP2's reductions compute on 2 ranks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import run_ranks

STEPS = 3
SAVE_AFTER = 2  # the DCP checkpoint is taken after this many steps; the rest is the continuation
LR = 0.02  # large enough that three updates move the weights by ~1e-2 relative: 1e-5 is a real check
WEIGHT_DECAY = 0.1
REL = 1e-5
HALF = 4  # samples per rank; the global batch is 2 * HALF


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, kernel_size=1)  # 4-D kernel -> AdamW
        self.embed = nn.Embedding(11, 8)  # 2-D -> Muon; 11 rows shard 6 + 5
        self.tall = nn.Linear(8, 16)  # (16, 8): transposed, Gram NS
        self.square_a = nn.Linear(16, 16)  # (16, 16) x 2: one batch, standard NS
        self.square_b = nn.Linear(16, 16)
        self.wide = nn.Linear(16, 6)  # (6, 16): Gram NS
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x, y):
        h = self.patch(x).mean(dim=(2, 3)) + self.embed(y)
        h = torch.tanh(self.tall(h))
        h = torch.tanh(self.square_b(torch.tanh(self.square_a(h))))
        return self.wide(h) * self.scale

    def layers(self):
        return [self.patch, self.embed, self.tall, self.square_a, self.square_b, self.wide]


def build_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def batch(step: int):
    """The global batch of a step: the same on every rank, each takes its half."""
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(2 * HALF, 3, 2, 2, generator=g), torch.randint(0, 11, (2 * HALF,), generator=g),
            torch.randn(2 * HALF, 6, generator=g))


def loss_of(model, x, y, target):
    return (model(x, y) - target).pow(2).mean()


def make_optimizer(model):
    from rae_scale.optim.muon import MuonWithAdamW

    return MuonWithAdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def reference_step(model, opt, step: int) -> None:
    """One process: both halves' gradients summed, then halved (the 2-rank mean)."""
    x, y, t = batch(step)
    opt.zero_grad(set_to_none=True)
    for r in range(2):
        part = slice(r * HALF, (r + 1) * HALF)
        loss_of(model, x[part], y[part], t[part]).backward()
    for p in model.parameters():
        p.grad.mul_(0.5)
    opt.step()


def rank_step(model, opt, step: int, rank: int) -> None:
    x, y, t = batch(step)
    part = slice(rank * HALF, (rank + 1) * HALF)
    opt.zero_grad(set_to_none=True)
    loss_of(model, x[part], y[part], t[part]).backward()
    opt.step()


def full(t: torch.Tensor) -> np.ndarray:
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().cpu().numpy().copy()


def named_params(model) -> dict[str, np.ndarray]:
    inner = model.module if hasattr(model, "module") else model
    return {n: full(p) for n, p in inner.named_parameters()}


def momentum_buffers(model, opt) -> dict[str, np.ndarray]:
    inner = model.module if hasattr(model, "module") else model
    return {n: full(opt.state[p]["momentum_buffer"]) for n, p in inner.named_parameters() if p.ndim == 2}


def sharded_world(rank: int, world_size: int, run_url: str) -> dict:
    """Every variant on this rank: reference (plain, one process's arithmetic), DDP, FSDP2, HSDP (1 x 2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rae_scale.checkpoint import CheckpointManager, ModelOptimizerState

    out = {}
    ref = build_model()
    ref_opt = make_optimizer(ref)
    for s in range(STEPS):
        reference_step(ref, ref_opt, s)
    out["reference"] = named_params(ref)

    ddp = DDP(build_model())
    ddp_opt = make_optimizer(ddp)
    for s in range(STEPS):
        rank_step(ddp, ddp_opt, s, rank)
    out["ddp"] = named_params(ddp)

    for kind, mesh_shape, dims in (("fsdp", (world_size,), ("shard",)),
                                   ("hsdp", (1, world_size), ("replicate", "shard"))):
        model = build_model()
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=dims)
        for layer in model.layers():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = make_optimizer(model)
        for s in range(STEPS):
            if kind == "fsdp" and s == SAVE_AFTER:
                # the platform's checkpoint path: DCP under a step folder with a commit marker
                CheckpointManager(run_url, async_save=False).save(s, {"train": ModelOptimizerState(model, opt)})
                out["momentum_at_save"] = momentum_buffers(model, opt)
            rank_step(model, opt, s, rank)
        out[kind] = named_params(model)
        out[f"{kind}_local_shape"] = tuple(model.embed.weight.to_local().shape)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("muon_dcp") / "run")
    return run_ranks(sharded_world, 2, run), run


def assert_close(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        err = np.linalg.norm(got[name] - ref[name]) / np.linalg.norm(ref[name])
        assert err <= REL, f"{what}: {name} differs by {err:.2e} relative"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp", "hsdp"])
def test_sharded_and_replicated_muon_match_one_process(world, kind):
    (rank0, rank1), _ = world
    init = {n: p.detach().numpy() for n, p in build_model().named_parameters()}
    ref = rank0["reference"]
    # the reference really moved every parameter, so agreement to 1e-5 is not agreement at rest
    assert min(np.linalg.norm(ref[n] - init[n]) / np.linalg.norm(init[n]) for n in ref) > 1e-3
    assert_close(rank0[kind], ref, kind)
    assert_close(rank1[kind], ref, f"{kind} rank 1")
    if kind != "ddp":
        # the 11-row table really was split unevenly (torch.chunk: 6 + 5)
        assert {rank0[f"{kind}_local_shape"], rank1[f"{kind}_local_shape"]} == {(6, 8), (5, 8)}


@pytest.mark.slow
def test_dcp_state_from_2_ranks_resumes_in_1_process(world):
    from rae_scale.checkpoint import CheckpointManager, ModelOptimizerState

    (rank0, _), run = world
    model = build_model()
    opt = make_optimizer(model)
    mgr = CheckpointManager(run, async_save=False)
    meta = mgr.load(mgr.resolve_resume("auto"), {"train": ModelOptimizerState(model, opt)})
    assert meta["world_size"] == 2
    # the Muon momentum of every matrix came back whole from the two shards
    saved = rank0["momentum_at_save"]
    got = momentum_buffers(model, opt)
    assert saved.keys() == got.keys() and len(got) == 5
    for name in saved:
        np.testing.assert_array_equal(got[name], saved[name], err_msg=name)
    assert all(float(opt.state[p]["step"]) == SAVE_AFTER for p in model.parameters() if p.ndim != 2)
    for s in range(SAVE_AFTER, STEPS):
        reference_step(model, opt, s)
    assert_close(named_params(model), rank0["fsdp"], "2 -> 1 resume")
