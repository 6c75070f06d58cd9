"""DeepSpeed's checkpoint I/O: its native sharded files staged locally, uploaded into the step folder,
and converted to the universal format when a run resumes on another world size.

Used by rae_scale.parallel.deepspeed only; it drives the engine through the strategy's
save_native / load_native and never imports deepspeed itself.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import Any, Mapping

from rae_scale.checkpoint.layout import DEEPSPEED_DIR, parse_step, step_dir_name
from rae_scale.parallel.checkpoint_io import CheckpointIO
from rae_scale.storage import join

log = logging.getLogger(__name__)


class DeepSpeedCheckpointIO(CheckpointIO):
    """The engine writes its native sharded checkpoint to local staging, which is uploaded into the step
    folder before the manager writes the loop's entries and commits; on a different world size the
    native checkpoint is converted to DeepSpeed's universal format before loading.
    """

    def app_state(self) -> dict[str, Any]:
        return dict(self.extra)  # the model, optimizer, schedule and EMA live in the native files

    def _staging(self, step: int) -> str:
        key = hashlib.sha1(self.manager.run_url.encode()).hexdigest()[:12]
        root = os.environ.get("RAE_SCALE_STAGING") or os.path.join(tempfile.gettempdir(), "rae_scale_staging")
        return os.path.join(root, key, step_dir_name(step))

    def save(self, step: int, metadata: Mapping[str, Any] | None = None, pin: bool = False) -> None:
        from rae_scale.checkpoint.deepspeed_format import DEEPSPEED_FILES_KEY

        upload, records = self._save_deepspeed(step)
        metadata = {**(metadata or {}), DEEPSPEED_FILES_KEY: records}
        self.manager.save(step, self.app_state(), metadata=metadata, pin=pin, before_commit=upload)

    def _save_deepspeed(self, step: int):
        """Write the engine's native checkpoint to local staging; return the upload for the manager and
        the files' CRC-32 records (for metadata.json: the manager's own records cover only its files).

        The upload runs inside the manager's write, after it removed any crash leftovers of this
        step folder and before the commit vote, so the native files are covered by COMMITTED (a
        job killed before the commit leaves no checkpoint that lacks them).
        """
        import torch.distributed as dist

        from rae_scale.checkpoint import upload_dir
        from rae_scale.checkpoint.deepspeed_format import deepspeed_file_records

        # the previous async save must be finished: its commit happens on the main thread's next save
        self.manager.wait()
        staging = self._staging(step)
        self.strategy.save_native(staging, "native")
        if dist.is_initialized():
            dist.barrier()  # every rank of this node has written its partition to staging
        uploads = int(os.environ.get("LOCAL_RANK", "0")) == 0  # each node's local rank 0 uploads its node's files
        records = deepspeed_file_records(staging) if uploads else {}
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, records)
            records = {}
            for part in parts:
                for name, record in (part or {}).items():
                    records.setdefault(name, record)
        target = join(self.manager.step_url(step), DEEPSPEED_DIR)
        options = self.manager.storage_options
        uploaded = []

        def upload() -> None:
            # idempotent across write retries
            if uploaded or not uploads:
                return
            upload_dir(staging, target, storage_options=options)
            shutil.rmtree(staging, ignore_errors=True)
            uploaded.append(True)

        return upload, dict(sorted(records.items()))

    def after_load(self, step_dir: str, meta: Mapping[str, Any]) -> None:
        """Download the step's native DeepSpeed checkpoint, check it, convert it for another world size,
        load it.

        DeepSpeed and ds_to_universal unpickle these files without restriction, so the rank that
        downloads (each node's local rank 0) first checks them against the CRC-32 records of the commit
        and through safe_load's restricted unpickler; its verdict reaches every rank, so a refused file
        stops all of them with the same one-line error instead of leaving the others in a collective.
        """
        import torch.distributed as dist

        from rae_scale.checkpoint import convert_deepspeed_to_universal, download_dir, needs_universal
        from rae_scale.checkpoint.deepspeed_format import DEEPSPEED_FILES_KEY, verify_deepspeed_files
        from rae_scale.checkpoint.safe_load import validate_deepspeed_dir

        world = dist.get_world_size() if dist.is_initialized() else 1
        saved_world = int(meta.get("world_size", 1))
        step = parse_step(step_dir)  # None for a step folder copied under another name
        local = self._staging(int(meta["step"]) if step is None else step) + "-load"
        remote = join(step_dir, DEEPSPEED_DIR)
        universal = needs_universal(saved_world, world)
        error: BaseException | None = None
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            try:
                shutil.rmtree(local, ignore_errors=True)
                download_dir(remote, local, storage_options=self.manager.storage_options)
                if not verify_deepspeed_files(local, meta.get(DEEPSPEED_FILES_KEY), step_dir.rstrip("/")):
                    log.warning("%s records no checksums of its DeepSpeed files (written before they were "
                                "recorded): loading them unverified", step_dir)
                validate_deepspeed_dir(local, shown_as=remote)
                if universal:
                    convert_deepspeed_to_universal(os.path.join(local, "native"), os.path.join(local, "universal"))
            except Exception as exc:
                shutil.rmtree(local, ignore_errors=True)
                error = exc
        self._raise_if_any_rank_failed(error, step_dir)
        self.strategy.load_native(local, "universal" if universal else "native", load_universal=universal)
        if universal:
            log.warning("DeepSpeed checkpoint written by %d ranks resumed on %d through the universal format",
                        saved_world, world)
        if dist.is_initialized():
            dist.barrier()
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            shutil.rmtree(local, ignore_errors=True)

    @staticmethod
    def _raise_if_any_rank_failed(error: BaseException | None, step_dir: str) -> None:
        """Every rank learns the first failure among the ranks (the all-gather is also the barrier after
        the download); the failing rank re-raises its own error, the others the same class and line."""
        import torch.distributed as dist

        from rae_scale.checkpoint import CheckpointCorruptError, CheckpointLoadError, UnsafeCheckpointError

        def summary(exc: BaseException) -> tuple[str, str]:
            kind = next((c.__name__ for c in (UnsafeCheckpointError, CheckpointCorruptError, CheckpointLoadError)
                         if isinstance(exc, c)), "")
            return kind, (str(exc).splitlines() or [type(exc).__name__])[0]

        mine = None if error is None else summary(error)
        failures = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            failures = [None] * dist.get_world_size()
            dist.all_gather_object(failures, mine)
        first = next(((rank, f) for rank, f in enumerate(failures) if f is not None), None)
        if first is None:
            return
        if error is not None:
            if isinstance(error, CheckpointLoadError):
                raise error from None
            raise error
        rank, (kind, line) = first
        classes = {c.__name__: c for c in (UnsafeCheckpointError, CheckpointCorruptError, CheckpointLoadError)}
        if kind:
            raise classes[kind](line) from None
        raise RuntimeError(f"rank {rank} could not prepare the DeepSpeed checkpoint of {step_dir}: {line}")
