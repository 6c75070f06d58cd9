"""A resolved config as plain data and YAML (secrets redacted), and saved beside a run."""
from __future__ import annotations

import dataclasses

import yaml

from rae_scale.config.redact import redact
from rae_scale.storage import filesystem, join

CONFIG_FILE = "config.yaml"  # the resolved config, in the run folder


def to_dict(obj) -> dict:
    """Plain dict of a config object, secrets redacted (safe to print, log and save)."""
    return redact(dataclasses.asdict(obj))


def to_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


def save_resolved(obj, run_dir: str, storage_options: dict | None = None) -> str:
    """Write the resolved (redacted) config beside a run; returns the file URL."""
    url = join(run_dir, CONFIG_FILE)
    fs, fpath = filesystem(url, storage_options)
    fs.makedirs(fpath.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(fpath, "w") as fh:
        fh.write(to_yaml(obj))
    return url
