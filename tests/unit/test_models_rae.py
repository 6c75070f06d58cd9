"""ViT decoder and RAE: HF ViT-MAE parity, presets, unpatchify order, normalisation, noise augmentation."""
import pytest
import torch

from rae_scale.models import RAE, build_decoder, build_encoder


def encode_raw(rae: RAE, x: torch.Tensor) -> torch.Tensor:
    """The unnormalised, noise-free latent [B, C, h, w] that encode() normalises (and noises in training)."""
    return rae._tokens_to_map(rae.encoder(x))


def _tiny_decoder(latent_dim=32, num_patches=16, patch_size=4):
    return build_decoder(latent_dim=latent_dim, decoder_hidden_size=24, num_layers=2, num_heads=2,
                         intermediate_size=40, num_patches=num_patches, patch_size=patch_size)


def test_decoder_layer_matches_transformers_vit_mae():
    from transformers import ViTMAEConfig
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer

    torch.manual_seed(0)
    dec = _tiny_decoder()
    cfg = ViTMAEConfig(hidden_size=24, num_attention_heads=2, intermediate_size=40, layer_norm_eps=1e-12)
    cfg._attn_implementation = "eager"  # upstream's decoder runs HF's eager attention
    hf = ViTMAELayer(cfg).eval()
    hf.load_state_dict(dec.decoder_layers[0].state_dict())  # upstream == HF layer names
    h = torch.randn(2, 17, 24)
    ref = hf(h)
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert torch.allclose(dec.decoder_layers[0](h), ref, atol=1e-5)


def test_presets_parameter_counts_on_meta():
    with torch.device("meta"):
        xl = build_decoder("XL", latent_dim=768)
    n = sum(p.numel() for p in xl.parameters() if p.requires_grad)
    print(f"decoder XL trainable parameters: {n / 1e6:.2f} M")
    assert abs(n - 415.1e6) / 415.1e6 < 1e-3
    assert len(xl.decoder_layers) == 28 and xl.image_size == 256
    with torch.device("meta"):
        b = build_decoder("B", latent_dim=768)
        b512 = build_decoder("B", latent_dim=768, patch_size=32)  # 512-px output from 16x16 latents
    assert abs(sum(p.numel() for p in b.parameters() if p.requires_grad) - 86.2e6) < 0.1e6
    assert b512.image_size == 512 and b512.decoder_pred.out_features == 32 * 32 * 3
    with pytest.raises(ValueError, match="allowed"):
        build_decoder("XXL", latent_dim=8)


def test_upstream_parameter_names():
    keys = set(_tiny_decoder().state_dict())
    for k in ["decoder_embed.weight", "decoder_pos_embed", "trainable_cls_token", "decoder_norm.bias",
              "decoder_pred.weight", "decoder_layers.1.attention.attention.query.weight",
              "decoder_layers.1.attention.output.dense.bias", "decoder_layers.0.intermediate.dense.weight",
              "decoder_layers.0.output.dense.weight", "decoder_layers.0.layernorm_before.weight",
              "decoder_layers.0.layernorm_after.bias"]:
        assert k in keys


def test_unpatchify_order():
    dec = _tiny_decoder(num_patches=4, patch_size=2)
    # token n = row * 2 + col; value index = (py * 2 + px) * 3 + channel
    tok = torch.arange(4 * 12, dtype=torch.float32).view(1, 4, 12)
    img = dec.unpatchify(tok)
    n, py, px, ch = 3, 1, 0, 2  # token (1, 1), pixel row 1 col 0 within the patch, blue
    assert img[0, ch, 2 * 1 + py, 2 * 1 + px] == tok[0, n, (py * 2 + px) * 3 + ch]


def _tiny_rae(**kw):
    torch.manual_seed(0)
    enc = build_encoder("dinov2", hidden_size=32, num_layers=1, num_heads=2, patch_size=4, input_size=16,
                        intermediate_size=64)
    return RAE(enc, _tiny_decoder(latent_dim=32, num_patches=16, patch_size=4), **kw)


def test_normalisation_and_decode_destandardise():
    mean, var = torch.randn(32, 4, 4), torch.rand(32, 4, 4) + 0.1
    rae = _tiny_rae(latent_mean=mean, latent_var=var).eval()
    x = torch.rand(2, 3, 16, 16)
    raw = encode_raw(rae, x)
    z = rae.encode(x).latent
    assert torch.allclose(z, (raw - mean) / torch.sqrt(var + 1e-5), atol=1e-6)
    assert torch.allclose(rae.denormalize(rae.normalize(raw)), raw, atol=1e-5)
    # decode = decoder pixels * encoder std + encoder mean
    pixels = rae.decoder.unpatchify(rae.decoder(raw.flatten(2).transpose(1, 2)))
    expect = pixels * rae.encoder.image_std + rae.encoder.image_mean
    assert torch.allclose(rae.decode(z).sample, expect, atol=1e-5)
    # variance-only stats (released DINOv2-B) and a checkpoint with stats into a bare RAE
    bare = _tiny_rae()
    bare.load_state_dict(rae.state_dict())
    assert torch.allclose(bare.encode(x).latent, z, atol=1e-6)
    rae.set_latent_stats(None, var)
    assert torch.allclose(rae.encode(x).latent, raw / torch.sqrt(var + 1e-5), atol=1e-6)


def test_decoding_only_rae_decodes_as_the_whole_one(tmp_path):
    """build_rae(with_encoder=False) (stage 2 on a cache, sampling) reads no encoder weights, yet decodes
    exactly as the RAE with its encoder: same decoder, same pixel statistics (the kind's defaults, or the
    folder's preprocessor_config.json), same latent shape; encoding is refused with a clear error."""
    import json

    from rae_scale import config as C
    from rae_scale.builders import build_rae, save_random_encoder

    enc = C.EncoderConfig(kind="dinov2", hidden_size=32, num_layers=1, num_heads=2, patch_size=4, input_size=16)
    cfg = C.RAEConfig(encoder=C.EncoderConfig(**{**vars(enc), "pretrained": save_random_encoder(enc, str(tmp_path / "e"))}),
                      decoder=C.DecoderConfig(preset=None, hidden_size=32, num_layers=1, num_heads=2,
                                                intermediate_size=64, patch_size=4))
    z = torch.randn(2, 32, 4, 4)
    for stats in (None, ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])):
        if stats:
            (tmp_path / "e" / "preprocessor_config.json").write_text(json.dumps({"image_mean": stats[0],
                                                                                 "image_std": stats[1]}))
        whole, only = build_rae(cfg).eval(), build_rae(cfg, with_encoder=False).eval()
        only.decoder.load_state_dict(whole.decoder.state_dict())  # a trained decoder, as rae.decoder_checkpoint
        assert only.encoder is None and only.latent_shape == whole.latent_shape == (32, 4, 4)
        assert torch.equal(only.image_mean, whole.encoder.image_mean)
        assert torch.equal(only.decode(z).sample, whole.decode(z).sample)
    assert torch.allclose(only.image_std.flatten(), torch.tensor(stats[1]))
    with pytest.raises(RuntimeError, match="without its encoder"):
        only.encode(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("with_mean", [True, False])
def test_cached_latents_normalised_as_encode_does(tmp_path, with_mean):
    """Stage 2 reads raw cached latents: latent_normalizer(stats file) must land where RAE.encode does,
    which is the space rae.decode (sampling) expects."""
    from rae_scale import config as C
    from rae_scale.builders import latent_normalizer
    from rae_scale.data.latents import save_stats

    mean, var = torch.randn(32, 4, 4) * 3, torch.rand(32, 4, 4) * 2 + 0.01
    stats = tmp_path / "stats.safetensors"
    if with_mean:
        save_stats(str(stats), mean.double(), var.double(), count=10)
    else:  # upstream DINOv2-B layout: variance only
        torch.save({"var": var}, stats.with_suffix(".pt"))
        stats = stats.with_suffix(".pt")
    rae = _tiny_rae(latent_mean=mean if with_mean else None, latent_var=var).eval()
    x = torch.rand(4, 3, 16, 16)
    normalize = latent_normalizer(C.RAEConfig(stats_path=str(stats)))
    assert torch.allclose(normalize(encode_raw(rae, x)), rae.encode(x).latent, atol=1e-6)
    assert latent_normalizer(C.RAEConfig(stats_path=None))(x) is x
    # statistics on object storage (any fsspec URL) load the same way
    if with_mean:
        save_stats("memory://stats-test/stats.safetensors", mean.double(), var.double(), count=10)
        remote = latent_normalizer(C.RAEConfig(stats_path="memory://stats-test/stats.safetensors"))
        assert torch.allclose(remote(encode_raw(rae, x)), rae.encode(x).latent, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="rae-scale stats"):
        latent_normalizer(C.RAEConfig(stats_path=str(tmp_path / "missing.safetensors")))


def test_noise_augmentation_only_in_training():
    rae = _tiny_rae(noise_tau=0.8)
    x = torch.rand(64, 3, 16, 16)
    raw = encode_raw(rae, x)
    rae.eval()
    assert torch.equal(rae.encode(x).latent, raw)
    rae.train()
    assert not rae.encoder.training
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = rae.encode(x, generator=g1).latent, rae.encode(x, generator=g2).latent
    assert torch.equal(a, b)  # reproducible with a generator
    sigma = (a - raw).flatten(1).std(dim=1)  # per-sample sigma = tau * U(0, 1)
    assert sigma.max() <= 0.8 * 1.1 and sigma.min() >= 0
    assert abs(sigma.mean().item() - 0.4) < 0.1
    assert rae(x, generator=g1).shape == (64, 3, 16, 16)
