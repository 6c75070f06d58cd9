"""Process-group set-up from torchrun, Slurm or Ray Train environments, plus small collectives.

One call, `init_distributed()`, works in every launch mode:
- torchrun / Ray Train / `rae-scale --nproc`: RANK, WORLD_SIZE, LOCAL_RANK, ... are set;
- Slurm `srun` without torchrun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, ... are translated;
- a bare `python` process: a one-rank group on an in-memory store, so FSDP2 and DeepSpeed
  run unchanged on a laptop.
If a process group already exists (Ray Train's torch backend, a test harness), it is adopted.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    is_distributed: bool  # more than one rank


_INFO: DistInfo | None = None
_OWNS_GROUP = False  # destroy() only tears down a group this module created


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist such as ``gpu[01-03,07],login1`` into host names."""
    hosts: list[str] = []
    # split on commas that are not inside brackets
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if m is None:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for item in ranges.split(","):
            if "-" in item:
                lo, hi = item.split("-")
                width = len(lo)  # keep zero padding: 01-03 -> 01, 02, 03
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def _slurm_tasks_on_first_node(value: str) -> int:
    """SLURM_TASKS_PER_NODE looks like ``4(x2),3``: the first count is this layout's local size."""
    return int(re.match(r"\d+", value).group(0))


def env_layout(environ: Mapping[str, str] | None = None) -> dict[str, int | str] | None:
    """Read rank/world/local layout and rendezvous address from the launcher's variables.

    Returns None when no launcher variables are present (a single bare process).
    torchrun and Ray Train both set RANK/WORLD_SIZE/LOCAL_RANK; Slurm sets SLURM_* only.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return {
            "rank": int(env["RANK"]),
            "world_size": world,
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "local_world_size": int(env.get("LOCAL_WORLD_SIZE", world)),
            "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
            "master_port": env.get("MASTER_PORT", "29500"),
        }
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
        # a port derived from the job id lets two jobs share a node without colliding
        default_port = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return {
            "rank": int(env["SLURM_PROCID"]),
            "world_size": int(env["SLURM_NTASKS"]),
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
            "local_world_size": _slurm_tasks_on_first_node(tasks_per_node),
            "master_addr": env.get("MASTER_ADDR") or expand_slurm_nodelist(nodelist)[0],
            "master_port": env.get("MASTER_PORT", default_port),
        }
    return None


def _pick_device(local_rank: int, backend: str) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join (or create) the default process group and return this rank's DistInfo. Idempotent.

    backend: None picks NCCL when CUDA is available, gloo otherwise.
    """
    global _INFO, _OWNS_GROUP
    if _INFO is not None and dist.is_initialized():
        return _INFO
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed: {', '.join(BACKENDS)} or None (auto)")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, but torch.cuda.is_available() is False; use 'gloo'")

    layout = env_layout()
    if dist.is_initialized():
        # someone else (Ray Train, a test harness) already created the group: adopt it
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", layout["local_rank"] if layout else 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", layout["local_world_size"] if layout else world))
        backend = dist.get_backend()
    elif layout is not None:
        rank, world = layout["rank"], layout["world_size"]
        local_rank, local_world = layout["local_rank"], layout["local_world_size"]
        # env:// reads these; Slurm-only launches do not set them
        os.environ.setdefault("MASTER_ADDR", str(layout["master_addr"]))
        os.environ.setdefault("MASTER_PORT", str(layout["master_port"]))
        for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank),
                           ("LOCAL_WORLD_SIZE", local_world)):
            os.environ.setdefault(key, str(value))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)  # before init so NCCL binds the right GPU
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        _OWNS_GROUP = True
    else:
        # a bare process: one rank on an in-memory store, no ports needed
        rank, world, local_rank, local_world = 0, 1, 0, 1
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s))
        _OWNS_GROUP = True

    if world > 1:
        _one_machine_is_one_node(world, local_world)
    device = _pick_device(local_rank, "nccl" if "nccl" in str(backend) else "gloo")
    _INFO = DistInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                     device=device, is_distributed=world > 1)
    log.info("distributed: rank %d/%d (local %d/%d) on %s via %s", rank, world, local_rank, local_world,
             device, backend)
    return _INFO


def _one_machine_is_one_node(world: int, local_world: int) -> None:
    """Tell mosaicml-streaming the machine layout when a launcher ran several "nodes" on one machine.

    streaming picks one leader per node from LOCAL_WORLD_SIZE and the leaders create its shared-memory
    names (per machine), so two agents of `torchrun --nnodes=2` or two Ray nodes on one host would both
    create the same ones (FileExistsError). When every rank runs on this host, they are one node of
    WORLD_SIZE ranks, and LOCAL_WORLD_SIZE says so; the launcher's own LOCAL_RANK stays as it was.
    """
    if local_world == world:
        return
    import socket

    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    if len(set(hosts)) == 1:
        log.info("all %d ranks run on %s: one node for the data loader (LOCAL_WORLD_SIZE %d -> %d)",
                 world, hosts[0], local_world, world)
        os.environ["LOCAL_WORLD_SIZE"] = str(world)


def destroy() -> None:
    """Tear down the process group if this module created it, and forget the cached info."""
    global _INFO, _OWNS_GROUP
    if _OWNS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _INFO, _OWNS_GROUP = None, False


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from rank `src` to every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
