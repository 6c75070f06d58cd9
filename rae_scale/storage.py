"""The one URL vocabulary of rae_scale: local paths, file://, s3:// and any other fsspec URL.

Checkpoints, data readers, the data pipeline and the launchers all name storage with these
functions: ``is_remote``, ``normalize``, ``join``, ``filesystem`` (fsspec's filesystem and path for
a URL), ``open_url`` and ``options`` (which fsspec options a URL gets).

The endpoint rule (a user sets an S3-compatible endpoint once):

1. Explicit options win. Options passed by the caller (a job's ``run.storage_options``, e.g.
   ``{"key": ..., "client_kwargs": {"endpoint_url": "http://minio:9000"}}``) apply to every remote
   URL opened with them, key by key over the defaults of rule 2. Local paths and file:// URLs take
   no options (so a job may pass its options for every URL it opens).
2. The environment's endpoint is the default. An ``s3://`` (or ``s3a://``) URL opened without an
   explicit endpoint gets ``S3_ENDPOINT_URL`` (the variable mosaicml-streaming reads itself), else
   ``AWS_ENDPOINT_URL``.
3. One endpoint for the whole job. Data readers (MDS through mosaicml-streaming, webdataset shards,
   latent caches, statistics) open their URLs without explicit options, so they follow rule 2.
   ``share_endpoint(run.storage_options)``, called once when a job starts, exports an endpoint that
   the explicit options name to ``S3_ENDPOINT_URL`` when that is unset: checkpoints, data readers
   and streaming then reach the same store, in this process and in the ranks and workers it starts.
   Either spelling is enough: ``S3_ENDPOINT_URL=...`` or
   ``run.storage_options.client_kwargs.endpoint_url=...``. When both are set and differ, what is
   opened with the explicit options uses theirs, the data readers the environment's, and a warning
   says so.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import fsspec

logger = logging.getLogger(__name__)

ENDPOINT_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")  # first set wins
_S3_PROTOCOLS = ("s3", "s3a")
_LOCAL_PROTOCOLS = ("file", "local")
_WARNED: set[tuple[str, str]] = set()  # (explicit, environment) endpoint pairs share_endpoint warned about


def protocol(url: str) -> str:
    """The URL's protocol; 'file' for a plain path."""
    return url.split("://", 1)[0] if "://" in url else "file"


def is_remote(url: str) -> bool:
    """True for URLs with a protocol other than the local filesystem."""
    return protocol(url) not in _LOCAL_PROTOCOLS


def normalize(url: str | os.PathLike) -> str:
    """Strip trailing slashes; make local paths absolute so every rank agrees on them."""
    url = os.fspath(url)
    if not url:
        raise ValueError("empty storage URL: give a local path, file://..., s3://... or any fsspec URL")
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    return url.rstrip("/") if len(url) > 1 else url


def join(url: str, *parts: str) -> str:
    """Join URL parts with '/' (os.path.join for plain paths), whatever the protocol."""
    parts = tuple(p.strip("/") for p in parts if p and p.strip("/"))
    if "://" in url:
        return "/".join([url.rstrip("/"), *parts]) if parts else url
    return os.path.join(url, *parts)


def endpoint_of(storage_options: Mapping[str, Any] | None) -> str | None:
    """The S3 endpoint that fsspec options name (s3fs takes it either at the top or in client_kwargs)."""
    opts = storage_options or {}
    client = opts.get("client_kwargs") or {}
    return opts.get("endpoint_url") or (client.get("endpoint_url") if isinstance(client, Mapping) else None)


def environment_endpoint() -> str | None:
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def options(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options ``url`` is opened with: the module's endpoint rule."""
    if not is_remote(url):
        return {}
    out: dict[str, Any] = {}
    endpoint = environment_endpoint()
    if protocol(url) in _S3_PROTOCOLS and endpoint and not endpoint_of(storage_options):
        out["client_kwargs"] = {"endpoint_url": endpoint}
    for key, value in (storage_options or {}).items():
        if key == "client_kwargs" and isinstance(value, Mapping):
            out["client_kwargs"] = {**out.get("client_kwargs", {}), **value}
        else:
            out[key] = value
    return out


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """(fsspec filesystem, path inside it) for a local path or any fsspec URL."""
    return fsspec.core.url_to_fs(url, **options(url, storage_options))


def open_url(url: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None):
    """fsspec.open with the module's options: a context manager giving a file object."""
    return fsspec.open(url, mode, **options(url, storage_options))


def share_endpoint(storage_options: Mapping[str, Any] | None) -> str | None:
    """Rule 3: export the endpoint the options name to S3_ENDPOINT_URL when unset.

    Call once per job with its run.storage_options, before data loaders or ranks start; a second
    call changes nothing. Returns the endpoint data readers will use (None when there is none).
    """
    explicit, current = endpoint_of(storage_options), environment_endpoint()
    if explicit and not current:
        os.environ[ENDPOINT_ENV[0]] = explicit
        return explicit
    if explicit and current and explicit.rstrip("/") != current.rstrip("/") and (explicit, current) not in _WARNED:
        _WARNED.add((explicit, current))  # the CLI and the training harness both call this: say it once
        logger.warning("run.storage_options names the S3 endpoint %s but the environment says %s: checkpoints "
                       "use the first, data readers and mosaicml-streaming the second", explicit, current)
    return current
