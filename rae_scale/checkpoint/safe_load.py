"""Reading checkpoint files without running code from them: the one module that unpickles.

A run folder may come from anywhere (a shared bucket, a colleague, a download), so nothing read from
it may call arbitrary Python. Three kinds of pickle live in a checkpoint:

- tensors and small values saved with torch.save (our per-rank files, DCP byte entries): loaded with
  ``torch.load(weights_only=True)`` (torch's own allow-list: tensors, plain containers, numbers, str);
- DCP's ``.metadata``: a pickle of torch.distributed.checkpoint dataclasses, read here by an
  unpickler that resolves only those classes, torch.Size, dtypes/layouts and plain containers;
- DCP byte entries inside ``.distcp`` files: torch's DefaultLoadPlanner loads them with
  ``weights_only=False``; SafeFsspecReader loads them safely first and hands the planner a fresh
  torch.save of the result, so what the planner unpickles was produced here from allowed types only;
- DeepSpeed's native checkpoint files: DeepSpeed itself loads them with ``weights_only=False``;
  validate_deepspeed_dir loads each first with ``weights_only=True`` plus the few plain-data DeepSpeed
  classes its checkpoints hold, so DeepSpeed's own load of the same bytes builds nothing else.

Every refusal is one line naming the file and what was refused (the manager then falls back to the
previous commit; the CLI prints it as a user error).
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import re
from typing import Any

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

from rae_scale.storage import options

__all__ = ["CheckpointLoadError", "UnsafeCheckpointError", "CheckpointCorruptError", "safe_torch_load",
           "load_dcp_metadata", "SafeFsspecReader", "own_load_error", "validate_deepspeed_dir",
           "DEEPSPEED_SAFE_GLOBALS"]


class CheckpointLoadError(RuntimeError):
    """No checkpoint could be loaded (the requested one and every committed fallback failed)."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A checkpoint file asks for something the safe loaders refuse (it would run code)."""


class CheckpointCorruptError(CheckpointLoadError):
    """A checkpoint file does not match the checksum recorded when it was written (or is unreadable)."""


_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue", "In PyTorch 2.6")


def _weights_only_reason(exc: BaseException) -> str:
    """The informative line of torch's long weights_only error."""
    text = str(exc)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"refused global {m.group(1)}"
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(_BOILERPLATE):
            return line.replace("WeightsUnpickler error:", "").strip() or type(exc).__name__
    return type(exc).__name__


def safe_torch_load(data: bytes, what: str) -> Any:
    """torch.load(weights_only=True) of in-memory bytes onto the CPU; refusals and garbage are one line."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = _weights_only_reason(exc)
        cls = UnsafeCheckpointError if reason.startswith("refused global") else CheckpointCorruptError
        raise cls(f"{what}: not loadable with torch.load(weights_only=True): {reason} "
                  "(only tensors, numbers, strings and plain containers are allowed)") from None


# ------------------------------------------------------------------------------- DCP metadata
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # looks a layout up by name
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}
_ALLOWED_TEXT = ("torch.distributed.checkpoint metadata classes, torch.Size, torch dtypes and layouts, "
                 "plain containers")


def _allowed_global(module: str, name: str) -> Any:
    if name in _DCP_METADATA_CLASSES.get(module, ()):
        return getattr(importlib.import_module(module), name, None)
    if module == "torch":
        if name == "Size":
            return torch.Size
        value = vars(torch).get(name)  # not getattr: no lazy submodule import on a planted name
        if isinstance(value, (torch.dtype, torch.layout)):
            return value
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP .metadata pickle needs; anything else is refused."""

    def __init__(self, data: bytes, what: str):
        super().__init__(io.BytesIO(data))
        self.what = what

    def find_class(self, module: str, name: str) -> Any:
        value = _allowed_global(module, name)
        if value is None:
            raise UnsafeCheckpointError(f"{self.what}: refused global {module}.{name} in DCP metadata "
                                        f"(allowed: {_ALLOWED_TEXT})")
        return value

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.what}: refused persistent id in DCP metadata (allowed: {_ALLOWED_TEXT})")


def load_dcp_metadata(data: bytes, what: str):
    """A DCP Metadata object from the bytes of a .metadata file, through the allow-listed unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(data, what).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise CheckpointCorruptError(f"{what}: unreadable DCP metadata ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointCorruptError(f"{what}: holds a {type(metadata).__name__}, not DCP Metadata")
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        path = getattr(info, "relative_path", None)
        # DCP files sit flat in the checkpoint folder: no other file may be read through the metadata
        if not isinstance(path, str) or not path or "/" in path or "\\" in path or path in (".", ".."):
            raise UnsafeCheckpointError(f"{what}: storage entry {getattr(index, 'fqn', index)!r} points at "
                                        f"{path!r} (allowed: a file name inside the DCP folder)")
    return metadata


# ------------------------------------------------------------------------------- DCP reader
class _SafeBytesPlanner:
    """Stands in for a load planner inside read_data: byte entries are loaded safely here, and the
    real planner gets a re-serialisation of the (allowed) result; everything else passes through."""

    def __init__(self, planner, reader: "SafeFsspecReader"):
        self._planner = planner
        self._reader = reader

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = getattr(getattr(read_item, "dest_index", None), "fqn", "?")
        info = self._reader.storage_data.get(read_item.storage_index)
        where = str(self._reader.fs.concat_path(self._reader.path, getattr(info, "relative_path", "?")))
        try:
            obj = safe_torch_load(value.getvalue() if hasattr(value, "getvalue") else value.read(),
                                  f"{where} (entry {fqn!r})")
        except CheckpointLoadError as exc:
            raise self._reader._refused(exc) from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)


class SafeFsspecReader(FsspecReader):
    """FsspecReader whose metadata and byte entries never go through an unrestricted unpickler.

    load_error keeps the first refusal: DCP re-wraps reader errors (a refused .metadata even becomes
    part of a "metadata is None" RuntimeError, after logging tracebacks), and callers report this one
    line instead. Callers that want a clean error call read_metadata() once before DCP does (the
    file's bytes are kept, so DCP's own call does not read it again).
    """

    load_error: CheckpointLoadError | None = None
    _metadata_bytes: dict | None = None

    def __init__(self, path: str | os.PathLike, **storage_options: Any):
        super().__init__(path, **options(os.fspath(path), storage_options))  # rae_scale.storage's endpoint rule

    def _refused(self, exc: CheckpointLoadError) -> CheckpointLoadError:
        if self.load_error is None:
            self.load_error = exc
        return exc

    def _metadata_file(self, rank: int | None) -> str:
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        return str(self.fs.concat_path(self.path, name))

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._metadata_file(kwargs.get("rank"))
        if self._metadata_bytes is None:
            self._metadata_bytes = {}
        if path not in self._metadata_bytes:
            with self.fs.create_stream(path, "rb") as f:
                self._metadata_bytes[path] = f.read()
        data = self._metadata_bytes[path]
        try:
            metadata = load_dcp_metadata(data, path)
        except CheckpointLoadError as exc:
            raise self._refused(exc) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _SafeBytesPlanner(planner, self))


def own_load_error(exc: BaseException, reader: SafeFsspecReader | None = None) -> CheckpointLoadError | None:
    """Our load error behind DCP's CheckpointException (which prints every rank's traceback), if any:
    the reader's own refusal first, then one found among the ranks' failures."""
    if reader is not None and reader.load_error is not None:
        return reader.load_error
    if isinstance(exc, CheckpointLoadError):
        return exc
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for pair in failures.values():
            inner = pair[0] if isinstance(pair, tuple) else pair
            if isinstance(inner, CheckpointLoadError):
                return inner
    return None


# ------------------------------------------------------------------------------- DeepSpeed native files
# What DeepSpeed's own checkpoints (ZeRO 1/2/3, fp32 and bf16, this repo's client state) pickle beyond
# torch's weights_only defaults, found by saving real checkpoints and listing their globals. Each is plain
# data: nothing runs beyond storing attributes when the unpickler builds it.
DEEPSPEED_SAFE_GLOBALS = (
    # the ZeRO stage in the optimizer states: an int Enum, rebuilt as ZeroStageEnum(value) (a member lookup)
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    # the static loss scaler (fp32/bf16): __new__ plus __dict__ update; no __setstate__, its __init__ only
    # sets cur_scale and dynamic
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    # ZeRO-1/2's parameter -> partition map: a two-int dataclass (numel, start)
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
# names DeepSpeed could unpickle; any other file that starts like a torch zip or a pickle is checked too
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")
_ZIP_MAGIC = b"PK\x03\x04"


def _deepspeed_safe_globals() -> list:
    """The allow-listed classes themselves (DeepSpeed is imported only here, when a DeepSpeed checkpoint
    is about to be read)."""
    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_SAFE_GLOBALS]


def _unpickled_by_deepspeed(path: str) -> bool:
    if path.endswith(_PICKLE_SUFFIXES):
        return True
    with open(path, "rb") as f:
        return f.read(4).startswith(_PICKLE_MAGIC)


def _check_deepspeed_file(path: str, allowed: list, shown: str) -> None:
    with open(path, "rb") as f:
        zipped = f.read(4) == _ZIP_MAGIC
    try:
        # mmap: the pickle is parsed in full, the tensor bytes are mapped, not read (optimizer states are large)
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:
        reason = _weights_only_reason(exc)
        cls = UnsafeCheckpointError if reason.startswith("refused global") else CheckpointCorruptError
        names = ", ".join(name for _, name in DEEPSPEED_SAFE_GLOBALS)
        raise cls(f"{shown}: not loadable with torch.load(weights_only=True): {reason} (a DeepSpeed checkpoint "
                  f"file may hold only tensors, numbers, strings, plain containers and DeepSpeed's {names})"
                  ) from None
    del obj


def validate_deepspeed_dir(local_dir: str | os.PathLike, shown_as: str | None = None) -> int:
    """Check every file DeepSpeed could unpickle under local_dir (a downloaded native checkpoint, or one
    tag folder) before DeepSpeed or ds_to_universal loads it with weights_only=False.

    A file that passes the restricted load makes the unrestricted load of the same bytes build only
    allowed objects. Raises UnsafeCheckpointError (a refused global or a symbolic link) or
    CheckpointCorruptError (unreadable), one line naming the file (under shown_as, e.g. the step folder's
    URL it was downloaded from, in place of local_dir). Returns the number of files checked.
    """
    root = os.fspath(local_dir)

    def shown(path: str) -> str:
        if shown_as is None:
            return path
        return "/".join([shown_as.rstrip("/"), *os.path.relpath(path, root).split(os.sep)])

    if not os.path.isdir(root):
        raise CheckpointCorruptError(f"{shown_as or root}: no DeepSpeed checkpoint folder there")
    allowed = _deepspeed_safe_globals()
    checked = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in dirnames + sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path):  # downloads never make links; one could lead a load outside the folder
                raise UnsafeCheckpointError(f"{shown(path)}: a symbolic link in a DeepSpeed checkpoint folder")
            if name in filenames and _unpickled_by_deepspeed(path):
                _check_deepspeed_file(path, allowed, shown(path))
                checked += 1
    return checked
