"""Entries of a list-of-sections key (data.sources): an unknown key, a wrong type or a non-mapping entry is one
line naming the entry's index, the key and what is allowed, from a YAML file and from an override alike."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rae_scale import config as C
from rae_scale.config.schema import SourceConfig

REPO = Path(__file__).resolve().parents[2]
MIX = REPO / "configs/stage1/mix_tiny_cpu.yaml"


def _allowed_keys() -> str:
    return ", ".join(f.name for f in dataclasses.fields(SourceConfig))


def _error(overrides, path=MIX) -> str:
    with pytest.raises(C.ConfigError) as err:
        C.load_config(C.Stage1Job, path, overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override, index, key, hint", [
    ("data.sources=[{url: a, wieght: 2}]", 0, "wieght", " (did you mean 'weight'?)"),
    ("data.sources=[{url: a}, {url: b, shard_cache: x}]", 1, "shard_cache", ""),
])
def test_unknown_key_in_an_override_entry_names_index_key_and_allowed_keys(override, index, key, hint):
    assert _error([override]) == (f"unknown config key 'data.sources[{index}].{key}' in entry {index} of "
                                  f"data.sources{hint}; allowed keys: {_allowed_keys()}")


def test_unknown_key_in_a_yaml_entry(tmp_path):
    data = yaml.safe_load(MIX.read_text())
    data["data"]["sources"][1]["proportion"] = 0.75
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    message = _error([], bad)
    assert message.startswith("unknown config key 'data.sources[1].proportion' in entry 1 of data.sources")
    assert message.endswith(f"allowed keys: {_allowed_keys()}")


@pytest.mark.parametrize("override, fragment", [
    ("data.sources=[{url: a}, {url: b, weight: heavy}]",
     "config key 'data.sources[1].weight': bad value 'heavy'; allowed: a number"),
    ("data.sources=[{url: a, name: [1, 2]}]", "config key 'data.sources[0].name': bad value [1, 2]; allowed: a string"),
    ("data.sources=[plain]", "config key 'data.sources[0]': bad value 'plain'; allowed: a mapping with keys url, "),
    ("data.sources=5", "config key 'data.sources': bad value 5; allowed: a list of {url, weight > 0"),
    ("data.sources=null", "config key 'data.sources': bad value None; allowed: a list of {url, weight > 0"),
    ("data.sources.weight=2", "config key 'data.sources' is a list: set the whole list"),
])
def test_bad_entry_types_and_shapes_are_one_line_errors(override, fragment):
    assert fragment in _error([override])


def test_good_entries_still_load():
    cfg = C.load_config(C.Stage1Job, MIX, ["data.sources=[{url: a, weight: 2}, {url: b, format: wds, name: web}]"])
    assert [(s.url, s.weight, s.format, s.name) for s in cfg.data.sources] == [("a", 2.0, "mds", None),
                                                                                ("b", 1.0, "wds", "web")]
    assert [s.name for s in C.load_config(C.Stage1Job, MIX).data.sources] == ["plain", "colour"]


def test_cli_prints_the_entry_error_on_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "rae_scale.commands.cli", "config", "show", "stage1", str(MIX),
                           "data.sources=[{url: a, wieght: 2}]"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        "rae-scale: error: unknown config key 'data.sources[0].wieght' in entry 0 of data.sources "
        f"(did you mean 'weight'?); allowed keys: {_allowed_keys()}"]
