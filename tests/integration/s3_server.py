"""An S3-compatible server on loopback for tests (moto's server mode, as s3fs's own tests use).

Import ``s3_endpoint`` as a pytest fixture (``from integration.s3_server import s3_endpoint``) or
use ``start_s3()`` directly. The fixture sets S3_ENDPOINT_URL (read by mosaicml-streaming and by
rae_scale.storage), AWS_ENDPOINT_URL and dummy AWS_* credentials, and creates ``bucket``s
on demand through ``make_bucket``.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import pytest

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def start_s3():
    """Run moto's ThreadedMotoServer on 127.0.0.1:<free port>; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*_ENV, "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"]}
    os.environ.update(_ENV, S3_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_bucket(endpoint: str, name: str) -> str:
    """Create a bucket; returns its s3:// URL."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def s3_endpoint():
    with start_s3() as endpoint:
        yield endpoint
