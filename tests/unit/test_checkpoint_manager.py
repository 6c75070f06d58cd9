"""CheckpointManager in one process: round trip, RNG, commit marker, fallback, retention, async."""
from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import pytest
import torch

from rae_scale.checkpoint import (CheckpointLoadError, CheckpointManager, CheckpointSaveError,
                                  ModelOptimizerState, PerRank)


def _model_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


class Loader:
    """A stand-in for a stateful data loader: a position counter."""

    def __init__(self):
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def _app(model, opt, loader, extra=None):
    app = {"train": ModelOptimizerState(model, opt), "loader": PerRank(loader)}
    if extra is not None:
        app["extra"] = extra
    return app


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_model_optimizer_rng_loader(tmp_path, async_save):
    model, opt = _model_opt()
    _train(model, opt, 3)
    loader = Loader()
    loader.pos = 15
    mgr = CheckpointManager(tmp_path / "run", keep_last=2, async_save=async_save)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    mgr.save(3, _app(model, opt, loader, extra={"note": "plain"}), metadata={"epoch": 1, "config": {"lr": 1e-2}})
    expected_rng = (random.random(), np.random.rand(), torch.rand(1).item())
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = {k: v["exp_avg"].clone() for k, v in opt.state_dict()["state"].items()}
    # the continuation of the uninterrupted run
    ref_loss = _train(model, opt, 2, seed=9)
    mgr.wait()

    model2, opt2 = _model_opt(seed=123)
    loader2 = Loader()
    app2 = _app(model2, opt2, loader2, extra=None)
    app2["extra"] = None
    step_dir = mgr.resolve_resume("auto")
    assert step_dir.endswith("checkpoints/step-00000003")
    meta = mgr.load(step_dir, app2)
    assert meta["step"] == 3 and meta["epoch"] == 1 and meta["config"] == {"lr": 1e-2}
    assert meta["world_size"] == 1 and meta["code_version"]
    assert app2["extra"] == {"note": "plain"} and loader2.pos == 15
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved[k]), k
    for k, v in opt2.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], saved_opt[k])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_rng
    # resumed training continues bitwise like the uninterrupted run
    assert _train(model2, opt2, 2, seed=9) == ref_loss
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_async_save_snapshots_state_at_call(tmp_path):
    model, opt = _model_opt()
    mgr = CheckpointManager(tmp_path / "run", async_save=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mgr.save(1, {"train": ModelOptimizerState(model, opt)})
    with torch.no_grad():  # in-place update right after save() returned, before the write ends
        for p in model.parameters():
            p.add_(1.0)
    mgr.wait()
    model2, opt2 = _model_opt(seed=4)
    mgr.load(mgr.step_url(1), {"train": ModelOptimizerState(model2, opt2)})
    for k, v in model2.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layout_and_commit_marker_last(tmp_path):
    model, _ = _model_opt()
    mgr = CheckpointManager(tmp_path / "run", async_save=False)
    mgr.save(12, {"m": ModelOptimizerState(model)}, metadata={"epoch": 0})
    d = tmp_path / "run" / "checkpoints" / "step-00000012"
    names = set(os.listdir(d))
    assert {"COMMITTED", "metadata.json", "rank_0.pt", "dcp"} <= names
    assert ".metadata" in os.listdir(d / "dcp")
    assert json.loads((d / "metadata.json").read_text())["step"] == 12
    # the marker is the newest file of the folder
    newest = max((d / n for n in names if n != "dcp"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == "COMMITTED"


def test_uncommitted_folder_is_ignored_and_collected(tmp_path):
    model, _ = _model_opt()
    mgr = CheckpointManager(tmp_path / "run", async_save=False)
    mgr.save(1, {"m": ModelOptimizerState(model)})
    mgr.save(2, {"m": ModelOptimizerState(model)})
    os.remove(tmp_path / "run/checkpoints/step-00000002/COMMITTED")  # as if killed before commit
    assert mgr.resolve_resume("auto").endswith("step-00000001")
    with pytest.raises(ValueError, match="not a committed checkpoint"):
        mgr.resolve_resume(str(tmp_path / "run/checkpoints/step-00000002"))
    mgr.save(3, {"m": ModelOptimizerState(model)})  # rank 0 garbage-collects the leftover
    assert sorted(os.listdir(tmp_path / "run/checkpoints")) == ["step-00000001", "step-00000003"]


def test_resume_modes(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", async_save=False)
    assert mgr.resolve_resume("auto") is None
    assert mgr.resolve_resume("never") is None
    with pytest.raises(ValueError, match="'auto', 'never'"):
        mgr.resolve_resume("")
    model, _ = _model_opt()
    mgr.save(4, {"m": ModelOptimizerState(model)})
    assert mgr.resolve_resume("never") is None
    url = "file://" + str(tmp_path / "run/checkpoints/step-00000004")
    assert mgr.resolve_resume(url) == url


def test_corrupt_newest_falls_back_with_warning(tmp_path, caplog):
    model, opt = _model_opt()
    mgr = CheckpointManager(tmp_path / "run", keep_last=None, async_save=False)
    mgr.save(1, {"train": ModelOptimizerState(model, opt)})
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, 2)
    mgr.save(2, {"train": ModelOptimizerState(model, opt)})
    shard = tmp_path / "run/checkpoints/step-00000002/dcp/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated shard

    model2, opt2 = _model_opt(seed=3)
    step_dir = mgr.resolve_resume("auto")
    assert step_dir.endswith("step-00000002")
    with caplog.at_level(logging.WARNING, logger="rae_scale.checkpoint.manager"):
        meta = mgr.load(step_dir, {"train": ModelOptimizerState(model2, opt2)})
    assert meta["step"] == 1
    assert any("falling back" in r.message for r in caplog.records)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, good[k])
    # the corrupt one no longer counts as committed
    assert mgr.committed_steps() == [1]
    assert (tmp_path / "run/checkpoints/step-00000002/CORRUPT").exists()


def test_nothing_loadable_raises_and_marks_nothing(tmp_path):
    model, _ = _model_opt()
    mgr = CheckpointManager(tmp_path / "run", async_save=False)
    mgr.save(1, {"m": ModelOptimizerState(model)})
    mgr.save(2, {"m": ModelOptimizerState(model)})
    with pytest.raises(CheckpointLoadError, match="step-00000001"):  # a key the files lack
        mgr.load(mgr.step_url(2), {"m": ModelOptimizerState(model), "missing": PerRank(Loader())})
    assert mgr.committed_steps() == [1, 2]


def test_retention_keep_last_every_and_pinned(tmp_path):
    model, _ = _model_opt()
    mgr = CheckpointManager(tmp_path / "run", keep_last=2, keep_every=4, async_save=False)
    for step in range(1, 10):
        mgr.save(step, {"m": ModelOptimizerState(model)}, pin=(step == 3))
    assert mgr.committed_steps() == [3, 4, 8, 9]
    mgr.pin(9, reason="best FID")
    mgr.unpin(3)
    mgr.save(10, {"m": ModelOptimizerState(model)})
    assert mgr.committed_steps() == [4, 8, 9, 10]
    with pytest.raises(ValueError, match="cannot pin step 5"):
        mgr.pin(5)


def test_save_existing_committed_step_is_skipped(tmp_path, caplog):
    model, _ = _model_opt()
    mgr = CheckpointManager(tmp_path / "run", async_save=False)
    mgr.save(1, {"m": ModelOptimizerState(model)})
    with caplog.at_level(logging.WARNING):
        mgr.save(1, {"m": ModelOptimizerState(model)})
    assert any("already has a committed" in r.message for r in caplog.records)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="keep_every"):
        CheckpointManager(tmp_path, keep_every=-3)
    mgr = CheckpointManager(tmp_path, async_save=False)
    with pytest.raises(ValueError, match="non-negative int"):
        mgr.save(-1, {})
    with pytest.raises(ValueError, match="disagree"):
        CheckpointManager(tmp_path, rank=1, world_size=2)


class _FlakyState:
    """A Stateful whose state dict makes the first `fail` writes raise (like a storage error)."""

    def __init__(self, fail):
        self.fail = fail
        self.w = torch.arange(6.0)

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, s):
        self.w = s["w"]


def test_async_failures_are_retried_then_surfaced(tmp_path, monkeypatch):
    import rae_scale.checkpoint.manager as manager_mod

    calls = {"n": 0}
    real_save = manager_mod.dcp.save

    def flaky_save(*a, **k):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError("simulated storage outage")
        return real_save(*a, **k)

    monkeypatch.setattr(manager_mod.dcp, "save", flaky_save)
    mgr = CheckpointManager(tmp_path / "run", async_save=True, max_attempts=3, retry_backoff_s=0.01)
    state = _FlakyState(0)
    mgr.save(1, {"s": state})
    mgr.wait()  # two failures, third attempt succeeds
    assert calls["n"] == 3 and mgr.committed_steps() == [1]

    def always_fail(*a, **k):
        raise OSError("storage gone")

    monkeypatch.setattr(manager_mod.dcp, "save", always_fail)
    mgr.save(2, {"s": state})  # returns: the failure happens in the background
    with pytest.raises(CheckpointSaveError, match="step 2"):
        mgr.save(3, {"s": state})  # ... and is raised by the next save()
    mgr.wait()  # reported once; save 3 was not started
    assert mgr.committed_steps() == [1]
    mgr.save(4, {"s": state})
    with pytest.raises(CheckpointSaveError, match="storage gone"):
        mgr.wait()


def test_layout_names_and_finds_step_folders(tmp_path):
    from rae_scale.checkpoint import layout
    from rae_scale.checkpoint.storage import Storage

    assert layout.step_dir_name(12) == "step-00000012"
    assert layout.parse_step("s3://b/run/checkpoints/step-00000012/") == 12
    assert layout.parse_step("step-12") is None and layout.parse_step("samples") is None
    model, _ = _model_opt()
    run = str(tmp_path / "run")
    mgr = CheckpointManager(run, async_save=False)
    for step in (1, 2):
        mgr.save(step, {"m": ModelOptimizerState(model)}, metadata={"job": "test"}, pin=step == 1)
    os.remove(os.path.join(mgr.step_url(2), layout.COMMIT_FILE))
    store = Storage(run)
    assert layout.committed_steps(store, run) == [1] and layout.step_folders(store, run) == [1, 2]
    assert layout.pinned_steps(store, run) == [1]
    assert layout.is_run_or_step(run) and layout.is_run_or_step(mgr.step_url(1))
    assert not layout.is_run_or_step(str(tmp_path))
    assert layout.resolve_step_folder(run) == mgr.step_url(1) == layout.step_url(run, 1)
    assert layout.resolve_step_folder(mgr.step_url(2)) == mgr.step_url(2)  # a step folder stays as it is
    os.makedirs(tmp_path / "fresh" / layout.CHECKPOINTS_DIR)
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        layout.resolve_step_folder(str(tmp_path / "fresh"))
    assert mgr.read_metadata(mgr.step_url(1))["job"] == "test"
    assert mgr.read_metadata(mgr.step_url(1)) == layout.read_metadata(store, mgr.step_url(1))
