"""Checkpoint integrity: per-file checksums recorded at commit and checked on load, and the
finiteness check that keeps NaN/inf weights out of committed checkpoints.

Checksums are CRC-32 plus the size of every file a rank wrote (its rank_<r>.pt, its DCP
``__<r>_*.distcp`` files, and rank 0's ``.metadata``). They guard against flipped or truncated bytes,
not against someone who can also rewrite metadata.json (loading is safe against such files anyway:
see safe_load). CRC-32 rather than a cryptographic hash because it runs at memory speed and is
computed while DCP writes (HashingFsspecWriter): the shards are never read back to hash them.
"""
from __future__ import annotations

import threading
import zlib
from contextlib import contextmanager
from typing import Any, Iterable

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecWriter

from rae_scale.storage import join, options

from .safe_load import CheckpointCorruptError
from .storage import Storage

ALGORITHM = "crc32"
_CHUNK = 16 << 20

__all__ = ["ALGORITHM", "checksum", "HashingFsspecWriter", "verify_bytes", "verify_file", "verify_files",
           "first_nonfinite"]


def checksum(data: bytes | memoryview) -> dict[str, Any]:
    """The record stored for one file's bytes."""
    return {"size": len(data), ALGORITHM: f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"}


class _HashingStream:
    """A write stream that checksums what passes through it, as long as it is written front to back."""

    def __init__(self, raw):
        self._raw = raw
        self.crc = 0
        self.size = 0
        self.sequential = True  # cleared by anything that could rewrite earlier bytes

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        return self._raw.write(data)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def seek(self, *args):
        pos = self._raw.seek(*args)
        if pos != self.size:
            self.sequential = False
        return pos

    def truncate(self, *args):
        self.sequential = False
        return self._raw.truncate(*args)

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, closed, ...
        return getattr(self._raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()


class _HashingFileSystem(FileSystem):
    """DCP's fsspec FileSystem, recording a checksum of every file written through it."""

    def __init__(self, inner: FileSystem):
        super().__init__()
        self.fs = inner.fs
        self.written: dict[str, dict[str, Any] | None] = {}  # path -> record, None: read it back
        self._lock = threading.Lock()  # DCP may write with several threads

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as raw:
            if not any(c in mode for c in "wa+"):
                yield raw
                return
            stream = _HashingStream(raw)
            yield stream
        record = ({"size": stream.size, ALGORITHM: f"{stream.crc & 0xFFFFFFFF:08x}"}
                  if stream.sequential and "a" not in mode and "+" not in mode else None)
        with self._lock:
            self.written[str(path)] = record

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        with self._lock:
            if str(path) in self.written:
                self.written[str(new_path)] = self.written.pop(str(path))


class HashingFsspecWriter(FsspecWriter):
    """FsspecWriter that knows the checksum of each file it wrote (file_checksums() after dcp.save)."""

    def __init__(self, path: str, **storage_options: Any):
        super().__init__(path, **options(path, storage_options))  # rae_scale.storage's endpoint rule
        self.fs = _HashingFileSystem(self.fs)

    def file_checksums(self, storage: Storage) -> dict[str, dict[str, Any]]:
        """{file name in the DCP folder: record}; files not written front to back are read back."""
        out = {}
        for path, record in self.fs.written.items():
            name = path.replace("\\", "/").rsplit("/", 1)[-1]
            if record is None:
                record = verify_file(storage, storage.url_of(path), None)
            out[name] = record
        return out


def verify_bytes(data: bytes, expected: dict[str, Any] | None, what: str) -> None:
    """Raise CheckpointCorruptError when data does not match its record (no record: nothing to check)."""
    if expected is None:
        return
    got = checksum(data)
    if got["size"] != expected.get("size") or got[ALGORITHM] != expected.get(ALGORITHM):
        raise CheckpointCorruptError(f"{what}: checksum mismatch (recorded {expected.get('size')} bytes "
                                     f"{ALGORITHM} {expected.get(ALGORITHM)}, found {got['size']} bytes "
                                     f"{ALGORITHM} {got[ALGORITHM]})")


def verify_file(storage: Storage, url: str, expected: dict[str, Any] | None) -> dict[str, Any]:
    """Stream a file through CRC-32; raise CheckpointCorruptError if it differs from expected. Returns
    the file's record."""
    crc, size = 0, 0
    try:
        with storage.fs.open(storage.path(url), "rb") as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{url}: missing (the commit records it)") from None
    got = {"size": size, ALGORITHM: f"{crc & 0xFFFFFFFF:08x}"}
    if expected is not None and (got["size"] != expected.get("size") or got[ALGORITHM] != expected.get(ALGORITHM)):
        raise CheckpointCorruptError(f"{url}: checksum mismatch (recorded {expected.get('size')} bytes "
                                     f"{ALGORITHM} {expected.get(ALGORITHM)}, found {size} bytes "
                                     f"{ALGORITHM} {got[ALGORITHM]})")
    return got


def verify_files(storage: Storage, step_url: str, files: dict[str, dict[str, Any]],
                 names: Iterable[str]) -> None:
    """Check the named files (paths relative to the step folder) against their records in `files`."""
    for name in names:
        verify_file(storage, join(step_url, *name.split("/")), files[name])


# ------------------------------------------------------------------------------- finiteness
def _local_tensors(value: Any, path: str, out: list[tuple[str, torch.Tensor]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _local_tensors(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _local_tensors(v, f"{path}.{i}", out)
    elif isinstance(value, torch.Tensor):
        if hasattr(value, "to_local"):  # DTensor: this rank's shard (no collective)
            value = value.to_local()
        if value.is_floating_point() or value.is_complex():
            out.append((path, value))
    elif hasattr(value, "local_shards"):  # ShardedTensor
        for i, shard in enumerate(value.local_shards()):
            _local_tensors(shard.tensor, f"{path}.shard{i}", out)


def _finite_flag(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on t's device: no NaN or inf in t. One reduction pass, no full-size mask."""
    if t.is_complex():
        t = torch.view_as_real(t)
    t = t.detach()
    try:
        lo, hi = torch.aminmax(t)  # NaN propagates to both; inf shows up at an end
        return torch.isfinite(lo) & torch.isfinite(hi)
    except (RuntimeError, NotImplementedError, TypeError):  # dtypes without aminmax (float8)
        return torch.isfinite(t).all()


def first_nonfinite(state: Any) -> str | None:
    """The key path of the first floating-point tensor of `state` holding NaN or inf on this rank, or
    None when all are finite. One synchronisation per device."""
    tensors: list[tuple[str, torch.Tensor]] = []
    _local_tensors(state, "", tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(tensors):
        if t.numel():
            by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        flags = torch.stack([_finite_flag(tensors[i][1]) for i in indices])
        if not bool(flags.all()):
            return tensors[indices[int((~flags).nonzero()[0])]][0]
    return None
