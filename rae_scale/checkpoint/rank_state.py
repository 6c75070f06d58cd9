"""The per-rank file (rank_<r>.pt): RNG states and PerRank/plain entries, stored so that loading it
never needs an unrestricted unpickler.

The file is a torch.save of ``{"format": FORMAT, "state": <JSON text>, "tensors": [tensor, ...]}``,
read back with ``torch.load(weights_only=True)``. The JSON holds every plain value; tensors sit in the
list and are referenced from the JSON by index. Values JSON cannot express exactly are tagged
objects (``{"$t": kind, ...}``) so that they come back as they went in, bit for bit:

- tuples stay tuples (``random.getstate()``), dicts with non-str keys keep their keys' types;
- numpy scalars and arrays keep their dtype (raw bytes, so every value is exact);
- floats round-trip exactly (JSON of repr, NaN and inf included), ints of any size, bytes, sets.

Anything else (a custom object, a lambda) is refused when the checkpoint is saved, with the key path
named: a loader's state_dict must return plain values.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch

from .safe_load import CheckpointCorruptError, safe_torch_load

FORMAT = "rae_scale.rank_state.v2"
_TAG = "$t"
_ALLOWED = ("None, bool, int, float, str, bytes, list, tuple, dict, set, torch.Tensor, numpy arrays of "
            "numbers and numpy scalars")

__all__ = ["FORMAT", "encode_rank_state", "decode_rank_state"]


def _encode(value: Any, tensors: list, path: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):  # before float/int: np.float64 is a float subclass
        if value.dtype.hasobject:
            raise TypeError(f"per-rank state {path}: numpy object scalars cannot be stored (allowed: {_ALLOWED})")
        return {_TAG: "np_scalar", "dtype": value.dtype.str, "hex": value.tobytes().hex()}
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {_TAG: "tensor", "i": len(tensors) - 1}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"per-rank state {path}: numpy object arrays cannot be stored (allowed: {_ALLOWED})")
        raw = np.ascontiguousarray(value)
        tensors.append(torch.from_numpy(raw.reshape(-1).view(np.uint8).copy()))
        return {_TAG: "ndarray", "dtype": raw.dtype.str, "shape": list(raw.shape), "i": len(tensors) - 1}
    if isinstance(value, (bytes, bytearray)):
        return {_TAG: type(value).__name__, "hex": bytes(value).hex()}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [_encode(v, tensors, f"{path}{{}}") for v in value]
        return {_TAG: type(value).__name__, "items": items}
    if isinstance(value, dict):
        if all(type(k) is str for k in value) and _TAG not in value:
            return {k: _encode(v, tensors, f"{path}[{k!r}]") for k, v in value.items()}
        return {_TAG: "dict", "items": [[_encode(k, tensors, f"{path} key {k!r}"),
                                         _encode(v, tensors, f"{path}[{k!r}]")] for k, v in value.items()]}
    raise TypeError(f"per-rank state {path}: cannot store a {type(value).__module__}.{type(value).__qualname__} "
                    f"(allowed: {_ALLOWED}); return plain values from state_dict()")


def _decode(node: Any, tensors: list, what: str) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, what) for v in node]
    if not isinstance(node, dict):
        return node
    kind = node.get(_TAG)
    if kind is None:
        return {k: _decode(v, tensors, what) for k, v in node.items()}
    try:
        if kind == "tuple":
            return tuple(_decode(v, tensors, what) for v in node["items"])
        if kind == "dict":
            return {_decode(k, tensors, what): _decode(v, tensors, what) for k, v in node["items"]}
        if kind == "tensor":
            return tensors[node["i"]]
        if kind == "ndarray":
            dtype = np.dtype(node["dtype"])
            if dtype.hasobject:
                raise ValueError("object dtype")
            raw = tensors[node["i"]].numpy().tobytes()
            return np.frombuffer(raw, dtype=dtype).reshape(node["shape"]).copy()
        if kind == "np_scalar":
            dtype = np.dtype(node["dtype"])
            if dtype.hasobject:
                raise ValueError("object dtype")
            return np.frombuffer(bytes.fromhex(node["hex"]), dtype=dtype)[0]
        if kind in ("bytes", "bytearray"):
            data = bytes.fromhex(node["hex"])
            return data if kind == "bytes" else bytearray(data)
        if kind in ("set", "frozenset"):
            items = (_decode(v, tensors, what) for v in node["items"])
            return set(items) if kind == "set" else frozenset(items)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CheckpointCorruptError(f"{what}: malformed {kind!r} entry in the per-rank state ({exc!r})") from None
    raise CheckpointCorruptError(f"{what}: unknown entry kind {kind!r} in the per-rank state")


def encode_rank_state(state: Any) -> bytes:
    """The bytes of a per-rank file for `state` (raises TypeError naming a value that cannot be stored)."""
    tensors: list[torch.Tensor] = []
    text = json.dumps(_encode(state, tensors, "state"), allow_nan=True, separators=(",", ":"))
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "state": text, "tensors": tensors}, buf)
    return buf.getvalue()


def decode_rank_state(data: bytes, what: str) -> Any:
    """The state stored by encode_rank_state. Files written before this format (a plain torch.save of
    the state) load as well when they pass the weights_only loader."""
    payload = safe_torch_load(data, what)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        try:
            tree = json.loads(payload["state"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointCorruptError(f"{what}: unreadable per-rank state ({exc!r})") from None
        return _decode(tree, list(payload.get("tensors") or []), what)
    if isinstance(payload, dict) and "format" not in payload and {"rng", "entries"} <= set(payload):
        return payload  # the earlier layout: same keys, values straight from weights_only
    raise CheckpointCorruptError(f"{what}: not a rae_scale per-rank state file (expected format {FORMAT})")
