"""FSDP2 (`fully_shard`) per transformer block, then the root; HSDP through a 2-D (replicate, shard) mesh."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from rae_scale.parallel.precision import check_precision


def build_mesh(device_type: str, world_size: int, hsdp_replicas: int | None = None) -> DeviceMesh:
    """A 1-D ("shard",) mesh, or a 2-D ("replicate", "shard") mesh for HSDP.

    HSDP shards inside a group of world/replicas ranks (ideally one node, on the fast links) and
    all-reduces gradients between the replica groups.
    """
    if hsdp_replicas is None:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if hsdp_replicas < 1 or world_size % hsdp_replicas != 0:
        raise ValueError(f"hsdp_replicas={hsdp_replicas} must be >= 1 and divide the world size {world_size}")
    return init_device_mesh(device_type, (hsdp_replicas, world_size // hsdp_replicas),
                            mesh_dim_names=("replicate", "shard"))


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16 parameters for compute, fp32 gradient reduction; the sharded master copy stays fp32."""
    if check_precision(precision) == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, blocks: Iterable[nn.Module], mesh: DeviceMesh, *, precision: str = "fp32",
               reshard_after_forward: bool = True) -> nn.Module:
    """Shard each block as its own unit, then the root (which takes the remaining parameters). In place.

    One unit per block means only one block's full parameters exist at a time (plus prefetch);
    reshard_after_forward=False keeps them gathered until backward (ZeRO-2-like: more memory, fewer
    all-gathers).
    """
    policy = mixed_precision_policy(precision)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # the root's parameters are needed again at the start of backward; FSDP2 keeps them gathered itself
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model
