"""A sweep's grid: `key=v1,v2` lists (command line or YAML file) -> the cartesian product of config
overrides, each trial named stably from its overrides, checked against the job's config before any
trial starts. No Ray and no torch here: the launcher runs the trials, sweep_report reads them back.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from rae_scale import config as C
from rae_scale.config.load import parse_override

# Keys a grid may not set: the sweep sets them for every trial.
RESERVED_KEYS = {"run.dir": "the sweep gives every trial its own run folder under the sweep folder",
                 "parallel.nproc": "use --ranks-per-trial"}
GRID_FILE_KEYS = ("stage", "config", "overrides", "grid", "metric", "mode")
NAME_MAX = 80  # characters of the readable part of a trial name (a hash of the overrides follows)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One point of the grid: its overrides in key order and the name of its run folder."""

    name: str
    values: tuple[tuple[str, Any], ...]  # (dotted key, parsed value), keys sorted

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={format_value(v)}" for k, v in self.values]


@dataclasses.dataclass
class GridSpec:
    """What a grid file (or the command line) says: stage, base config, fixed overrides, the grid."""

    stage: str | None = None
    config: str | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    grid: dict[str, list] = dataclasses.field(default_factory=dict)
    metric: str | None = None
    mode: str | None = None


def format_value(value: Any) -> str:
    """A parsed value as override text that parse_override reads back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _parse_value(key: str, raw: Any) -> Any:
    """A grid value as the config loader would read it (YAML scalars; 1e-4 is a float)."""
    if isinstance(raw, str):
        return parse_override(f"{key}={raw}")[1]
    return raw


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: `1e-4,[0.9,0.95]` -> ['1e-4', '[0.9,0.95]']."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def check_key(key: str, where: str, *, swept: bool = True) -> str:
    """A well-formed dotted key that the sweep leaves to the user (fixed overrides may set parallel.nproc)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise C.ConfigError(f"{where}: '{key}' is not a dotted config key like optimizer.lr")
    if key in RESERVED_KEYS and (swept or key == "run.dir"):
        raise C.ConfigError(f"{where}: '{key}' is set by the sweep: {RESERVED_KEYS[key]}")
    return key


def parse_grid_arg(text: str) -> tuple[str, list]:
    """`--grid key=v1,v2` -> (key, [parsed values])."""
    if "=" not in text:
        raise C.ConfigError(f"--grid '{text}' is not of the form key=v1,v2,...")
    key, raw = (s.strip() for s in text.split("=", 1))
    check_key(key, f"--grid {text}")
    values = split_top_level(raw)
    if not raw.strip() or any(v == "" for v in values):
        raise C.ConfigError(f"--grid {text}: empty value; give comma-separated values such as {key}=1,2")
    return key, [_parse_value(key, v) for v in values]


def _grid_from_mapping(grid: Any, where: str) -> dict[str, list]:
    if grid is None:
        return {}
    if not isinstance(grid, Mapping):
        raise C.ConfigError(f"{where}: 'grid' must map config keys to lists of values")
    out = {}
    for key, values in grid.items():
        check_key(str(key), where)
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise C.ConfigError(f"{where}: grid key '{key}' has no values")
        out[str(key)] = [_parse_value(str(key), v) for v in values]
    return out


def _overrides_from(value: Any, where: str) -> list[str]:
    """Fixed overrides: a list of `key=value` strings or a mapping key -> value."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [f"{check_key(str(k), where, swept=False)}={format_value(v)}" for k, v in value.items()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and "=" in v for v in value):
        for item in value:
            check_key(item.split("=", 1)[0].strip(), where, swept=False)
        return list(value)
    raise C.ConfigError(f"{where}: 'overrides' must be a list of key=value strings or a mapping")


def load_grid_file(path: str | Path) -> GridSpec:
    """Read a sweep file: {stage, config, overrides, grid, metric, mode}, every key optional."""
    p = Path(path)
    if not p.is_file():
        raise C.ConfigError(f"--grid-file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise C.ConfigError(f"--grid-file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise C.ConfigError(f"--grid-file '{path}' must hold a mapping with keys {', '.join(GRID_FILE_KEYS)}")
    unknown = sorted(set(data) - set(GRID_FILE_KEYS))
    if unknown:
        raise C.ConfigError(f"--grid-file '{path}': unknown key '{unknown[0]}'; allowed: {', '.join(GRID_FILE_KEYS)}")
    config = _find_config(str(data["config"]), p) if data.get("config") else None
    return GridSpec(stage=data.get("stage"), config=config, overrides=_overrides_from(data.get("overrides"), str(path)),
                    grid=_grid_from_mapping(data.get("grid"), str(path)), metric=data.get("metric"),
                    mode=data.get("mode"))


def _find_config(config: str, grid_file: Path) -> str:
    """A grid file's `config:` relative to the working folder (as CONFIG is), else to the folders above
    the grid file (configs/sweeps/x.yaml names configs/stage1/y.yaml from the checkout's root)."""
    if Path(config).is_absolute() or Path(config).exists():
        return config
    for parent in grid_file.resolve().parents:
        if (parent / config).is_file():
            return str(parent / config)
    return config


def merge_grid(file_grid: Mapping[str, list], cli_args: Sequence[str]) -> dict[str, list]:
    """The file's grid, then the command line's --grid entries (which replace a key of the file)."""
    out = dict(file_grid)
    seen = set()
    for text in cli_args:
        key, values = parse_grid_arg(text)
        if key in seen:
            raise C.ConfigError(f"--grid '{key}' is given twice; list all its values in one --grid {key}=v1,v2")
        seen.add(key)
        out[key] = values
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)


def trial_name(values: Sequence[tuple[str, Any]]) -> str:
    """Readable and stable: `lr=0.0001_noise_tau=0.8-1f3a9c2e` (last key part = value, then a hash of the
    full keys and values, so the name never depends on the order the grid was written in)."""
    canonical = json.dumps(sorted([k, v] for k, v in values), sort_keys=True, default=str)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:8]
    readable = "_".join(f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in sorted(values)) or "base"
    return f"{_slug(readable)[:NAME_MAX]}-{digest}"


def expand(grid: Mapping[str, Sequence]) -> list[Trial]:
    """The cartesian product of the grid (keys sorted; values in the order given), duplicates dropped."""
    keys = sorted(grid)
    trials, names = [], set()
    for combo in itertools.product(*(list(grid[k]) for k in keys)):
        values = tuple(zip(keys, combo))
        trial = Trial(trial_name(values), values)
        if trial.name not in names:
            names.add(trial.name)
            trials.append(trial)
    return trials


def check_size(n: int, max_trials: int, allow_large: bool) -> None:
    if n > max_trials and not allow_large:
        raise C.ConfigError(f"the grid has {n} trials, more than --max-trials {max_trials}; pass --allow-large "
                            f"to run them all (or raise --max-trials)")


def validation_points(trials: Sequence[Trial]) -> list[Trial]:
    """The first trial, then for every other value of each key the first trial with that value: each
    key and value is loaded once (a config load costs a fraction of a second; 64 trials would cost
    tens of seconds)."""
    if not trials:
        return []
    points, seen = [trials[0]], set(trials[0].values)
    for trial in trials[1:]:
        new = set(trial.values) - seen
        if new:
            points.append(trial)
            seen |= new
    return points


def validate(job_cls, config: str | None, fixed: Sequence[str], trials: Sequence[Trial]) -> dict[str, Any]:
    """Load the job config of the validation points (an unknown key gets the loader's nearest-key
    message); returns {trial name: resolved config} for them."""
    loaded = {}
    for i, trial in enumerate(validation_points(trials)):
        try:
            loaded[trial.name] = C.load_config(job_cls, config, [*fixed, *trial.overrides])
        except C.ConfigError as exc:
            if i == 0:  # every grid key is in the first trial: unknown keys and base-config errors show here
                raise
            raise C.ConfigError(f"trial {trial.name} ({' '.join(trial.overrides)}): {exc}") from None
    return loaded


def trial_max_steps(trial: Trial, base_cfg) -> int | None:
    """training.max_steps of a trial: its grid value, else the (common) resolved config's."""
    values = dict(trial.values)
    return values["training.max_steps"] if "training.max_steps" in values else base_cfg.training.max_steps
