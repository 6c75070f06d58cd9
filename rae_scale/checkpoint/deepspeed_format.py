"""DeepSpeed checkpoints: staged locally by engine.save_checkpoint, moved with fsspec, and
converted to DeepSpeed's universal format when the world size changes.

DeepSpeed is not imported here; the conversion runs DeepSpeed's own tool in a subprocess
(``python -m deepspeed.checkpoint.ds_to_universal``). For the conversion to work, save with
``client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}`` and load the
converted tag with ``"checkpoint": {"load_universal": true}`` in the DeepSpeed config.

DeepSpeed unpickles its files without restriction, so everything here that hands files to it first
passes them through safe_load.validate_deepspeed_dir; the native files' CRC-32 records travel in the
step's metadata.json under DEEPSPEED_FILES_KEY (the manager's own "files" covers only what it writes).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any, Mapping

from .integrity import verify_file
from .layout import DEEPSPEED_DIR
from .safe_load import CheckpointCorruptError, validate_deepspeed_dir
from .storage import Storage, download_dir, upload_dir

logger = logging.getLogger(__name__)

__all__ = ["upload_dir", "download_dir", "convert_deepspeed_to_universal", "needs_universal",
           "UNIVERSAL_CLIENT_STATE", "DEEPSPEED_FILES_KEY", "deepspeed_file_records", "verify_deepspeed_files"]

DEEPSPEED_FILES_KEY = "deepspeed_files"  # metadata.json: {"<DEEPSPEED_DIR>/<path>": {"size", "crc32"}}

UNIVERSAL_CLIENT_STATE = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def needs_universal(saved_world_size: int, world_size: int) -> bool:
    """ZeRO shards are tied to the data-parallel size: another world size needs the conversion."""
    for name, value in (("saved_world_size", saved_world_size), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return saved_world_size != world_size


def convert_deepspeed_to_universal(tag_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                                   num_extract_workers: int = 1, num_merge_workers: int = 1,
                                   timeout_s: float | None = 3600) -> str:
    """Convert one saved DeepSpeed tag folder (local) into a universal checkpoint at out_dir.

    Returns out_dir. Raises RuntimeError with the tool's output when it fails, and a CheckpointLoadError
    (before the tool starts) when a file in tag_dir fails validate_deepspeed_dir: the tool unpickles
    them unrestricted.
    """
    tag_dir, out_dir = os.fspath(tag_dir), os.fspath(out_dir)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"DeepSpeed tag folder {tag_dir!r} does not exist (download it first)")
    validate_deepspeed_dir(tag_dir)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag_dir,
           "--output_folder", out_dir, "--num_extract_workers", str(num_extract_workers),
           "--num_merge_workers", str(num_merge_workers)]
    logger.info("converting DeepSpeed checkpoint %s to universal format at %s", tag_dir, out_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"ds_to_universal failed (exit {proc.returncode}) for {tag_dir}:\n{tail}")
    return out_dir


def _local_files(local_dir: str) -> list[str]:
    """Paths of the files under local_dir, relative, with '/' separators."""
    out = []
    for dirpath, _, names in os.walk(local_dir):
        rel = os.path.relpath(dirpath, local_dir)
        out += [name if rel == "." else "/".join([*rel.split(os.sep), name]) for name in names]
    return sorted(out)


def deepspeed_file_records(local_dir: str | os.PathLike, prefix: str = DEEPSPEED_DIR + "/") -> dict[str, dict]:
    """Size and CRC-32 of every file under a staged native checkpoint, keyed by prefix + relative path
    (its place in the step folder): recorded at save, checked after the download on resume."""
    local_dir = os.fspath(local_dir)
    store = Storage(local_dir)
    return {prefix + rel: verify_file(store, os.path.join(local_dir, *rel.split("/")), None)
            for rel in _local_files(local_dir)}


def verify_deepspeed_files(local_dir: str | os.PathLike, records: Mapping[str, Any] | None, what: str,
                           prefix: str = DEEPSPEED_DIR + "/") -> bool:
    """Check a downloaded native checkpoint against the records its commit holds: every recorded file is
    there with its size and CRC-32, and no other file is. Raises CheckpointCorruptError (one line);
    returns False when the checkpoint predates the records (nothing to check)."""
    local_dir = os.fspath(local_dir)
    if records is None:
        return False
    if not isinstance(records, Mapping) or not all(
            isinstance(k, str) and k.startswith(prefix) and isinstance(v, Mapping) for k, v in records.items()):
        raise CheckpointCorruptError(f"{what}: malformed {DEEPSPEED_FILES_KEY} record in metadata.json")
    store = Storage(local_dir)
    present = set(_local_files(local_dir))
    for name, record in sorted(records.items()):
        rel = name[len(prefix):]
        if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
            raise CheckpointCorruptError(f"{what}: {DEEPSPEED_FILES_KEY} names {name!r}, not a file inside the folder")
        if rel not in present:
            raise CheckpointCorruptError(f"{what}/{name}: missing (the commit records it)")
        local = os.path.join(local_dir, *rel.split("/"))
        try:
            verify_file(store, local, record)
        except CheckpointCorruptError as exc:  # name the file where the commit has it, not the local copy
            raise CheckpointCorruptError(str(exc).replace(local, f"{what}/{name}", 1)) from None
    extra = sorted(present - {name[len(prefix):] for name in records})
    if extra:
        raise CheckpointCorruptError(f"{what}/{prefix}{extra[0]}: not among the files the commit records")
    return True
