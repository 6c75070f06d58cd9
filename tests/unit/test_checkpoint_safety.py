"""Checkpoint files never run code and are checked against their commit's checksums (issue 21).

Each planted file carries a pickle whose unpickling would create a marker file (what an attacker's
payload would do); the checksums in metadata.json are updated as an attacker writing the folder could,
so the safe loaders themselves must refuse it. Corrupt files and NaN states are the integrity side.
"""
from __future__ import annotations

import io
import json
import logging
import pickle
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException

from rae_scale.checkpoint import (CheckpointCorruptError, CheckpointManager, CheckpointSaveError,
                                  ModelOptimizerState, PerRank, UnsafeCheckpointError, consolidate)
from rae_scale.checkpoint.rank_state import decode_rank_state, encode_rank_state
from rae_scale.checkpoint.safe_load import SafeFsspecReader


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears iff a loader ran the pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Holder:
    """A Stateful with a plain value beside a tensor (DCP stores the value as a bytes entry)."""

    def __init__(self, x=0, w=None):
        self.x, self.w = x, torch.zeros(4) if w is None else w

    def state_dict(self):
        return {"x": self.x, "w": self.w}

    def load_state_dict(self, s):
        self.x, self.w = s["x"], s["w"]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _two_commits(tmp_path, extra=None):
    """A run with steps 1 and 2 committed; returns the manager and step 1's weights."""
    mgr = CheckpointManager(tmp_path / "run", keep_last=None, async_save=False)
    model = _model()
    mgr.save(1, {"m": ModelOptimizerState(model), **(extra or {})})
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mgr.save(2, {"m": ModelOptimizerState(model), **(extra or {})})
    return mgr, good


def _rerecord(step_dir: Path) -> None:
    """Update the commit's checksums to the files as they are now (what an attacker could do)."""
    meta = json.loads((step_dir / "metadata.json").read_text())
    for name in meta["files"]:
        data = (step_dir / name).read_bytes()
        meta["files"][name] = {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    text = json.dumps(meta, indent=2, sort_keys=True)
    (step_dir / "metadata.json").write_text(text)
    (step_dir / "COMMITTED").write_text(text)


def _resume_falls_back(mgr, good, caplog, *expected_in_warning):
    model = _model(seed=5)
    with caplog.at_level(logging.WARNING, logger="rae_scale.checkpoint.manager"):
        meta = mgr.load(mgr.resolve_resume("auto"), {"m": ModelOptimizerState(model)})
    assert meta["step"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, good[k]), k
    warning = " ".join(r.getMessage() for r in caplog.records if "falling back" in r.getMessage())
    for text in expected_in_warning:
        assert text in warning, warning
    assert mgr.committed_steps() == [1]  # the planted one no longer counts


def _one_line(exc: BaseException, *parts: str) -> None:
    text = str(exc)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, text


# ------------------------------------------------------------------------- item 1: per-rank files
def test_planted_rank_file_is_refused_and_resume_falls_back(tmp_path, caplog):
    mgr, good = _two_commits(tmp_path)
    step2, marker = tmp_path / "run/checkpoints/step-00000002", tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"rank": 0, "world_size": 1, "rng": _Payload(marker), "entries": {}}, buf)
    (step2 / "rank_0.pt").write_bytes(buf.getvalue())
    _rerecord(step2)
    _resume_falls_back(mgr, good, caplog, "rank_0.pt", "refused global io.open")
    assert not marker.exists()


def test_per_rank_values_round_trip_exactly():
    state = {"tuple": (1, (2.5, "a"), None), "int_keys": {0: "a", 7: (1, 2)}, "tuple_keys": {(1, 2): [3]},
             "np": [np.int64(2**40 + 3), np.float32(0.1), np.uint32(7), np.bool_(True), np.float64(-0.0)],
             "arr": np.arange(6, dtype=np.uint32).reshape(2, 3), "floats": [float("nan"), float("inf"), 1e-310],
             "big": 2**100, "bytes": b"\x00\xff", "set": {1, 2}, "tag_key": {"$t": "not a tag"},
             "t": torch.arange(5, dtype=torch.int16), "py_rng": random.getstate()}
    back = decode_rank_state(encode_rank_state(state), "test")
    assert back["tuple"] == (1, (2.5, "a"), None) and isinstance(back["tuple"][1], tuple)
    assert back["int_keys"] == {0: "a", 7: (1, 2)} and back["tuple_keys"] == {(1, 2): [3]}
    for a, b in zip(state["np"], back["np"]):
        assert type(a) is type(b) and a.tobytes() == b.tobytes()
    assert back["arr"].dtype == np.uint32 and np.array_equal(back["arr"], state["arr"])
    assert np.isnan(back["floats"][0]) and back["floats"][1:] == [float("inf"), 1e-310]
    assert back["big"] == 2**100 and back["bytes"] == b"\x00\xff" and back["set"] == {1, 2}
    assert back["tag_key"] == {"$t": "not a tag"} and torch.equal(back["t"], state["t"])
    random.setstate(back["py_rng"])  # exact tuples: accepted as is
    assert random.getstate() == state["py_rng"]


def test_unstorable_per_rank_value_is_refused_at_save(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", async_save=False)
    with pytest.raises(TypeError, match=r"state\['entries'\]\['loader'\]\['fn'\].*cannot store"):
        mgr.save(1, {"m": ModelOptimizerState(_model()), "loader": PerRank({"fn": lambda: 0})})
    with pytest.raises(TypeError, match="'h.x' is a numpy.float64"):  # DCP bytes entries are checked too
        mgr.save(1, {"h": _Holder(x=np.float64(1.0))})
    assert mgr.committed_steps() == []


def test_checkpoint_of_the_earlier_format_still_loads(tmp_path, caplog):
    """Written before this change: plain torch.save per-rank file, no checksums."""
    mgr = CheckpointManager(tmp_path / "run", async_save=False)
    mgr.save(3, {"m": ModelOptimizerState(_model()), "loader": PerRank({"pos": 11})})
    step = tmp_path / "run/checkpoints/step-00000003"
    old = io.BytesIO()
    from rae_scale.checkpoint.rng import get_rng_state

    torch.save({"rank": 0, "world_size": 1, "rng": get_rng_state(), "entries": {"loader": {"pos": 12}}}, old)
    (step / "rank_0.pt").write_bytes(old.getvalue())
    meta = json.loads((step / "metadata.json").read_text())
    del meta["files"]
    (step / "metadata.json").write_text(json.dumps(meta))
    loader = PerRank({})
    with caplog.at_level(logging.WARNING, logger="rae_scale.checkpoint.manager"):
        mgr.load(mgr.step_url(3), {"m": ModelOptimizerState(_model(1)), "loader": loader})
    assert loader.obj == {"pos": 12}
    assert any("unverified" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- item 2: DCP files
def test_planted_dcp_metadata_is_refused_everywhere(tmp_path, caplog, capsys):
    mgr, good = _two_commits(tmp_path)
    step2, marker = tmp_path / "run/checkpoints/step-00000002", tmp_path / "pwned"
    (step2 / "dcp/.metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rerecord(step2)
    with pytest.raises(UnsafeCheckpointError) as err:
        consolidate(step2)
    _one_line(err.value, str(step2 / "dcp/.metadata"), "refused global io.open")
    # the CLI (convert, and the builders behind generate --checkpoint / rae.decoder_checkpoint)
    from rae_scale.commands.cli import main

    capsys.readouterr()  # only what the command prints (earlier tests may have left a log handler)
    assert main(["convert", "ema-safetensors", str(step2), str(tmp_path / "out.safetensors")]) != 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rae-scale: error:") and "refused global" in lines[0], lines
    from rae_scale.builders import ema_weights

    with pytest.raises(UnsafeCheckpointError):
        ema_weights(str(tmp_path / "run"))  # a run folder: its newest commit, step 2
    assert not marker.exists()
    _resume_falls_back(mgr, good, caplog, "refused global io.open")
    assert not marker.exists()


def test_planted_bytes_entry_inside_distcp_is_refused(tmp_path, caplog):
    mgr, good = _two_commits(tmp_path, extra={"h": _Holder(x=3)})
    step2, marker = tmp_path / "run/checkpoints/step-00000002", tmp_path / "pwned"
    # rewrite step 2's DCP files with a bytes entry that is a payload (DCP pickles non-tensors)
    model = _model()
    state = {"m": ModelOptimizerState(model).state_dict(), "h": {"x": _Payload(marker), "w": torch.ones(4)}}
    dcp.save(state, storage_writer=FsspecWriter(str(step2 / "dcp")), no_dist=True)
    _rerecord(step2)
    with pytest.raises(UnsafeCheckpointError) as err:
        consolidate(step2)
    _one_line(err.value, "__0_0.distcp", "'h.x'", "refused global io.open")
    reader = SafeFsspecReader(str(step2 / "dcp"))  # safe with torch's own (unrestricted) planner too
    with pytest.raises(CheckpointException):
        dcp.load({"h": {"x": 0, "w": torch.zeros(4)}}, storage_reader=reader, no_dist=True)
    assert isinstance(reader.load_error, UnsafeCheckpointError)
    assert not marker.exists()
    model = _model(seed=5)
    holder = _Holder()
    with caplog.at_level(logging.WARNING, logger="rae_scale.checkpoint.manager"):
        meta = mgr.load(mgr.resolve_resume("auto"), {"m": ModelOptimizerState(model), "h": holder})
    assert meta["step"] == 1 and holder.x == 3
    assert any("refused global io.open" in r.getMessage() for r in caplog.records)
    assert not marker.exists()


# ------------------------------------------------------------------------- item 11: integrity
def test_flipped_byte_in_shard_falls_back_naming_the_file(tmp_path, caplog):
    mgr, good = _two_commits(tmp_path)
    step2 = tmp_path / "run/checkpoints/step-00000002"
    shard = step2 / "dcp/__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError) as err:
        consolidate(step2)
    _one_line(err.value, str(shard), "checksum mismatch")
    _resume_falls_back(mgr, good, caplog, str(shard), "checksum mismatch")
    assert (step2 / "CORRUPT").exists()


@pytest.mark.parametrize("async_save", [False, True])
def test_nonfinite_state_is_never_committed(tmp_path, caplog, async_save):
    mgr = CheckpointManager(tmp_path / "run", keep_last=1, async_save=async_save)
    model = _model()
    mgr.save(1, {"m": ModelOptimizerState(model)})
    mgr.wait()
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    with caplog.at_level(logging.ERROR, logger="rae_scale.checkpoint.manager"):
        with pytest.raises(CheckpointSaveError, match=r"step 2 not saved: 'm.model.2.bias' holds NaN or inf"):
            mgr.save(2, {"m": ModelOptimizerState(model)}, pin=True)
            mgr.wait()
    assert any("not saved" in r.getMessage() for r in caplog.records)
    # nothing written, pinned or rotated out: step 1 is still the newest, loadable checkpoint
    assert mgr.committed_steps() == [1] and mgr.pinned_steps() == []
    assert not (tmp_path / "run/checkpoints/step-00000002").exists()
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with pytest.raises(CheckpointSaveError, match="NaN or inf"):
        mgr.save(3, {"m": ModelOptimizerState(model)})
        mgr.wait()
    unchecked = CheckpointManager(tmp_path / "run2", async_save=False, check_finite=False)
    unchecked.save(1, {"m": ModelOptimizerState(model)})  # opted out: states holding inf on purpose
    assert unchecked.committed_steps() == [1]
