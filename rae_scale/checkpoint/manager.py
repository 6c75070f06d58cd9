"""CheckpointManager: atomic step folders on any fsspec URL, async save, resume, retention.

The folder layout (step folders, dcp/, rank files, metadata.json, PINNED, CORRUPT, COMMITTED
written last) is spelled in layout.py.

Collectives: the manager creates a dedicated gloo process group at construction (all ranks
construct it, like any new_group). The background writer runs DCP's plan exchange, its barriers
and the commit vote on that group only, so it never races the training loop's collectives on the
default (e.g. NCCL) group, and it works on CPU tensors whatever the training backend.

Safety: loading never runs code from the files (safe_load.py): a file the safe loaders refuse, or one
whose checksum differs from the commit's record, fails that checkpoint, and load() falls back to the
previous commit. A state holding NaN or inf is never written (check_finite).
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import subprocess
import time
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

from rae_scale.storage import join, normalize, protocol

from . import layout
from .async_save import BackgroundWriter, CheckpointSaveError
from .integrity import HashingFsspecWriter, checksum, first_nonfinite, verify_bytes, verify_files
from .layout import COMMIT_FILE, CORRUPT_FILE, DCP_DIR, PIN_FILE, parse_step, rank_file_name
from .rank_state import decode_rank_state, encode_rank_state
from .retention import steps_to_delete, validate_retention
from .rng import get_rng_state, set_rng_state
from .safe_load import (CheckpointCorruptError, CheckpointLoadError, SafeFsspecReader, own_load_error,
                        safe_torch_load)
from .state import PerRank, goes_to_dcp, is_stateful
from .storage import Storage, retry

logger = logging.getLogger(__name__)

# we pass no_dist explicitly in single-process runs; DCP still warns about it on every call
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)

# DCP reports failures as CheckpointException, which derives from BaseException
_ERRORS = (Exception, CheckpointException)

__all__ = ["CheckpointManager", "CheckpointLoadError", "CheckpointSaveError", "NonFiniteStateError",
           "code_version"]


class NonFiniteStateError(CheckpointSaveError):
    """A save was refused because the state holds NaN or inf: it would replace good checkpoints."""


def code_version() -> str:
    """`git describe` of the source tree when it is a git checkout, else the package version."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return version("rae_scale")
    except Exception:
        return "unknown"


class CheckpointManager:
    """Save and resume training state under ``<run_url>/checkpoints/step-<8 digits>/``.

    Args:
        run_url: local path, file://, s3:// or any fsspec URL of the run.
        keep_last: committed checkpoints to keep (None keeps all).
        keep_every: also keep every step divisible by this (None: off).
        async_save: copy state to host memory on the caller's thread, write in the background.
        rank, world_size: default to torch.distributed's (0 and 1 when not initialised).
        storage_options: passed to fsspec (s3fs endpoint, credentials, ...).
        max_attempts, retry_backoff_s: a failing save is retried (all ranks in lockstep) with
            exponential backoff; after max_attempts the error is raised at the next save()/wait().
        restore_rng: restore each rank's RNG states on load.
        reuse_staging_buffers: async saves copy into host buffers kept from the previous save
            (pinned when CUDA is in use). Costs one resident copy of the rank's state in host
            memory, saves the allocation and page faults on every save (the largest part of the
            stall on CPU). False allocates fresh buffers each time and frees them after the write.
        check_finite: before writing, every rank checks its floating-point DCP tensors (one min/max
            pass each, in the writer); if any rank holds NaN or inf, nothing is written, pinned or
            rotated out and the save fails with NonFiniteStateError (raised like any failed save).
            Turn off only for states that hold inf on purpose.
    """

    def __init__(self, run_url: str | os.PathLike, keep_last: int | None = 3,
                 keep_every: int | None = None, async_save: bool = True, rank: int | None = None,
                 world_size: int | None = None, *, storage_options: dict[str, Any] | None = None,
                 max_attempts: int = 4, retry_backoff_s: float = 1.0, restore_rng: bool = True,
                 code_version_str: str | None = None, reuse_staging_buffers: bool = True,
                 check_finite: bool = True):
        validate_retention(keep_last, keep_every)
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self._distributed = dist.is_available() and dist.is_initialized()
        dist_rank = dist.get_rank() if self._distributed else 0
        dist_world = dist.get_world_size() if self._distributed else 1
        self.rank = dist_rank if rank is None else int(rank)
        self.world_size = dist_world if world_size is None else int(world_size)
        if (self.rank, self.world_size) != (dist_rank, dist_world):
            raise ValueError(f"rank/world_size ({self.rank}/{self.world_size}) disagree with "
                             f"torch.distributed ({dist_rank}/{dist_world}); pass none or the same")
        self.run_url = normalize(run_url)
        self.storage_options = dict(storage_options or {})
        self.storage = Storage(self.run_url, self.storage_options)
        self.checkpoints_url = layout.checkpoints_url(self.run_url)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_save = bool(async_save)
        self.max_attempts, self.retry_backoff_s = int(max_attempts), float(retry_backoff_s)
        self.restore_rng = restore_rng
        self.check_finite = bool(check_finite)
        self.code_version = code_version_str or code_version()
        # a CPU group of our own: see the module docstring
        self._pg = dist.new_group(backend="gloo") if self._distributed else None
        self._writer = BackgroundWriter()
        self.reuse_staging_buffers = reuse_staging_buffers
        self._staging_buffers: dict | None = None

    # ------------------------------------------------------------------ layout
    def step_url(self, step: int) -> str:
        return layout.step_url(self.run_url, step)

    def committed_steps(self) -> list[int]:
        """Steps of committed checkpoints of this run, ascending (reads storage on this rank)."""
        self.storage.invalidate()
        return layout.committed_steps(self.storage, self.run_url)

    def all_step_folders(self) -> list[int]:
        self.storage.invalidate()
        return layout.step_folders(self.storage, self.run_url)

    def latest_committed(self) -> str | None:
        steps = self.committed_steps()
        return self.step_url(steps[-1]) if steps else None

    # ------------------------------------------------------------- collectives
    def _all_true(self, flag: bool) -> bool:
        if not self._distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._pg)
        return bool(t.item())

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier(group=self._pg)

    def _broadcast(self, obj: Any) -> Any:
        if not self._distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._pg)
        return box[0]

    # ------------------------------------------------------------------- save
    def save(self, step: int, app_state: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
             pin: bool = False, before_commit: Callable[[], None] | None = None) -> None:
        """Checkpoint app_state at `step`; every rank calls it.

        Blocks for the previous save (at most one in flight) and raises its error if it failed.
        With async_save, returns once the state is copied to host memory.
        before_commit: run on every rank (in the writer) once this rank's files are written and
            before the commit vote, e.g. to upload files written outside DCP (a DeepSpeed native
            checkpoint) into the step folder: written after the crash-leftover cleanup, they are
            part of the commit. Retried with the rest of the write; it must be idempotent.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not isinstance(app_state, Mapping):
            raise TypeError(f"app_state must be a dict of name -> Stateful/state, got {type(app_state)}")
        self._writer.wait()  # previous save: finish and surface its error
        dcp_state, rank_state = {}, {}
        for key, value in app_state.items():
            if goes_to_dcp(value):
                dcp_state[key] = value.state_dict() if is_stateful(value) else value
            else:
                rank_state[key] = value.state_dict() if isinstance(value, PerRank) else value
        _check_dcp_values(dcp_state)
        # small per-rank state is serialised here, which snapshots it as well (and refuses, before
        # any copy, values that could not be loaded back safely)
        buf = io.BytesIO(encode_rank_state({"rank": self.rank, "world_size": self.world_size,
                                            "rng": get_rng_state(), "entries": rank_state}))
        if self.async_save:
            # a copy in host memory (fresh storage even for CPU tensors): training may now
            # update the parameters in place while the background thread writes
            dcp_state = self._stage(dcp_state)
        meta = {"step": step, "world_size": self.world_size, "code_version": self.code_version,
                "torch_version": torch.__version__, "time": time.time(),
                "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        meta.update(metadata or {})
        meta_bytes = json.dumps(meta, indent=2, sort_keys=True, default=str).encode()

        def job():
            self._write(step, dcp_state, buf.getvalue(), meta_bytes, pin, before_commit)

        what = f"checkpoint save of step {step} to {self.step_url(step)}"
        if self.async_save:
            self._writer.submit(job, what)
        else:
            try:
                job()
            except _ERRORS as exc:
                raise CheckpointSaveError(f"{what} failed: {exc!r}") from exc

    def _stage(self, state: dict) -> dict:
        """A host-memory copy of state (new storage even for CPU tensors)."""
        if self.reuse_staging_buffers and self._staging_buffers is not None:
            try:
                return _copy_state_dict(state, self._staging_buffers, type_check=False)
            except Exception:  # the structure changed (e.g. optimizer state appeared): re-allocate
                logger.debug("staging buffers do not match the state any more; re-allocating")
        pin = torch.cuda.is_available() and torch.cuda.is_initialized()
        buffers = _create_cpu_state_dict(state, pin_memory=pin)
        staged = _copy_state_dict(state, buffers, type_check=False)
        self._staging_buffers = buffers if self.reuse_staging_buffers else None
        return staged

    def wait(self) -> None:
        """Block until the last save is written and committed; raise if it failed."""
        self._writer.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.wait()

    def _write(self, step: int, dcp_state: dict, rank_bytes: bytes, meta_bytes: bytes, pin: bool,
               before_commit: Callable[[], None] | None = None):
        step_url = self.step_url(step)
        commit_url = join(step_url, COMMIT_FILE)
        if retry(lambda: self.storage.exists(commit_url), what=f"check {commit_url}",
                 attempts=self.max_attempts, backoff_s=self.retry_backoff_s):
            logger.warning("step %d already has a committed checkpoint at %s; not overwriting it",
                           step, step_url)
            return
        self._refuse_nonfinite(step, dcp_state)
        last_exc: BaseException | None = None
        records: dict[str, dict] = {}
        for attempt in range(self.max_attempts):
            ok = True
            try:
                if attempt == 0 and self.rank == 0 and self.storage.exists(step_url):
                    # leftovers of a crashed save of the same step (maybe another world size)
                    logger.info("removing uncommitted %s before writing it again", step_url)
                    self.storage.rm(step_url, recursive=True)
                self._barrier()
                rank_file = rank_file_name(self.rank)
                self.storage.write_bytes(join(step_url, rank_file), rank_bytes)
                writer = HashingFsspecWriter(join(step_url, DCP_DIR), **self.storage_options)
                dcp.save(dcp_state, storage_writer=writer, process_group=self._pg,
                         no_dist=not self._distributed)
                records = {rank_file: checksum(rank_bytes)}
                records.update({f"{DCP_DIR}/{name}": rec for name, rec in writer.file_checksums(self.storage).items()})
                if before_commit is not None:
                    before_commit()
            except _ERRORS as exc:
                ok, last_exc = False, exc
                logger.warning("rank %d: writing %s failed (attempt %d/%d): %r", self.rank,
                               step_url, attempt + 1, self.max_attempts, exc)
            if self._all_true(ok):
                break
            if attempt < self.max_attempts - 1:
                time.sleep(min(30.0, self.retry_backoff_s * 2**attempt))
        else:
            if last_exc is not None:
                raise last_exc
            raise CheckpointSaveError(f"another rank failed to write {step_url}")

        files = self._gather_records(records)
        ok = True
        if self.rank == 0:
            meta = json.loads(meta_bytes)
            meta["files"] = dict(sorted(files.items()))
            meta_bytes = json.dumps(meta, indent=2, sort_keys=True, default=str).encode()
            try:
                retry(lambda: self._commit(step_url, meta_bytes, pin), what=f"commit {step_url}",
                      attempts=self.max_attempts, backoff_s=self.retry_backoff_s)
            except Exception as exc:
                ok, last_exc = False, exc
        if not self._all_true(ok):
            if last_exc is not None:
                raise last_exc
            raise CheckpointSaveError(f"rank 0 failed to commit {step_url}")
        logger.info("checkpoint step %d committed at %s", step, step_url)
        if self.rank == 0:
            try:
                self.apply_retention()
            except Exception as exc:  # a failed cleanup must not fail a good save
                logger.warning("retention/cleanup after step %d failed: %r", step, exc)

    def _refuse_nonfinite(self, step: int, dcp_state: dict) -> None:
        """Every rank checks its share; if any holds NaN/inf, all raise before writing anything."""
        if not self.check_finite:
            return
        bad = first_nonfinite(dcp_state)
        if self._all_true(bad is None):
            return
        where = f"{bad!r} holds NaN or inf on rank {self.rank}" if bad else "another rank holds NaN or inf"
        msg = (f"step {step} not saved: {where}; a checkpoint of non-finite weights would rotate good ones "
               "out, so the committed checkpoints are kept as they are (resume from the newest)")
        logger.error(msg)
        raise NonFiniteStateError(msg)

    def _gather_records(self, records: dict[str, dict]) -> dict[str, dict]:
        """Rank 0 gets every rank's file checksums (the others get {})."""
        if not self._distributed:
            return dict(records)
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(records, gathered, dst=0, group=self._pg)
        merged: dict[str, dict] = {}
        for part in gathered or []:
            merged.update(part or {})
        return merged

    def _commit(self, step_url: str, meta_bytes: bytes, pin: bool) -> None:
        self.storage.write_bytes(join(step_url, layout.METADATA_FILE), meta_bytes)
        if pin:
            self.storage.write_bytes(join(step_url, PIN_FILE), b"pinned at save\n")
        self.storage.write_bytes(join(step_url, COMMIT_FILE), meta_bytes)  # last

    # -------------------------------------------------------------- retention
    def pin(self, step: int, reason: str = "") -> None:
        """Protect a committed step from retention (e.g. the best FID so far)."""
        if step not in self.committed_steps():
            raise ValueError(f"cannot pin step {step}: no committed checkpoint at {self.step_url(step)}")
        self.storage.write_bytes(join(self.step_url(step), PIN_FILE), (reason or "pinned").encode())

    def unpin(self, step: int) -> None:
        self.storage.rm(join(self.step_url(step), PIN_FILE))

    def pinned_steps(self) -> list[int]:
        return layout.pinned_steps(self.storage, self.run_url)

    def apply_retention(self) -> list[int]:
        """Delete committed steps retention drops and uncommitted folders; returns deleted steps.

        Call on one rank only (save() runs it on rank 0 after each commit, when no other save
        is in flight, so every uncommitted folder is a crash leftover).
        """
        committed = self.committed_steps()
        doomed = steps_to_delete(committed, keep_last=self.keep_last, keep_every=self.keep_every,
                                 pinned=self.pinned_steps())
        newest = committed[-1] if committed else -1
        stale = [s for s in self.all_step_folders() if s not in committed and s < newest]
        for step in doomed:
            url = self.step_url(step)
            self.storage.rm(join(url, COMMIT_FILE))  # un-commit first: a half-deleted folder is no checkpoint
            self.storage.rm(url, recursive=True)
        for step in stale:
            self.storage.rm(self.step_url(step), recursive=True)
        if doomed or stale:
            logger.info("retention deleted steps %s, uncommitted leftovers %s", doomed, stale)
        return doomed + stale

    # ------------------------------------------------------------------ resume
    def resolve_resume(self, resume: str) -> str | None:
        """'never' -> None; 'auto' -> newest committed step folder or None; else a step folder URL.

        A URL must name a committed checkpoint (a folder holding COMMITTED).
        """
        if not isinstance(resume, str) or not resume:
            raise ValueError(f"resume must be 'auto', 'never' or the URL of a step folder, got {resume!r}")
        if resume == "never":
            return None
        self._writer.wait()  # the gloo group must be idle before a main-thread collective
        if resume == "auto":
            latest = self.latest_committed() if self.rank == 0 else None
            return self._broadcast(latest)
        url = normalize(resume)
        store = self._storage_for(url)
        if not store.exists(join(url, COMMIT_FILE)):
            raise ValueError(f"resume={resume!r} is not a committed checkpoint (no {COMMIT_FILE} in it); "
                             "use 'auto', 'never' or the URL of a committed step folder")
        return url

    def read_metadata(self, step_dir: str) -> dict[str, Any]:
        """A step folder's metadata.json (step, world size, config, ...), with this run's storage options."""
        url = normalize(step_dir)
        return layout.read_metadata(self._storage_for(url), url)

    def _storage_for(self, url: str) -> Storage:
        return self.storage if protocol(url) == protocol(self.run_url) else Storage(url, self.storage_options)

    def load(self, step_dir: str, app_state: dict[str, Any], fallback: bool = True) -> dict[str, Any]:
        """Load step_dir into app_state (in place) and return its metadata (+ 'step_dir').

        If loading raises on any rank and step_dir is a committed checkpoint of this run, warn and
        try the previous committed ones, newest first. Once an older one loads, the failed newer
        ones are marked CORRUPT and lose their COMMITTED marker (so neither resume nor retention
        counts them); if none loads, nothing is marked (the cause is then likely not the files). Plain (non-Stateful) per-rank
        entries are replaced in app_state.
        """
        self._writer.wait()
        step_dir = normalize(step_dir)
        candidates = [step_dir]
        step = parse_step(step_dir)
        if fallback and step is not None and step_dir == self.step_url(step):
            older = self._broadcast([s for s in self.committed_steps() if s < step]
                                    if self.rank == 0 else None)
            candidates += [self.step_url(s) for s in reversed(older)]
        errors = []
        for i, url in enumerate(candidates):
            ok, err = True, None
            try:
                meta = self._load_one(url, app_state)
            except _ERRORS as exc:
                ok, err = False, exc
                logger.debug("rank %d failed to load %s", self.rank, url, exc_info=True)
            if self._all_true(ok):
                if i:
                    logger.warning("resumed from %s instead of %s", url, step_dir)
                    if self.rank == 0:  # only now: if nothing loads, the cause is not the files
                        for bad, why in zip(candidates[:i], errors):
                            self._quarantine(bad, why)
                return meta
            errors.append(f"{url}: {err!r}" if err else f"{url}: failed on another rank")
            if i + 1 < len(candidates):
                logger.warning("checkpoint %s could not be loaded (%s); falling back to the previous "
                               "committed checkpoint", url, errors[-1])
        raise CheckpointLoadError("could not load any checkpoint:\n  " + "\n  ".join(errors))

    def _quarantine(self, url: str, reason: str) -> None:
        try:
            self.storage.write_bytes(join(url, CORRUPT_FILE), reason.encode())
            self.storage.rm(join(url, COMMIT_FILE))
        except Exception as exc:
            logger.warning("could not mark %s as corrupt: %r", url, exc)

    def _load_one(self, url: str, app_state: dict[str, Any]) -> dict[str, Any]:
        store = self._storage_for(url)
        # 1. on every rank, before any collective: metadata, this rank's share of the checksums and
        #    its per-rank file; then one vote, so a failure on one rank fails the checkpoint everywhere
        ok, err = True, None
        targets = {k: v for k, v in app_state.items() if goes_to_dcp(v)}
        reader = SafeFsspecReader(join(url, DCP_DIR), **self.storage_options)
        try:
            meta, payload, from_rank = self._read_and_verify(store, url)
            if targets:
                reader.read_metadata()  # refused or unreadable: our one line, before DCP's fallbacks
        except _ERRORS as exc:
            ok, err = False, exc
        if not self._all_true(ok):
            if err is not None:
                raise err
            raise CheckpointLoadError(f"{url}: another rank could not read or verify its files")
        # 2. the sharded state, through the reader that never unpickles unrestricted
        if targets:
            try:
                dcp.load(targets, storage_reader=reader, process_group=self._pg,
                         no_dist=not self._distributed)
            except _ERRORS as exc:  # a refused or unreadable file: its one line, not DCP's tracebacks
                ours = own_load_error(exc, reader)
                if ours is None:
                    raise
                raise ours from None
        # 3. the per-rank entries and RNG
        saved_world = int(meta.get("world_size", 1))
        if from_rank == self.rank:
            if self.restore_rng:
                set_rng_state(payload["rng"])
        else:
            # resumed on more ranks than saved: per-rank entries come from rank 0; this rank's
            # RNG keeps its fresh seeding (copying rank 0's would make ranks draw the same noise)
            logger.warning("rank %d: %s was saved by %d ranks; per-rank entries taken from rank 0, "
                           "RNG not restored", self.rank, url, saved_world)
        entries = payload["entries"]
        for key, value in app_state.items():
            if goes_to_dcp(value):
                continue
            if key not in entries:
                raise KeyError(f"checkpoint {url} has no per-rank entry {key!r} (it has {sorted(entries)})")
            if isinstance(value, PerRank):
                value.load_state_dict(entries[key])
            else:
                app_state[key] = entries[key]
        meta["step_dir"] = url
        if saved_world != self.world_size:
            logger.info("resumed %s saved by %d ranks on %d ranks (resharded by DCP)", url,
                        saved_world, self.world_size)
        return meta

    def _read_and_verify(self, store: Storage, url: str) -> tuple[dict, dict, int]:
        """(metadata, decoded per-rank payload, the rank whose file it is), after checking this rank's
        share of the DCP files (every world_size-th, so each file is read once per load) and the
        per-rank file against the checksums of the commit."""
        meta = layout.read_metadata(store, url)
        files = meta.get("files")
        if files is None:
            if self.rank == 0:
                logger.warning("%s was written before checkpoints recorded checksums: loading it unverified", url)
        else:
            shared = sorted(n for n in files if n.startswith(DCP_DIR + "/"))
            verify_files(store, url, files, shared[self.rank::self.world_size])
        saved_world = int(meta.get("world_size", 1))
        own = rank_file_name(self.rank)
        from_rank = self.rank if self.rank < saved_world and store.exists(join(url, own)) else 0
        name = rank_file_name(from_rank)
        try:
            data = store.read_bytes(join(url, name))
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{join(url, name)}: missing") from None
        if files is not None:
            if name not in files:
                raise CheckpointCorruptError(f"{join(url, name)}: not among the files the commit records")
            verify_bytes(data, files[name], join(url, name))
        payload = decode_rank_state(data, join(url, name))
        return meta, payload, from_rank


_PLAIN = (type(None), bool, int, float, str)


def _odd_values(value: Any, path: str, out: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            _odd_values(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _odd_values(v, f"{path}.{i}", out)
    elif not (type(value) in _PLAIN or isinstance(value, torch.Tensor) or hasattr(value, "local_shards")):
        out.append((path, value))
    return out


def _check_dcp_values(state: dict) -> None:
    """DCP stores non-tensor values as torch.save bytes, which load() reads with weights_only=True:
    refuse now, naming the key, what could not be loaded back (a numpy scalar, a custom object)."""
    for key, value in _odd_values(state, "", []):
        buf = io.BytesIO()
        torch.save(value, buf)
        try:
            safe_torch_load(buf.getvalue(), key)
        except CheckpointLoadError:
            raise TypeError(f"checkpoint entry {key!r} is a {type(value).__module__}.{type(value).__qualname__}, "
                            "which cannot be loaded back safely (allowed besides tensors: None, bool, int, "
                            "float, str, lists, tuples and dicts of them, torch.Size, dtypes); store plain "
                            "values or wrap per-rank state in PerRank") from None
