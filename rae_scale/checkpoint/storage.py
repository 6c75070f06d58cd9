"""What checkpoints need from storage, built on rae_scale.storage (the URL vocabulary and the endpoint
rule): a filesystem bound to a run's URL, retries with backoff, whole-folder upload and download."""
from __future__ import annotations

import logging
import os
import posixpath
import random
import time
from typing import Any, Callable, TypeVar

from rae_scale.storage import filesystem, is_remote, normalize

logger = logging.getLogger(__name__)

T = TypeVar("T")

_NOT_TRANSIENT = (TypeError, ValueError, KeyError, AttributeError, NotImplementedError)


class Storage:
    """A filesystem bound to one root URL, with the few operations checkpoints need.

    storage_options: explicit fsspec options (e.g. run.storage_options), applied by
    rae_scale.storage's endpoint rule.
    """

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        self.url = normalize(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, self.storage_options)

    def path(self, url: str) -> str:
        """The fs-internal path of a URL under (or equal to) this storage's protocol."""
        _, path = filesystem(url, self.storage_options)
        return path

    def url_of(self, path: str) -> str:
        """Turn an fs-internal path (as fs.ls returns it) back into a URL."""
        if is_remote(self.url):
            protocol = self.url.split("://", 1)[0]
            return f"{protocol}://{path}"
        return path

    def invalidate(self) -> None:
        # listings of object stores are cached by s3fs; another process may have written since
        self.fs.invalidate_cache()

    def exists(self, url: str) -> bool:
        return self.fs.exists(self.path(url))

    def isdir(self, url: str) -> bool:
        return self.fs.isdir(self.path(url))

    def listdir(self, url: str) -> list[str]:
        """Names (not paths) of entries directly under url; empty when it does not exist."""
        path = self.path(url)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})

    def read_bytes(self, url: str) -> bytes:
        with self.fs.open(self.path(url), "rb") as f:
            return f.read()

    def write_bytes(self, url: str, data: bytes) -> None:
        path = self.path(url)
        parent = posixpath.dirname(path) if is_remote(self.url) else os.path.dirname(path)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def rm(self, url: str, recursive: bool = False) -> None:
        path = self.path(url)
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    def makedirs(self, url: str) -> None:
        self.fs.makedirs(self.path(url), exist_ok=True)


def retry(fn: Callable[[], T], *, what: str, attempts: int = 4, backoff_s: float = 1.0,
          max_backoff_s: float = 30.0) -> T:
    """Call fn until it succeeds, sleeping backoff_s * 2**i (+-25% jitter) between tries.

    Re-raises the last exception after `attempts` failures; every failure is logged.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for i in range(attempts):
        try:
            return fn()
        except _NOT_TRANSIENT:
            raise  # a bug or bad argument: retrying cannot help
        except Exception as exc:  # storage errors come in many types (OSError, botocore, ...)
            if i == attempts - 1:
                logger.error("%s failed after %d attempts: %r", what, attempts, exc)
                raise
            delay = min(max_backoff_s, backoff_s * 2**i) * random.uniform(0.75, 1.25)
            logger.warning("%s failed (attempt %d/%d): %r; retrying in %.1f s",
                           what, i + 1, attempts, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def upload_dir(local_dir: str | os.PathLike, url: str, *, storage_options: dict | None = None,
               attempts: int = 4, backoff_s: float = 1.0) -> str:
    """Copy a local directory tree to url (any fsspec URL); retried as a whole. Returns url."""
    local_dir = os.fspath(local_dir)
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"upload_dir: local directory {local_dir!r} does not exist")
    url = normalize(url)
    fs, root = filesystem(url, storage_options)

    def _put():
        for dirpath, _, files in os.walk(local_dir):
            rel = os.path.relpath(dirpath, local_dir)
            target_dir = root if rel == "." else posixpath.join(root, *rel.split(os.sep))
            fs.makedirs(target_dir, exist_ok=True)
            for name in files:
                fs.put_file(os.path.join(dirpath, name), posixpath.join(target_dir, name))

    retry(_put, what=f"upload {local_dir} -> {url}", attempts=attempts, backoff_s=backoff_s)
    return url


def download_dir(url: str, local_dir: str | os.PathLike, *, storage_options: dict | None = None,
                 attempts: int = 4, backoff_s: float = 1.0) -> str:
    """Copy the tree under url into local_dir (created). Returns local_dir."""
    local_dir = os.fspath(local_dir)
    url = normalize(url)
    fs, root = filesystem(url, storage_options)
    if not fs.isdir(root):
        raise FileNotFoundError(f"download_dir: {url!r} is not a directory")

    def _get():
        for path in fs.find(root):
            rel = posixpath.relpath(path, root)
            dest = os.path.join(local_dir, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.get_file(path, dest)

    os.makedirs(local_dir, exist_ok=True)
    retry(_get, what=f"download {url} -> {local_dir}", attempts=attempts, backoff_s=backoff_s)
    return local_dir

