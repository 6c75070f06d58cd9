"""DeepSpeed checkpoints: staged locally by engine.save_checkpoint, moved with fsspec, and
converted to DeepSpeed's universal format when the world size changes.

DeepSpeed is not imported here; the conversion runs DeepSpeed's own tool in a subprocess
(``python -m deepspeed.checkpoint.ds_to_universal``). For the conversion to work, save with
``client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}`` and load the
converted tag with ``"checkpoint": {"load_universal": true}`` in the DeepSpeed config.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

from .storage import download_dir, upload_dir

logger = logging.getLogger(__name__)

__all__ = ["upload_dir", "download_dir", "convert_deepspeed_to_universal", "needs_universal",
           "UNIVERSAL_CLIENT_STATE"]

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

    Returns out_dir. Raises RuntimeError with the tool's output when it fails.
    """
    tag_dir, out_dir = os.fspath(tag_dir), os.fspath(out_dir)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"DeepSpeed tag folder {tag_dir!r} does not exist (download it first)")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag_dir,
           "--output_folder", out_dir, "--num_extract_workers", str(num_extract_workers),
           "--num_merge_workers", str(num_merge_workers)]
    logger.info("converting DeepSpeed checkpoint %s to universal format at %s", tag_dir, out_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"ds_to_universal failed (exit {proc.returncode}) for {tag_dir}:\n{tail}")
    return out_dir
