"""rae_scale.storage: the URL vocabulary and the endpoint rule (one endpoint setting for checkpoints,
data readers and mosaicml-streaming)."""
from __future__ import annotations

import os

import pytest

from rae_scale import storage

ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture
def no_endpoint_env(monkeypatch):
    for name in storage.ENDPOINT_ENV:  # set first: teardown then restores the variable, also when share_endpoint set it
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(storage, "_WARNED", set())  # each test sees share_endpoint's first warning


def test_vocabulary(tmp_path, monkeypatch):
    assert storage.is_remote("s3://b/x") and storage.is_remote("gs://b")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert storage.join("s3://b/run/", "checkpoints", "/step-1/") == "s3://b/run/checkpoints/step-1"
    assert storage.join(str(tmp_path), "a", "b") == os.path.join(str(tmp_path), "a", "b")
    assert storage.join("s3://b/x") == "s3://b/x"
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("run/") == str(tmp_path / "run")
    assert storage.normalize("s3://b/run/") == "s3://b/run"
    with pytest.raises(ValueError, match="empty storage URL"):
        storage.normalize("")


def test_environment_endpoint_applies_to_s3_only(no_endpoint_env, monkeypatch):
    assert storage.options("s3://b/x") == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env")
    assert storage.options("s3://b/x") == {"client_kwargs": {"endpoint_url": "http://aws-env"}}
    monkeypatch.setenv("S3_ENDPOINT_URL", ENDPOINT)  # the variable streaming reads wins
    assert storage.options("s3a://b/x") == {"client_kwargs": {"endpoint_url": ENDPOINT}}
    assert storage.options("gs://b/x") == {}
    assert storage.options("/local/path", {"key": "k"}) == {}  # local paths take no options


def test_explicit_options_win_key_by_key(no_endpoint_env, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", ENDPOINT)
    explicit = {"key": "k", "client_kwargs": {"region_name": "r"}}
    assert storage.options("s3://b/x", explicit) == {
        "key": "k", "client_kwargs": {"endpoint_url": ENDPOINT, "region_name": "r"}}
    mine = {"client_kwargs": {"endpoint_url": "http://mine"}}
    assert storage.options("s3://b/x", mine) == mine
    assert storage.options("s3://b/x", {"endpoint_url": "http://top"}) == {"endpoint_url": "http://top"}


def test_filesystem_gets_the_endpoint(no_endpoint_env, monkeypatch):
    pytest.importorskip("s3fs")
    monkeypatch.setenv("S3_ENDPOINT_URL", ENDPOINT)
    fs, path = storage.filesystem("s3://bucket/run")
    assert path == "bucket/run" and fs.client_kwargs["endpoint_url"] == ENDPOINT


def test_share_endpoint_exports_an_explicit_endpoint(no_endpoint_env, caplog):
    assert storage.share_endpoint({}) is None and "S3_ENDPOINT_URL" not in os.environ
    assert storage.share_endpoint({"client_kwargs": {"endpoint_url": ENDPOINT}}) == ENDPOINT
    assert os.environ["S3_ENDPOINT_URL"] == ENDPOINT
    assert storage.options("s3://data/shards") == {"client_kwargs": {"endpoint_url": ENDPOINT}}
    # the environment is not overwritten; a different explicit endpoint is pointed out
    assert storage.share_endpoint({"endpoint_url": "http://other"}) == ENDPOINT
    assert "data readers and mosaicml-streaming" in caplog.text


def test_share_endpoint_twice_is_harmless(no_endpoint_env, caplog):
    """The CLI and the training harness both call it: the second call changes nothing and warns no more."""
    opts = {"client_kwargs": {"endpoint_url": ENDPOINT}}
    assert storage.share_endpoint(opts) == storage.share_endpoint(opts) == ENDPOINT
    assert os.environ["S3_ENDPOINT_URL"] == ENDPOINT and not caplog.records
    other = {"endpoint_url": "http://other"}
    assert storage.share_endpoint(other) == storage.share_endpoint(other) == ENDPOINT
    assert sum("data readers and mosaicml-streaming" in r.getMessage() for r in caplog.records) == 1
