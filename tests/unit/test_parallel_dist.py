"""Launcher environments -> rank layout, and the one-process group."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rae_scale.parallel import dist as pdist
from rae_scale.parallel.dist import env_layout, expand_slurm_nodelist


def test_torchrun_layout():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29400", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    # torchrun inside an sbatch allocation: torchrun's variables win over Slurm's
    assert env_layout(env) == {"rank": 5, "world_size": 16, "local_rank": 1, "local_world_size": 4,
                               "master_addr": "10.0.0.2", "master_port": "29400"}


def test_slurm_layout_without_torchrun():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "1234"}
    assert env_layout(env) == {"rank": 6, "world_size": 8, "local_rank": 2, "local_world_size": 4,
                               "master_addr": "gpu07", "master_port": str(20000 + 1234)}


def test_no_launcher_means_single_process():
    assert env_layout({"PATH": "/usr/bin"}) is None


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]),
    ("a[01-03,07],b1", ["a01", "a02", "a03", "a07", "b1"]),
    ("rack[8-10]-gpu,login", ["rack8-gpu", "rack9-gpu", "rack10-gpu", "login"]),
])
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


def test_bad_backend_is_named():
    with pytest.raises(ValueError, match="backend='mpi'.*allowed: nccl, gloo"):
        pdist.init_distributed(backend="mpi")


def test_bare_process_gets_a_one_rank_group(bare_process):
    info = pdist.init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.is_distributed) == (0, 1, 0, False)
    assert info.device == torch.device("cpu") and torch.distributed.is_initialized()
    assert pdist.init_distributed() is info  # idempotent
    assert pdist.broadcast_object({"a": 1}) == {"a": 1}
    pdist.barrier()
    pdist.destroy()
    assert not torch.distributed.is_initialized()


def test_fsdp_on_one_rank_matches_plain_model(bare_process):
    """The embedded default: strategy 'fsdp' runs in a bare process and equals plain training."""
    from rae_scale.parallel import build_strategy

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.GELU()), nn.Linear(8, 2))

    x, y = torch.randn(6, 4), torch.randn(6, 2)
    plain = make()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    ref = []
    for _ in range(3):
        loss = F.mse_loss(plain(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())

    info = pdist.init_distributed()
    model = make()
    strategy = build_strategy("fsdp", dist=info)
    wrapped = strategy.wrap(model, blocks=[model[1]], optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    got = []
    for _ in range(3):
        with strategy.accumulate(is_last=True), strategy.autocast():
            loss = F.mse_loss(wrapped(x), y)
        strategy.backward(loss)
        strategy.step()
        got.append(loss.item())
    np.testing.assert_allclose(got, ref, rtol=1e-6)
