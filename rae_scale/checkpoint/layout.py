"""The checkpoint folder layout: the one module that spells the names in a run's folder.

One checkpoint::

    <run>/checkpoints/step-00001200/
        dcp/            torch.distributed.checkpoint files (.metadata, __<rank>_0.distcp)
        rank_<r>.pt     per-rank RNG states and PerRank/plain entries (rank_state.py)
        deepspeed/      DeepSpeed's native checkpoint, when the strategy is deepspeed
        metadata.json   step, world size, code version, time, caller metadata (epoch, config ...),
                        "files": size and CRC-32 of every file above, checked on load
        PINNED          optional: retention never deletes this step
        CORRUPT         written when the step failed to load and an older one loaded instead
        COMMITTED       written last by rank 0 after every rank finished; without it the
                        folder is not a checkpoint

There is no LATEST pointer: the newest folder holding COMMITTED is the latest checkpoint (a
pointer would be one more file to keep consistent on object stores).

A "run folder" holds ``checkpoints/``; a "step folder" holds COMMITTED or ``dcp/``. Functions that
look at storage take a checkpoint.storage.Storage and are read-only and collective-free.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from rae_scale.storage import join, normalize

from .storage import Storage

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
STEP_GLOB = STEP_PREFIX + "*"
COMMIT_FILE = "COMMITTED"
PIN_FILE = "PINNED"
CORRUPT_FILE = "CORRUPT"
METADATA_FILE = "metadata.json"
DCP_DIR = "dcp"
DEEPSPEED_DIR = "deepspeed"
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{8,}})$")


def step_dir_name(step: int) -> str:
    """'step-00001200' for 1200 (eight digits at least, so names sort as steps do)."""
    return f"{STEP_PREFIX}{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a folder name or URL ending in 'step-00001200', else None."""
    m = _STEP_RE.match(os.path.basename(name.rstrip("/")))
    return int(m.group(1)) if m else None


def rank_file_name(rank: int) -> str:
    return f"rank_{rank}.pt"


def checkpoints_url(run_url: str) -> str:
    return join(run_url, CHECKPOINTS_DIR)


def step_url(run_url: str, step: int) -> str:
    return join(run_url, CHECKPOINTS_DIR, step_dir_name(step))


def is_run_folder(store: Storage, url: str) -> bool:
    return store.exists(join(url, CHECKPOINTS_DIR))


def is_step_folder(store: Storage, url: str) -> bool:
    return store.exists(join(url, COMMIT_FILE)) or store.exists(join(url, DCP_DIR))


def _steps_holding(store: Storage, run_url: str, marker: str) -> list[int]:
    """Steps whose folder under the run holds `marker`, ascending."""
    pattern = store.path(join(run_url, CHECKPOINTS_DIR, STEP_GLOB, marker))
    steps = (parse_step(os.path.dirname(p.rstrip("/"))) for p in store.fs.glob(pattern))
    return sorted(s for s in steps if s is not None)


def committed_steps(store: Storage, run_url: str) -> list[int]:
    """Steps of the run's committed checkpoints, ascending."""
    return _steps_holding(store, run_url, COMMIT_FILE)


def pinned_steps(store: Storage, run_url: str) -> list[int]:
    return _steps_holding(store, run_url, PIN_FILE)


def step_folders(store: Storage, run_url: str) -> list[int]:
    """Steps of every step folder of the run, committed or not, ascending."""
    steps = (parse_step(name) for name in store.listdir(checkpoints_url(run_url)))
    return sorted(s for s in steps if s is not None)


def is_run_or_step(path: str, storage_options: dict | None = None) -> bool:
    """True for a run folder or a step folder (where a checkpoint is, or will be, read from)."""
    url = normalize(path)
    store = Storage(url, storage_options)
    return is_run_folder(store, url) or is_step_folder(store, url)


def resolve_step_folder(path: str, storage_options: dict | None = None) -> str:
    """A run folder -> its newest committed step folder; any other folder stays as it is."""
    url = normalize(path)
    store = Storage(url, storage_options)
    if not is_run_folder(store, url):
        return url
    steps = committed_steps(store, url)
    if not steps:
        raise FileNotFoundError(f"run folder {path!r} has no committed checkpoint yet")
    return step_url(url, steps[-1])


def read_metadata(store: Storage, step_dir: str) -> dict[str, Any]:
    """The step folder's metadata.json."""
    return json.loads(store.read_bytes(join(step_dir, METADATA_FILE)))
