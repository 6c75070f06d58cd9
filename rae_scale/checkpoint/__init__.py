"""Checkpoints on any fsspec URL: sharded DCP state, per-rank RNG/loader state, commit markers,
async save, retention, auto-resume, preemption handling, DeepSpeed staging, export. The folder
layout is spelled in one place (layout.py). Loading never runs code from the files (safe_load) and
checks the checksums recorded at commit (integrity).

Works on state dicts and Stateful objects only; imports no other rae_scale sub-package (URLs come
from rae_scale.storage).
"""
from .async_save import CheckpointSaveError
from .deepspeed_format import convert_deepspeed_to_universal, needs_universal
from .export import consolidate, export_safetensors, extract_ema, extract_state
from .manager import CheckpointLoadError, CheckpointManager
from .preemption import EXIT_CODE_PREEMPTED, PreemptionHandler, start_exit_timer
from .safe_load import CheckpointCorruptError, UnsafeCheckpointError
from .state import ModelOptimizerState, PerRank
from .storage import download_dir, upload_dir

# The folder layout (step folder names, markers, resolve_step_folder) is rae_scale.checkpoint.layout;
# helpers the manager uses internally (RNG state, retention, DeepSpeed client state) stay in their modules.
__all__ = [
    "CheckpointManager", "CheckpointSaveError", "CheckpointLoadError", "ModelOptimizerState",
    "PerRank", "PreemptionHandler", "EXIT_CODE_PREEMPTED", "start_exit_timer", "upload_dir", "download_dir",
    "convert_deepspeed_to_universal", "needs_universal", "consolidate", "export_safetensors", "extract_ema",
    "extract_state", "UnsafeCheckpointError", "CheckpointCorruptError",
]
