"""Export: consolidate a DCP checkpoint, EMA-only extraction, safetensors fp32/bf16."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rae_scale.checkpoint import (CheckpointManager, ModelOptimizerState, consolidate,
                                  export_safetensors, extract_ema, extract_state)


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.fixture
def saved(tmp_path):
    model, ema = _net(0), _net(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    mgr = CheckpointManager("file://" + str(tmp_path / "run"), async_save=False)
    mgr.save(7, {"train": ModelOptimizerState(model, opt), "ema": ModelOptimizerState(ema)})
    return mgr.step_url(7), model, ema, opt


def test_consolidate_and_extract_ema(saved):
    step_dir, model, ema, opt = saved
    full = consolidate(step_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(full["train"]["model"][k], v)
    ema_sd = extract_ema(full)
    assert ema_sd.keys() == ema.state_dict().keys()
    for k, v in ema.state_dict().items():
        assert torch.equal(ema_sd[k], v)
    momentum = extract_state(full, "train.optim.state")["0.weight"]["momentum_buffer"]
    assert torch.equal(momentum, opt.state[model[0].weight]["momentum_buffer"])
    with pytest.raises(KeyError, match="'train.nope'"):
        extract_state(full, "train.nope")


@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_export_safetensors(saved, tmp_path, dtype, torch_dtype):
    step_dir, _, ema, _ = saved
    out = export_safetensors(extract_ema(consolidate(step_dir)), "file://" + str(tmp_path / "ema.safetensors"),
                             dtype=dtype, metadata={"step": 7})
    assert out.endswith("ema.safetensors")
    loaded = load_file(str(tmp_path / "ema.safetensors"))
    assert loaded.keys() == ema.state_dict().keys()
    for k, v in ema.state_dict().items():
        assert loaded[k].dtype == torch_dtype
        assert torch.equal(loaded[k], v.to(torch_dtype))


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_safetensors({"w": torch.ones(2)}, tmp_path / "x.safetensors", dtype="fp8")
    with pytest.raises(TypeError, match="'meta.step' is a int"):
        export_safetensors({"w": torch.ones(2), "meta": {"step": 3}}, tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="no DCP checkpoint"):
        consolidate(tmp_path)
