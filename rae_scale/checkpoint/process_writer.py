"""Checkpoint writes in a separate process, so serialisation does not hold the training process's GIL.

CheckpointManager(writer="process") stages the state into host buffers in shared memory, as the
thread writer does into private memory, then hands the write to a child process (one per manager and
rank, spawned at the first save, kept for the next ones). The child runs the manager's own write
path: barrier, per-rank file, DCP save, retries in lockstep, commit vote, COMMITTED last (rank 0),
retention. With several ranks the children form a gloo group of their own (rank 0's child hosts a
TCPStore; its address goes to the other ranks over the parent manager's group), so the commit still
waits for every rank. The parent's BackgroundWriter thread only waits on a pipe (no GIL held), which
keeps the manager's guarantees: one save in flight, errors raised at the next save()/wait(), and the
non-daemon thread makes interpreter exit wait for the last write.

Signals: the child ignores SIGINT, SIGTERM, SIGUSR1 and SIGUSR2, which Slurm and terminals send to
every process of a job: a preemption notice must reach the training process (which then saves and
exits) without killing the write in flight. The child ends when the parent closes the pipe (close(),
at interpreter exit, or the parent's death), after finishing the job it is on.

The shared buffers go to the child once per allocation (file descriptors over the pipe); each save
then sends the state's structure with the tensors replaced by their buffer index, plus the small
per-rank bytes (already encoded by the parent in the safe per-rank format, rank_state.py) and
metadata. The child's manager records the files' checksums and checks finiteness as the thread does.
States holding DTensors or ShardedTensors (FSDP) cannot be rebuilt without the device mesh, so the
manager writes those with the thread writer.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import weakref
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Buffer:
    """Placeholder for the staging buffer with this index (the child holds the tensors)."""

    index: int


def plain_tensors_only(state: Any) -> bool:
    """True when every tensor in a nested state is a plain torch.Tensor (no DTensor/ShardedTensor)."""
    if isinstance(state, dict):
        return all(plain_tensors_only(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(plain_tensors_only(v) for v in state)
    if isinstance(state, torch.Tensor):
        return type(state) is torch.Tensor or type(state) is torch.nn.Parameter
    return not hasattr(state, "local_shards")  # ShardedTensor is not a Tensor subclass


def _tensors(state: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(state, dict):
        for v in state.values():
            _tensors(v, out)
    elif isinstance(state, (list, tuple)):
        for v in state:
            _tensors(v, out)
    elif isinstance(state, torch.Tensor):
        out.append(state)
    return out


def _swap(state: Any, fn) -> Any:
    if isinstance(state, dict):
        return {k: _swap(v, fn) for k, v in state.items()}
    if isinstance(state, list):
        return [_swap(v, fn) for v in state]
    if isinstance(state, tuple):
        return tuple(_swap(v, fn) for v in state)
    return fn(state)


class ProcessWriter:
    """Parent side: owns the child process and its pipe; write() blocks until the child answers.

    manager_args: the CheckpointManager keyword arguments the child rebuilds its writer from.
    parent_pg: the parent manager's gloo group (None in a single process), used once to tell the
    other ranks where rank 0's child listens.
    """

    def __init__(self, manager_args: dict, *, rank: int, world_size: int, parent_pg=None):
        self.manager_args = dict(manager_args)
        self.rank, self.world_size = rank, world_size
        self.parent_pg = parent_pg
        self._proc = None
        self._conn = None
        self._sent_generation: int | None = None

    # ---------------------------------------------------------------- lifecycle
    def _start(self) -> None:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        rendezvous = None
        if self.world_size > 1:
            box = [None]
            if self.rank == 0:
                host = os.environ.get("MASTER_ADDR") or socket.getfqdn()
                with socket.socket() as s:  # a free port for rank 0's child TCPStore
                    s.bind(("", 0))
                    box = [(host, s.getsockname()[1])]
            dist.broadcast_object_list(box, src=0, group=self.parent_pg)
            rendezvous = box[0]
        ctx = mp.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, name=f"checkpoint-writer-rank{self.rank}",
                                 args=(self.manager_args, self.rank, self.world_size, rendezvous, child_end),
                                 daemon=True)  # dies with a crashed parent; a clean exit waits (see module doc)
        self._proc.start()
        child_end.close()
        # before multiprocessing's own exit hook (atexit runs last-registered first), which would
        # send SIGTERM to the (daemon) child and then wait for it: the child ignores SIGTERM
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())
        self._receive()  # "ready" once its group (if any) is up

    def _receive(self) -> Any:
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            code = self._proc.exitcode if self._proc is not None else None
            self._proc = None
            raise RuntimeError(f"the checkpoint writer process died (exit code {code})") from exc
        if kind == "error":
            raise payload
        return payload

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout=30)
            except (OSError, BrokenPipeError):
                pass
            if self._proc.is_alive():
                self._proc.kill()  # SIGTERM is ignored there
                self._proc.join(timeout=5)
        self._proc = None

    # ---------------------------------------------------------------- one save
    def write(self, step: int, staged: dict, buffers: dict, generation: int, rank_bytes: bytes,
              meta_bytes: bytes, pin: bool) -> None:
        """Write and commit one checkpoint in the child (blocks; raises the child's error).

        staged: the state to save, whose tensors are (mostly) the shared-memory `buffers` of
        allocation `generation`; other tensors (0-dim scalars) travel by value.
        """
        if self._proc is None or not self._proc.is_alive():
            self._start()
            self._sent_generation = None
        buffer_list = _tensors(buffers, [])
        if self._sent_generation != generation:
            self._conn.send(("buffers", buffer_list))
            self._sent_generation = generation
        index = {t.data_ptr(): i for i, t in enumerate(buffer_list) if t.numel() and t.is_shared()}
        skeleton = _swap(staged, lambda v: _Buffer(index[v.data_ptr()])
                         if isinstance(v, torch.Tensor) and v.numel() and v.data_ptr() in index else v)
        self._conn.send(("write", (step, skeleton, rank_bytes, meta_bytes, pin)))
        self._receive()


def _picklable(exc: BaseException) -> BaseException:
    """What the parent can rebuild from the pipe: builtin exceptions and our own checkpoint errors
    (plain message-only classes) as they are, anything else (e.g. DCP's CheckpointException, whose
    constructor takes other arguments) as a RuntimeError carrying its repr."""
    import pickle

    from .async_save import CheckpointSaveError
    from .safe_load import CheckpointLoadError

    if type(exc).__module__ == "builtins" or isinstance(exc, (CheckpointSaveError, CheckpointLoadError)):
        try:
            pickle.dumps(exc)
            return exc
        except Exception:
            pass
    return RuntimeError(repr(exc))


def _child_main(manager_args: dict, rank: int, world_size: int, rendezvous, conn) -> None:
    """The writer process: rebuild a synchronous manager on the same run, then serve write requests."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2"):  # see the module docstring
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        if world_size > 1:
            import datetime

            import torch.distributed as dist

            host, port = rendezvous
            store = dist.TCPStore(host, port, world_size, is_master=rank == 0,
                                  timeout=datetime.timedelta(seconds=600))
            dist.init_process_group("gloo", store=dist.PrefixStore("rae_scale_ckpt_writer", store), rank=rank,
                                    world_size=world_size)
        from .manager import CheckpointManager

        manager = CheckpointManager(**manager_args, async_save=False)
        conn.send(("ready", None))
    except BaseException as exc:
        conn.send(("error", _picklable(exc)))
        return
    buffers: list[torch.Tensor] = []
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent is gone
            return
        if msg is None:
            return
        kind, payload = msg
        if kind == "buffers":
            buffers = payload
            continue
        step, skeleton, rank_bytes, meta_bytes, pin = payload
        state = _swap(skeleton, lambda v: buffers[v.index] if isinstance(v, _Buffer) else v)
        try:
            manager._write(step, state, rank_bytes, meta_bytes, pin)
        except BaseException as exc:  # reported to the parent, which raises it at the next save()/wait()
            logger.error("checkpoint writer process: step %d failed: %r", step, exc)
            conn.send(("error", _picklable(exc)))
        else:
            conn.send(("ok", None))
