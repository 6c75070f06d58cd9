"""Upstream RAE formats: stage-2 targets, checkpoint entries, decoder files, statistics, key checks."""
import pickle

import pytest
import torch

from rae_scale.data.latents import load_stats
from rae_scale.interop import (
    CheckpointMismatchError,
    check_state_dict,
    load_checked,
    load_stage2_checkpoint,
    load_upstream_decoder,
    save_upstream_stats,
)
from rae_scale.models import build_decoder
from upstream_models import build_stage2_from_upstream


@pytest.fixture
def dit_dh_fixture(fixtures_dir):
    return torch.load(fixtures_dir / "dit_dh_tiny.pt", weights_only=False)


def test_stage2_checkpoint_entries(tmp_path, dit_dh_fixture):
    fx = dit_dh_fixture
    sd = fx["state_dict"]
    shifted = {k: v + 1 for k, v in sd.items()}
    # upstream training checkpoint: ema wins over model
    torch.save({"model": shifted, "ema": sd, "step": 3}, tmp_path / "full.pt")
    # a DDP/compile-wrapped raw state dict
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "raw.pt")
    torch.save({"model": sd}, tmp_path / "model_only.pt")
    fw = fx["forward"]
    for name in ("full.pt", "raw.pt", "model_only.pt"):
        model = build_stage2_from_upstream(fx["upstream_class"], fx["upstream_params"])
        load_checked(model, load_stage2_checkpoint(tmp_path / name))
        with torch.no_grad():
            out = model.eval()(fw["x"], fw["t"], fw["y"])
        assert (out - fw["out"]).abs().max() / fw["out"].abs().max() < 1e-5, name


def test_mismatched_checkpoint_error_lists_keys_and_config(dit_dh_fixture):
    fx = dit_dh_fixture
    params = {**fx["upstream_params"], "hidden_size": [32, 64], "num_heads": [2, 4]}
    model = build_stage2_from_upstream(fx["upstream_class"], params)
    sd = dict(fx["state_dict"])
    sd.pop("final_layer.linear.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as info:
        check_state_dict(model, sd, config=params)
    msg = str(info.value)
    assert "1 missing keys [final_layer.linear.bias]" in msg
    assert "1 unexpected keys [extra.weight]" in msg
    assert "pos_embed: checkpoint (1, 16, 48) vs model (1, 16, 32)" in msg
    assert "more)" in msg  # long lists are cut to the first few
    assert "'hidden_size': [32, 64]" in msg
    with pytest.raises(CheckpointMismatchError):
        load_checked(model, sd, config=params)


def test_upstream_decoder_files(tmp_path):
    torch.manual_seed(0)
    dec = build_decoder(latent_dim=16, decoder_hidden_size=32, num_layers=2, num_heads=2,
                        intermediate_size=64, num_patches=4, patch_size=4)
    sd = dec.state_dict()
    # released decoder: a plain state dict
    torch.save(sd, tmp_path / "model.pt")
    # training checkpoint of the whole RAE: encoder + decoder keys, model and ema entries
    ema = {f"decoder.{k}": v * 2 for k, v in sd.items()}
    full = {"model": {**{f"decoder.{k}": v for k, v in sd.items()}, "encoder.w": torch.ones(1)}, "ema": ema}
    torch.save(full, tmp_path / "ep-0000001.pt")
    plain = load_upstream_decoder(tmp_path / "model.pt")
    assert plain.keys() == sd.keys() and all(torch.equal(plain[k], sd[k]) for k in sd)
    from_ema = load_upstream_decoder(tmp_path / "ep-0000001.pt")
    assert torch.equal(from_ema["decoder_embed.weight"], sd["decoder_embed.weight"] * 2)
    from_model = load_upstream_decoder(tmp_path / "ep-0000001.pt", prefer="model")
    assert from_model.keys() == sd.keys()
    fresh = build_decoder(latent_dim=16, decoder_hidden_size=32, num_layers=2, num_heads=2,
                          intermediate_size=64, num_patches=4, patch_size=4)
    load_checked(fresh, from_model)
    tokens = torch.randn(2, 4, 16)
    assert torch.equal(fresh(tokens), dec(tokens))


def test_stats_round_trip(tmp_path):
    """What convert writes in upstream's format, the training's statistics reader reads back."""
    var = torch.rand(8, 2, 2) + 0.5
    save_upstream_stats(tmp_path / "stat.pt", None, var)  # released DINOv2-B stats: var only
    mean, var2 = load_stats(str(tmp_path / "stat.pt"))
    assert mean is None and torch.equal(var2, var)
    assert set(torch.load(tmp_path / "stat.pt", weights_only=True)) == {"var"}
    m = torch.randn(8, 2, 2)
    save_upstream_stats(tmp_path / "both.pt", m, var)
    m2, v2 = load_stats(str(tmp_path / "both.pt"))
    assert torch.equal(m2, m) and torch.equal(v2, var)
    with pytest.raises(ValueError, match="mean"):
        save_upstream_stats(tmp_path / "none.pt", None, None)


class _Payload:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_files_cannot_run_code(tmp_path):
    torch.save({"ema": _Payload()}, tmp_path / "evil.pt")
    torch.save({"mean": _Payload()}, tmp_path / "evil_stats.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_stage2_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_stats(str(tmp_path / "evil_stats.pt"))
    with pytest.raises(pickle.UnpicklingError):
        load_upstream_decoder(tmp_path / "evil.pt")
