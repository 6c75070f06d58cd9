"""diffusers AutoencoderRAE folders: golden latents/reconstructions, save back, load with diffusers."""
import contextlib
import json

import pytest
import torch

from rae_scale.interop import load_diffusers_autoencoder, save_diffusers_autoencoder
from rae_scale.models import RAE, build_decoder, build_encoder


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def golden(request):
    from conftest import FIXTURES

    folder = FIXTURES / "diffusers_rae_tiny"
    return folder, torch.load(folder / "io.pt", weights_only=False)


def _check_outputs(model, io):
    with torch.no_grad():
        z = model.encode(io["x"]).latent
        recon = model.decode(z).sample
        z48 = model.encode(io["x48"]).latent
    assert _rel(z, io["latent"]) < 1e-5
    assert _rel(recon, io["recon"]) < 1e-5
    assert _rel(z48, io["latent48"]) < 1e-5  # exercises the bicubic resize 48 -> 32 px


def test_load_matches_golden(golden):
    folder, io = golden
    rae = load_diffusers_autoencoder(folder).eval()
    assert rae.latent_shape == (64, 8, 8)
    _check_outputs(rae, io)


def _diffusers_from_pretrained(folder):
    diffusers = pytest.importorskip("diffusers")
    import diffusers.models.modeling_utils as mu

    # diffusers 0.38's no_init_weights turns torch.nn.init.* into functions returning None,
    # which transformers 4.x's DINOv2 init then dereferences; construct with init enabled.
    mu_ctx = mu.no_init_weights
    mu.no_init_weights = contextlib.nullcontext
    try:
        return diffusers.AutoencoderRAE.from_pretrained(str(folder)).eval()
    finally:
        mu.no_init_weights = mu_ctx


def test_save_back_loads_in_diffusers_with_same_outputs(golden, tmp_path):
    folder, io = golden
    rae = load_diffusers_autoencoder(folder).eval()
    save_diffusers_autoencoder(rae, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderRAE" and config["encoder_type"] == "dinov2"
    _check_outputs(load_diffusers_autoencoder(tmp_path / "out").eval(), io)
    _check_outputs(_diffusers_from_pretrained(tmp_path / "out"), io)


def test_round_trip_without_stats_and_unrepresentable_encoder(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("mae", hidden_size=64, num_layers=1, num_heads=1, patch_size=16,
                        input_size=32, intermediate_size=3072)
    dec = build_decoder(latent_dim=64, decoder_hidden_size=32, num_layers=1, num_heads=2,
                        intermediate_size=64, num_patches=4, patch_size=8)
    dec.decoder_pos_embed.data.copy_(  # diffusers recomputes positions scaled by 16 / grid
        build_decoder(latent_dim=64, decoder_hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      num_patches=4, patch_size=8, pos_base_size=16).decoder_pos_embed)
    rae = RAE(enc, dec).eval()
    save_diffusers_autoencoder(rae, tmp_path / "mae")
    back = load_diffusers_autoencoder(tmp_path / "mae").eval()
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        assert _rel(back.encode(x).latent, rae.encode(x).latent) < 1e-5
        z = rae.encode(x).latent
        assert _rel(back.decode(z).sample, rae.decode(z).sample) < 1e-5
        ref = _diffusers_from_pretrained(tmp_path / "mae")
        assert _rel(ref.decode(ref.encode(x).latent).sample, rae(x)) < 1e-5
    bad = RAE(build_encoder("mae", hidden_size=64, num_layers=1, num_heads=2, patch_size=16, input_size=32,
                            intermediate_size=3072), dec)
    with pytest.raises(ValueError, match="num_attention_heads=2"):
        save_diffusers_autoencoder(bad, tmp_path / "bad")
    with pytest.raises(ValueError, match="position table"):
        save_diffusers_autoencoder(RAE(enc, build_decoder(latent_dim=64, decoder_hidden_size=32, num_layers=1,
                                                          num_heads=2, intermediate_size=64, num_patches=4,
                                                          patch_size=8)), tmp_path / "bad2")
