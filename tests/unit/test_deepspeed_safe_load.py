"""DeepSpeed's native checkpoint files never run code on resume (issue 21).

DeepSpeed (engine.load_checkpoint, ds_to_universal) unpickles its files with weights_only=False, so
they pass safe_load.validate_deepspeed_dir first. Real checkpoints are written through the strategy
(and through CheckpointIO with a real manager) on one spawned gloo rank; the planted file carries a
pickle whose unpickling would create a marker file, as an attacker's payload would.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import pickle
import shutil
import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from conftest import run_ranks  # noqa: E402

from rae_scale.checkpoint import (CheckpointCorruptError, UnsafeCheckpointError,  # noqa: E402
                                  convert_deepspeed_to_universal)
from rae_scale.checkpoint.safe_load import DEEPSPEED_SAFE_GLOBALS, validate_deepspeed_dir  # noqa: E402

MODEL_STATES = "native/mp_rank_00_model_states.pt"


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears iff a loader ran the pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, raw: bool = False) -> None:
    """Replace a checkpoint file by the payload: torch.save's zip format, or a bare pickle (which
    torch.load reads through its legacy path)."""
    if raw:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    else:
        torch.save({"module": _Payload(marker)}, path)


def _error(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def _write_and_resume(rank: int, world: int, root: str) -> dict:
    """One rank: ZeRO-2 (fp32) saved through CheckpointIO into a run folder and resumed as it is, after a
    planted payload, and after the attacker also rewrote metadata.json's record; ZeRO-3 (bf16) saved
    with save_native."""
    import logging
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
    from _workers_parallel import ZERO3_OVERRIDES, build_model, lr_lambda, make_optimizer, train_step

    from rae_scale.checkpoint import CheckpointLoadError, CheckpointManager
    from rae_scale.checkpoint.deepspeed_format import DEEPSPEED_FILES_KEY
    from rae_scale.parallel import build_strategy, init_distributed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ["RAE_SCALE_STAGING"] = os.path.join(root, "staging")
    info = init_distributed()

    def trained(stage: int, precision: str, overrides=None):
        model = build_model()
        strategy = build_strategy("deepspeed", dist=info, zero_stage=stage, precision=precision,
                                  micro_batch_size=8, deepspeed_overrides=overrides)
        engine = strategy.wrap(model, blocks=model.blocks, optimizer_factory=make_optimizer,
                               lr_lambda=lr_lambda, ema_decay=0.9)
        train_step(strategy, engine, 0, rank, world, 1)
        strategy.step()
        return strategy

    out: dict = {}
    ckpt = trained(2, "fp32").checkpoint_io(CheckpointManager(os.path.join(root, "run"), async_save=False), {})
    ckpt.save(1)
    step = Path(root, "run", "checkpoints", "step-00000001")
    out["records"] = json.loads((step / "metadata.json").read_text())[DEEPSPEED_FILES_KEY]
    out["resumed"] = ckpt.resume("auto")
    shutil.copytree(step / "deepspeed", Path(root, "zero2"))

    marker = Path(root, "marker")
    planted = step / "deepspeed" / MODEL_STATES
    _plant(planted, marker)
    for case in ("planted", "planted_and_recorded"):
        if case == "planted_and_recorded":  # an attacker who can write the folder rewrites the record too
            meta = json.loads((step / "metadata.json").read_text())
            data = planted.read_bytes()
            meta[DEEPSPEED_FILES_KEY][f"deepspeed/{MODEL_STATES}"] = {
                "size": len(data), "crc32": f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"}
            (step / "metadata.json").write_text(json.dumps(meta))
        try:
            ckpt.resume("auto")
            out[case] = None
        except CheckpointLoadError as exc:
            out[case] = _error(exc)
    out["marker_after_resume"] = marker.exists()
    trained(3, "bf16", ZERO3_OVERRIDES).save_native(os.path.join(root, "zero3"), "native")
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_safe")
    return root, run_ranks(_write_and_resume, 1, str(root), timeout=600)[0]


def test_allow_list_is_exactly_what_real_checkpoints_need(written):
    root, _ = written
    needed = {name for d in ("zero2", "zero3") for f in sorted(Path(root, d).rglob("*.pt"))
              for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(f))}  # reads, never unpickles
    assert needed == {f"{module}.{name}" for module, name in DEEPSPEED_SAFE_GLOBALS}


def test_allow_listed_classes_are_plain_data():
    """What the unpickler may build: an enum (a member lookup) and classes rebuilt by object.__new__
    plus a __dict__ update (no __setstate__). A DeepSpeed upgrade that changes this needs a new review."""
    import importlib

    classes = {name: getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_SAFE_GLOBALS}
    assert issubclass(classes["ZeroStageEnum"], enum.Enum) and issubclass(classes["ZeroStageEnum"], int)
    for name in ("LossScaler", "fragment_address"):
        cls = classes[name]
        assert cls.__new__ is object.__new__ and not hasattr(cls, "__setstate__"), name
    assert [f.name for f in dataclasses.fields(classes["fragment_address"])] == ["numel", "start"]


def test_real_checkpoints_pass(written):
    root, out = written
    for d in ("zero2", "zero3"):
        assert validate_deepspeed_dir(Path(root, d)) >= 2, d  # model states and optimizer states at least
    assert out["resumed"].endswith("step-00000001")
    # the native files' CRC-32 records went into metadata.json, with their place in the step folder
    assert f"deepspeed/{MODEL_STATES}" in out["records"]
    assert all(set(r) == {"size", "crc32"} for r in out["records"].values())


@pytest.mark.parametrize("raw", [False, True], ids=["torch_save", "bare_pickle"])
def test_planted_model_states_refused_in_one_line(written, tmp_path, raw):
    root, _ = written
    folder = tmp_path / "deepspeed"
    shutil.copytree(Path(root, "zero2"), folder)
    marker = tmp_path / "marker"
    _plant(folder / MODEL_STATES, marker, raw=raw)
    with pytest.raises(UnsafeCheckpointError) as err:
        validate_deepspeed_dir(folder)
    text = str(err.value)
    assert "\n" not in text and str(folder / MODEL_STATES) in text and "refused global io.open" in text, text
    # the universal conversion refuses it before its tool (which unpickles unrestricted) starts
    with pytest.raises(UnsafeCheckpointError, match="refused global io.open"):
        convert_deepspeed_to_universal(folder / "native", tmp_path / "universal")
    assert not (tmp_path / "universal").exists()
    assert not marker.exists()


def test_resume_refuses_planted_file(written):
    """Through CheckpointIO.resume: the changed file fails its recorded checksum; with the record rewritten
    too, the restricted load refuses it, naming the file in the step folder. Nothing ran."""
    root, out = written
    remote = f"{Path(root, 'run', 'checkpoints', 'step-00000001', 'deepspeed')}/{MODEL_STATES}"
    kind, text = out["planted"]
    assert kind == "CheckpointCorruptError" and "checksum mismatch" in text and remote in text, text
    kind, text = out["planted_and_recorded"]
    assert kind == "UnsafeCheckpointError" and "\n" not in text, text
    assert text.startswith(f"{remote}: ") and "refused global io.open" in text, text
    assert not out["marker_after_resume"] and not Path(root, "marker").exists()


def test_other_damage_is_one_line(tmp_path, written):
    root, _ = written
    folder = tmp_path / "deepspeed"
    shutil.copytree(Path(root, "zero2"), folder)
    (folder / MODEL_STATES).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointCorruptError) as err:
        validate_deepspeed_dir(folder)
    assert "\n" not in str(err.value) and MODEL_STATES in str(err.value)
    (folder / MODEL_STATES).unlink()
    os.symlink("/etc/hostname", folder / MODEL_STATES)
    with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
        validate_deepspeed_dir(folder)
