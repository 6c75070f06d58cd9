"""Checkpoints on any fsspec URL: sharded DCP state, per-rank RNG/loader state, commit markers,
async save, retention, auto-resume, preemption handling, DeepSpeed staging, export. Loading never
runs code from the files (safe_load) and checks the checksums recorded at commit (integrity).

Works on state dicts and Stateful objects only; imports no other rae_scale sub-package.
"""
from .async_save import CheckpointSaveError
from .deepspeed_format import (UNIVERSAL_CLIENT_STATE, convert_deepspeed_to_universal,
                               needs_universal)
from .export import consolidate, export_safetensors, extract_ema, extract_state, flatten_state_dict
from .manager import (CheckpointLoadError, CheckpointManager, NonFiniteStateError, code_version, parse_step,
                      step_dir_name)
from .preemption import EXIT_CODE_PREEMPTED, PreemptionHandler, start_exit_timer
from .retention import steps_to_delete
from .rng import get_rng_state, set_rng_state
from .safe_load import CheckpointCorruptError, SafeFsspecReader, UnsafeCheckpointError
from .state import ModelOptimizerState, PerRank
from .storage import download_dir, upload_dir

__all__ = [
    "CheckpointManager", "CheckpointSaveError", "CheckpointLoadError", "ModelOptimizerState",
    "PerRank", "PreemptionHandler", "EXIT_CODE_PREEMPTED", "start_exit_timer", "steps_to_delete",
    "get_rng_state", "set_rng_state", "upload_dir", "download_dir", "convert_deepspeed_to_universal",
    "needs_universal", "UNIVERSAL_CLIENT_STATE", "consolidate", "export_safetensors", "extract_ema",
    "extract_state", "flatten_state_dict", "step_dir_name", "parse_step", "code_version",
    "NonFiniteStateError", "UnsafeCheckpointError", "CheckpointCorruptError", "SafeFsspecReader",
]
