"""Export: one consolidated state dict from a sharded DCP checkpoint, EMA-only extraction,
safetensors files in fp32 or bf16 on any fsspec URL."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from rae_scale.storage import is_remote, join, normalize, open_url

from .integrity import verify_files
from .layout import DCP_DIR, METADATA_FILE
from .safe_load import CheckpointCorruptError, SafeFsspecReader, own_load_error
from .storage import Storage, download_dir

__all__ = ["consolidate", "extract_state", "extract_ema", "flatten_state_dict", "export_safetensors"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def consolidate(step_dir: str | os.PathLike, storage_options: dict | None = None) -> dict[str, Any]:
    """The full (unsharded) nested state dict of a DCP checkpoint, on CPU, in one process.

    step_dir is a step folder written by CheckpointManager (its dcp/ sub-folder is read) or a DCP
    folder itself. Remote checkpoints are downloaded to a temporary folder first. A step folder's
    files are checked against the checksums its commit recorded, and nothing is unpickled beyond
    the safe loaders (safe_load.py): a run folder from elsewhere cannot run code here.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    url = normalize(step_dir)
    with tempfile.TemporaryDirectory(prefix="rae_scale_consolidate_") as tmp:
        if is_remote(url):
            local = download_dir(url, os.path.join(tmp, "ckpt"), storage_options=storage_options)
        else:
            local = url.split("://", 1)[-1]
        dcp_dir = os.path.join(local, DCP_DIR) if os.path.isdir(os.path.join(local, DCP_DIR)) else local
        if not os.path.exists(os.path.join(dcp_dir, ".metadata")):
            raise FileNotFoundError(f"{step_dir!r} holds no DCP checkpoint (no .metadata in it or in {DCP_DIR}/)")
        meta_file = os.path.join(local, METADATA_FILE)
        if dcp_dir != local and os.path.exists(meta_file):
            try:
                with open(meta_file, "rb") as f:
                    files = json.loads(f.read()).get("files")
                if files is not None:  # older checkpoints recorded none
                    verify_files(Storage(local), local, files, sorted(n for n in files if n.startswith(DCP_DIR + "/")))
            except (ValueError, AttributeError, CheckpointCorruptError) as exc:  # name the source, not the copy
                text = str(exc).replace(local, url) if isinstance(exc, CheckpointCorruptError) else \
                    f"{join(url, METADATA_FILE)}: unreadable ({exc})"
                raise CheckpointCorruptError(text) from None
        state: dict[str, Any] = {}
        reader = SafeFsspecReader(dcp_dir)
        try:
            reader.read_metadata()  # a refusal as our one line, before DCP logs its fallbacks
            _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        except (Exception, CheckpointException) as exc:
            ours = own_load_error(exc, reader)
            if ours is None:
                raise
            raise type(ours)(str(ours).replace(local, url)) from None
        return state


def extract_state(state: dict[str, Any], path: str) -> dict[str, Any]:
    """The sub-dict at a dotted path, e.g. extract_state(full, "ema.model").

    Parameter FQNs contain dots themselves: address down to the dict that holds them.
    """
    node: Any = state
    for i, part in enumerate(path.split(".") if path else []):
        if not isinstance(node, dict) or part not in node:
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"no {'.'.join(path.split('.')[:i + 1])!r} in state dict (keys there: {have})")
        node = node[part]
    if not isinstance(node, dict):
        raise TypeError(f"{path!r} is a {type(node).__name__}, not a state dict")
    return node


def extract_ema(state: dict[str, Any], key: str = "ema") -> dict[str, torch.Tensor]:
    """EMA weights only: state[key], unwrapped from ModelOptimizerState's {"model": ...}."""
    ema = extract_state(state, key)
    if set(ema) == {"model"} and isinstance(ema["model"], dict):
        ema = ema["model"]
    return ema


def flatten_state_dict(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys."""
    flat: dict[str, Any] = {}
    for k, v in state.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten_state_dict(v, name + "."))
        else:
            flat[name] = v
    return flat


def export_safetensors(state_dict: dict[str, Any], path: str | os.PathLike, dtype: str = "fp32",
                       metadata: dict[str, str] | None = None,
                       storage_options: dict | None = None) -> str:
    """Write the tensors of state_dict (nested dicts flattened to dotted keys) as safetensors.

    Floating-point tensors are cast to dtype ("fp32", "bf16" or "fp16"); integer tensors are kept.
    Non-tensor values are an error (safetensors stores tensors only). path is any fsspec URL.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    from safetensors.torch import save

    target = _DTYPES[dtype]
    tensors = {}
    for name, value in flatten_state_dict(state_dict).items():
        if hasattr(value, "full_tensor"):  # a DTensor: gather it (collective on its mesh)
            value = value.full_tensor()
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"export_safetensors: {name!r} is a {type(value).__name__}; only tensors "
                            "can be exported (select the weights, e.g. with extract_ema)")
        t = value.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(target)
        tensors[name] = t.contiguous().clone()  # own storage: safetensors refuses shared memory
    meta = {"format": "pt", "dtype": dtype, **(metadata or {})}
    data = save(tensors, metadata={k: str(v) for k, v in meta.items()})
    url = normalize(path)
    with open_url(url, "wb", storage_options) as f:
        f.write(data)
    return url
