"""No code path of the package unpickles without restriction (issue 21): a source scan with `ast`.

Rules, for every module under rae_scale/, data_pipeline/ and launchers/:
- torch.load always passes weights_only=True (a literal), and no call passes weights_only otherwise;
- pickle / dill / cloudpickle / joblib loaders and pickle.Unpickler appear only in the allow-listed
  reader module (rae_scale/checkpoint/safe_load.py), as do torch's DCP readers (FsspecReader,
  FileSystemReader) and dcp_to_torch_save: every DCP read goes through SafeFsspecReader;
- DCP loads name their storage_reader (else DCP builds its own unrestricted FileSystemReader);
- numpy.load never allows pickles.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("rae_scale", "data_pipeline", "launchers")
ALLOWED_READER = Path("rae_scale/checkpoint/safe_load.py")

_PICKLE_LOADERS = {f"{m}.{f}" for m in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
                   for f in ("load", "loads", "Unpickler")} | {"joblib.load", "pandas.read_pickle", "shelve.open"}
_DCP = "torch.distributed.checkpoint"
_DCP_READERS = {"FsspecReader", "FileSystemReader", "dcp_to_torch_save"}
_DCP_LOADS = {f"{_DCP}.load", f"{_DCP}.load_state_dict", f"{_DCP}.state_dict_loader.load",
              f"{_DCP}.state_dict_loader.load_state_dict", f"{_DCP}.state_dict_loader._load_state_dict"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from the module's imports (any nesting level)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str, path: Path) -> list[str]:
    """Every unsafe load in one module's source, as 'path:line: what'."""
    tree = ast.parse(source, filename=str(path))
    aliases = _aliases(tree)
    reader_module = path == ALLOWED_READER
    found: list[str] = []

    def bad(node: ast.AST, what: str) -> None:
        found.append(f"{path}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not reader_module:
            for a in node.names:
                if f"{node.module}.{a.name}" in _PICKLE_LOADERS:
                    bad(node, f"imports {node.module}.{a.name}")
                if a.name in _DCP_READERS and node.module.startswith(_DCP):
                    bad(node, f"imports torch's unrestricted DCP reader {a.name}")
        if isinstance(node, (ast.Name, ast.Attribute)) and not reader_module:
            name = _dotted(node, aliases) or ""
            if name.startswith(_DCP) and name.rsplit(".", 1)[-1] in _DCP_READERS:
                bad(node, f"uses torch's unrestricted DCP reader {name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if "weights_only" in keywords and not _is_true(keywords["weights_only"]):
            bad(node, f"{name or 'a call'} with weights_only other than True")
        if name in ("torch.load", "torch.serialization.load") and not _is_true(keywords.get("weights_only")):
            bad(node, f"{name} without weights_only=True")
        if name in _PICKLE_LOADERS and not reader_module:
            bad(node, f"{name} outside {ALLOWED_READER}")
        if name in ("numpy.load",) and "allow_pickle" in keywords and not (
                isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False):
            bad(node, "numpy.load with allow_pickle")
        if name in _DCP_LOADS and "storage_reader" not in keywords:
            bad(node, f"{name} without storage_reader= (DCP would read with its unrestricted reader)")
    return found


def test_scanner_catches_planted_violations():
    planted = '''
import io, pickle
import pickle as pk
from pickle import loads
import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

def _torch_load(data):  # what the manager did before issue 21
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:
        return torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")

torch.load("x.pt")
torch.load("x.pt", weights_only=flag)
pickle.load(open("f", "rb"))
pk.loads(b"")
loads(b"")
np.load("a.npy", allow_pickle=True)
dcp.load({}, checkpoint_id="run/dcp")
class U(pickle.Unpickler):
    pass
'''
    found = violations(planted, Path("rae_scale/planted.py"))
    text = "\n".join(found)
    for expected in (":15: torch.load with weights_only other than True", ":17: torch.load without weights_only",
                     ":18: torch.load with weights_only other than True", ":19: pickle.load outside",
                     ":20: pickle.loads outside", ":21: pickle.loads outside", ":4: imports pickle.loads",
                     ":22: numpy.load with allow_pickle", ":23: torch.distributed.checkpoint.load without storage_reader",
                     ":8: imports torch's unrestricted DCP reader FileSystemReader",
                     ":9: imports torch's unrestricted DCP reader dcp_to_torch_save"):
        assert expected in text, (expected, text)
    assert not any(":13:" in f for f in found)  # weights_only=True is fine
    # the allow-listed reader may unpickle through its own restricted Unpickler
    assert violations("import pickle\nclass U(pickle.Unpickler):\n    pass\nU(f).load()\n", ALLOWED_READER) == []


def test_package_has_no_unsafe_loads():
    found = []
    for top in SCANNED:
        for file in sorted((REPO / top).rglob("*.py")):
            rel = file.relative_to(REPO)
            found += violations(file.read_text(encoding="utf-8"), rel)
    assert not found, "unsafe loads:\n" + "\n".join(found)
