"""The README stays true to the code: every config key and its allowed values, every CLI command."""
from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

from rae_scale.config import schema
from rae_scale.commands import cli

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


def config_classes() -> list[type]:
    """Every section dataclass reachable from a job (nested sections, lists and optionals included)."""
    seen, todo = [], list(schema.JOBS.values())
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            stack = [hints[f.name]]
            while stack:
                t = stack.pop()
                if dataclasses.is_dataclass(t):
                    todo.append(t)
                stack.extend(typing.get_args(t))
    return seen


def test_every_config_key_and_its_allowed_values_are_in_the_readme():
    keys = section("Config keys")
    # a key counts as named when it is a word inside a `code span` of the section (`{url, weight}` too)
    named = {w for span in re.findall(r"`([^`]+)`", keys) for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}
    unnamed, choices = [], []
    for cls in config_classes():
        for f in dataclasses.fields(cls):
            if f.name not in named:
                unnamed.append(f"{cls.__name__}.{f.name}")
            allowed = {str(c) for c in f.metadata.get("choices", ()) if c is not None}
            if len(allowed) > 1:  # written `key` a|b|c, in any order
                listed = [set(m.split("|")) for m in re.findall(rf"`{f.name}`\s+([\w.-]+(?:\|[\w.-]+)+)", keys)]
                if allowed not in listed:
                    choices.append(f"{cls.__name__}.{f.name}: {'|'.join(sorted(allowed))} (README: {listed})")
    assert not unnamed, f"config keys the README's 'Config keys' section never names: {unnamed}"
    assert not choices, f"allowed values the README does not list as `key` a|b|c: {choices}"


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    return [path for name, sub in subs[0].choices.items() for path in command_paths(sub, prefix + (name,))]


def test_every_cli_command_is_in_the_readme_table():
    table = [line for line in section("The CLI").splitlines() if line.startswith("| `rae-scale ")]
    rows = [re.match(r"\| `rae-scale ([^`]*)`", line).group(1).replace("\\|", "|") for line in table]  # a table cell escapes |
    paths = command_paths(cli.build_parser())
    assert len(paths) > 15
    missing = []
    for path in paths:
        # a row spells a choice among siblings as a|b (`train stage1|stage2`, `launch local|slurm|ray`)
        pattern = r"\s+".join(rf"(?:[\w-]+\|)*{re.escape(word)}(?:\|[\w-]+)*" for word in path) + r"(?:\s|$)"
        if not any(re.match(pattern, row) for row in rows):
            missing.append(" ".join(path))
    assert not missing, f"CLI commands without a row in the README's CLI table: {missing}"
    documented = {name for row in rows for name in row.split()[0].split("|")}
    unknown = documented - {path[0] for path in paths}
    assert not unknown, f"README rows for commands the CLI lacks: {sorted(unknown)}"
