"""Nothing in rae_scale/train/ knows which strategy runs (DESIGN.md: the loops talk to one interface).

Every file under rae_scale/train/ is read with `ast`: no import of DeepSpeed, no identifier or
attribute naming DeepSpeed, an engine or a strategy's kind, and no string that names a strategy
(a comparison such as `kind == "deepspeed"` or `getattr(s, "engine")` needs one). Docstrings are
prose and may name the strategies; code may not.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN = Path(__file__).resolve().parents[2] / "rae_scale" / "train"
STRATEGY_NAMES = ("ddp", "fsdp", "deepspeed", "zero")
FORBIDDEN_WORDS = ("deepspeed", "engine", "is_deepspeed")
FORBIDDEN_ATTRIBUTES = ("kind", "engine", "zero_stage", "ds_config")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (module, class, function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def strategy_knowledge(path: Path) -> list[str]:
    """'line: what' for every place in the file that knows about a particular strategy."""
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    found = []

    def hit(node, what):
        found.append(f"{path.name}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if "deepspeed" in alias.name.lower():
                    hit(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [a.name for a in node.names]
            if any("deepspeed" in n.lower() for n in names):
                hit(node, f"from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            hit(node, f"attribute .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value.lower()
            if text.strip() in STRATEGY_NAMES + FORBIDDEN_ATTRIBUTES or "deepspeed" in text:
                hit(node, f"string {node.value!r}")
        else:
            name = (node.id if isinstance(node, ast.Name) else node.arg if isinstance(node, ast.arg)
                    else node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    else None)
            if name and any(word in name.lower() for word in FORBIDDEN_WORDS):
                hit(node, f"name {name}")
    return found


def test_train_files_exist():
    assert {p.name for p in TRAIN.glob("*.py")} >= {"run.py", "stage1.py", "stage2.py"}


@pytest.mark.parametrize("path", sorted(TRAIN.rglob("*.py")), ids=lambda p: p.name)
def test_no_file_in_train_knows_the_strategy(path):
    assert strategy_knowledge(path) == []


def test_the_check_catches_what_it_is_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Docstrings may say DeepSpeed."""\n'
                   "import deepspeed\n"
                   "def f(strategy):\n"
                   "    if getattr(strategy, 'kind', '') == 'deepspeed':\n"
                   "        strategy.engine.zero_grad()\n"
                   "    is_deepspeed = strategy.kind == 'fsdp'\n")
    found = strategy_knowledge(bad)
    for what in ("import deepspeed", "string 'kind'", "string 'deepspeed'", "attribute .engine",
                 "name is_deepspeed", "attribute .kind", "string 'fsdp'"):
        assert any(what in f for f in found), (what, found)
    assert not any(":1:" in f for f in found)  # the docstring


def test_importing_the_loops_does_not_import_deepspeed():
    code = ("import sys, rae_scale.train.stage1, rae_scale.train.stage2, rae_scale.train.run; "
            "sys.exit(1 if 'deepspeed' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:] or "deepspeed was imported by the training loops"
