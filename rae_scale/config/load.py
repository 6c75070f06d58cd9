"""YAML files and `a.b.c=value` overrides -> a typed, validated, resolved job config.

Loading goes YAML -> overrides -> typed object (OmegaConf) -> `validate` (choices and ranges from
field metadata) -> `derive.resolve` (derived fields, cross-field rules). Any user mistake raises
:class:`ConfigError` with a one-line message naming the full key path, the bad value and what is
allowed (the CLI turns it into exit code 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from rae_scale.config.derive import resolve
from rae_scale.config.errors import ConfigError
from rae_scale.config.schema import EvalJob, Stage1Job

# Keys that no longer exist, per job: the only value they ever had an effect with, and why they went.
# A config that sets one gets this reason instead of "unknown key"; a config saved by an older
# version (from_dict) may still carry one at that value, which is dropped.
REMOVED_KEYS: dict[type, dict[str, tuple[Any, str]]] = {
    Stage1Job: {"gan.disc_updates": (1, "the stage-1 loop makes exactly one discriminator update per step")},
    EvalJob: {"backend": ("torch", "evaluate runs on the ranks it is started with (torchrun, Slurm or "
                                   "`launch ray --job evaluate`); there is no in-process Ray backend")},
}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _dataclass_of(tp):
    """The dataclass inside a (possibly Optional) annotation, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _entry_dataclass(tp):
    """The entry dataclass of a list-of-sections field such as data.sources (List[SourceConfig]), else None."""
    for t in (tp, *typing.get_args(tp)):
        if typing.get_origin(t) in (list, typing.List):
            item = typing.get_args(t)[0]
            return item if dataclasses.is_dataclass(item) else None
    return None


def _entries_allowed(cls, name: str) -> str:
    """What a list-of-sections field holds, for error messages: the field's own description, else its keys."""
    allowed = _fields(cls)[name].metadata.get("allowed")
    entry = _entry_dataclass(_field_type(cls, name))
    return allowed or f"a list of mappings with keys {', '.join(_fields(entry))}"


def _removed_error(key: str, reason: str) -> ConfigError:
    return ConfigError(f"config key '{key}' was removed: {reason}; delete it from the config")


def _pop_dotted(data: dict, key: str, default=None):
    """Remove `key` (dotted) from nested dicts; returns its value, or `default` when absent."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return default
    return node.pop(last)


def _reject_removed(data: dict, cls, *, keep_inert: bool) -> None:
    """Refuse removed keys; with keep_inert (configs saved by older versions) drop those at their
    only working value."""
    missing = object()
    for key, (inert, reason) in REMOVED_KEYS.get(cls, {}).items():
        value = _pop_dotted(data, key, missing)
        if value is not missing and not (keep_inert and value == inert):
            raise _removed_error(key, reason)


def _unknown_key(path: str, name: str, cls) -> ConfigError:
    valid = sorted(_fields(cls))
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"did you mean '{path}{near[0]}'?" if near else f"valid keys here: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{path}{name}'; {hint}")


def _check_entries(value: Any, cls, name: str, path: str) -> None:
    """A list-of-sections field (data.sources): a list whose entries are mappings of the entry's keys;
    an unknown key names the entry's index and every allowed key."""
    key = f"{path}{name}"
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: {_entries_allowed(cls, name)}")
    entry = _entry_dataclass(_field_type(cls, name))
    valid = list(_fields(entry))
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"config key '{key}[{i}]': bad value {item!r}; allowed: a mapping with keys "
                              f"{', '.join(valid)}")
        for k in item:
            if k not in valid:
                near = difflib.get_close_matches(str(k), valid, n=1, cutoff=0.5)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise ConfigError(f"unknown config key '{key}[{i}].{k}' in entry {i} of {key}{hint}; "
                                  f"allowed keys: {', '.join(valid)}")
            sub = _dataclass_of(_field_type(entry, k))
            if sub is not None and isinstance(item[k], dict):
                _check_keys(item[k], sub, f"{key}[{i}].{k}.")
        _check_entry_types(item, entry, f"{key}[{i}].")


def _check_entry_types(item: dict, entry, path: str) -> None:
    """Type-check one list entry on its own: OmegaConf's error inside a list names the field, not the index."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.merge(OmegaConf.structured(entry), OmegaConf.create(item))
    except OmegaConfBaseException as exc:
        name = str(getattr(exc, "full_key", None) or "?")
        raise ConfigError(f"config key '{path}{name}': bad value {getattr(exc, 'value', None)!r}; "
                          f"allowed: {_type_name_at(entry, name)}") from None


def _check_keys(data: Any, cls, path: str = "") -> None:
    """Reject keys that the dataclass tree does not have, suggesting the nearest one."""
    if not isinstance(data, dict):
        return
    fields = _fields(cls)
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(path, str(key), cls)
        if _entry_dataclass(_field_type(cls, key)) is not None:
            _check_entries(value, cls, key, path)
            continue
        sub = _dataclass_of(_field_type(cls, key))
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, f"{path}{key}.")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value parsed as YAML, so 3e-4, [1,2], null and true work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override key '{key}' is not a dotted name like training.max_steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 3e-4 as a string; numbers written like that are meant as floats.
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        value = float(value)
    return key, value


def _set_dotted(data: dict, key: str, value: Any, cls) -> None:
    parts = key.split(".")
    node, node_cls, path = data, cls, ""
    for i, part in enumerate(parts):
        fields = _fields(node_cls) if node_cls is not None else None
        if fields is not None and part not in fields:
            raise _unknown_key(path, part, node_cls)
        if i == len(parts) - 1:
            node[part] = value
            return
        if node_cls is not None and _entry_dataclass(_field_type(node_cls, part)) is not None:
            raise ConfigError(f"config key '{path}{part}' is a list: set the whole list, "
                              f"{path}{part}='[{{...}}, ...]', not '{key}'; allowed: "
                              f"{_entries_allowed(node_cls, part)}")
        sub_cls = _dataclass_of(_field_type(node_cls, part)) if node_cls is not None else None
        if sub_cls is None:  # a free-form dict field such as parallel.deepspeed
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{path}{part}' is not a section; cannot set '{key}'")
            node, node_cls = child, None
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            node, node_cls = child, sub_cls
        path += part + "."


def _type_name_at(cls, dotted: str) -> str:
    """Human name of the declared type of a dotted key, for error messages."""
    node = cls
    tp = None
    for part in dotted.split("."):
        name = re.sub(r"\[\d+\]$", "", part)  # data.sources[0].weight: the entry's field
        if node is None or name not in _fields(node):
            return "see the config reference"
        if name == part and _entry_dataclass(_field_type(node, name)) is not None:
            return _entries_allowed(node, name)
        tp = _field_type(node, name)
        node = _dataclass_of(tp)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        inner = args[0]
        if typing.get_origin(inner) in (list, typing.List):
            item = typing.get_args(inner)[0]
            return f"a list of {names.get(item, item).split(' ', 1)[-1]}s or null"
        return names.get(inner, str(inner).replace("typing.", "")) + " or null"
    if typing.get_origin(tp) in (list, typing.List):
        return f"a list of {names.get(args[0], args[0]).split(' ', 1)[-1]}s"
    return names.get(tp, str(tp).replace("typing.", ""))


def _format_validation_error(exc: Exception, cls) -> ConfigError:
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, OmegaConfBaseException):
        key = getattr(exc, "full_key", None) or "?"
        value = getattr(exc, "value", None)
        return ConfigError(f"config key '{key}': bad value {value!r}; allowed: {_type_name_at(cls, str(key))}")
    return ConfigError(str(exc))


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}")
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(loaded).__name__}")
    loaded.pop("job", None)  # informative tag written by `config show`
    return loaded


def _build(cls, data: dict):
    """Typed object from plain data, validated and resolved."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data)))
    except OmegaConfBaseException as exc:
        raise _format_validation_error(exc, cls) from None
    validate(obj)
    return resolve(obj)


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Build a validated, resolved `cls` instance from defaults, an optional YAML file and dotted overrides."""
    data: dict = _read_yaml(path) if path is not None else {}
    _drop_training_sections(data, cls)
    _reject_removed(data, cls, keep_inert=False)
    _check_keys(data, cls)
    removed = REMOVED_KEYS.get(cls, {})
    for text in overrides:
        key, value = parse_override(text)
        if key in removed:
            raise _removed_error(key, removed[key][1])
        _set_dotted(data, key, value, cls)
    _check_keys(data, cls)  # an override's value can be a whole section or list: its keys too
    return _build(cls, data)


def _drop_training_sections(data: dict, cls) -> None:
    """A sample job (generate, evaluate's `sample`) may be given the stage-2 training config (or a run's
    config.yaml): its generator sections are the generator; the training-only sections are dropped."""
    from rae_scale.config.schema import GeneratorSections, Stage2Job

    if not (isinstance(cls, type) and issubclass(cls, GeneratorSections)) or cls is Stage2Job:
        return
    training_only = set(_fields(Stage2Job)) - set(_fields(cls))
    for key in [k for k in data if k in training_only]:
        del data[key]
    # `checkpoint` is the training's checkpoint section there and the weights to sample from here
    if isinstance(data.get("checkpoint"), dict) and _dataclass_of(_field_type(cls, "checkpoint")) is None:
        del data["checkpoint"]


def from_dict(cls, data: dict):
    """Inverse of to_dict for configs saved beside runs and checkpoints (also by older versions)."""
    import copy

    data = copy.deepcopy(data)
    _reject_removed(data, cls, keep_inert=True)
    _check_keys(data, cls)
    return _build(cls, data)


def validate(obj, path: str = "") -> None:
    """Check choices and ranges declared in field metadata, recursively."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            allowed = ", ".join("null" if c is None else str(c) for c in meta["choices"])
            raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: {allowed}")
        if "check" in meta and not meta["check"](value):
            raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: {meta['allowed']}")
        lo, hi, above = meta.get("min"), meta.get("max"), meta.get("above")
        if value is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            unset = " (or null)" if _optional(type(obj), f.name) else ""
            if lo is not None and value < lo:
                raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: >= {lo}{unset}")
            if above is not None and value <= above:
                raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: > {above}{unset}")
            if hi is not None and value > hi:
                raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: <= {hi}{unset}")


def _optional(cls, name: str) -> bool:
    return type(None) in typing.get_args(_field_type(cls, name))
