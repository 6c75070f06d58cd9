"""DINOv3 (multi-layer) latents against RAEv2's own numbers (fixture raev2/dinov3_mls_tiny).

Every size, layer list and resolution is read from the fixture files, so a regenerated fixture with
other sizes passes unchanged. The encoder is built through the config path (EncoderConfig ->
builders), once from the transformers folder and once from Meta's original .pth.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import FIXTURES
from rae_scale import config as C
from rae_scale.builders import build_frozen_encoder, build_rae

DIR = FIXTURES / "raev2" / "dinov3_mls_tiny"
PTH = DIR / "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"
TOL = 1e-5

pytestmark = pytest.mark.skipif(not DIR.exists(), reason=f"fixture {DIR} missing")


@pytest.fixture(scope="module")
def io():
    return torch.load(DIR / "io.pt", weights_only=False)


def _encoder_cfg(io, source: str, layers) -> C.EncoderConfig:
    hf = json.loads((DIR / "hf" / "config.json").read_text())
    return C.EncoderConfig(kind="dinov3", pretrained=str(DIR / "hf" if source == "hf" else PTH), layers=layers,
                           hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                           num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                           patch_size=hf["patch_size"], input_size=int(io["resolution"]))


def _as_map(tokens: torch.Tensor) -> torch.Tensor:
    b, n, c = tokens.shape
    side = int(round(n ** 0.5))
    return tokens.transpose(1, 2).reshape(b, c, side, side)


def _maxdiff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("source", ["hf", "pth"])
def test_multilayer_latents_equal_raev2(io, source):
    """K layers, K = 1, the bicubic-resize input and the stats-normalised latent, within 1e-5."""
    enc = build_frozen_encoder(_encoder_cfg(io, source, list(io["layers"])))
    assert enc.latent_shape == tuple(io["latent"].shape[1:])
    assert enc.layers == sorted(io["layers"])
    assert _maxdiff(enc.preprocess(io["x"]), io["preprocessed"]) < TOL
    assert _maxdiff(_as_map(enc(io["x"])), io["latent"]) < TOL
    assert _maxdiff(_as_map(enc(io["x_alt"])), io["latent_x_alt"]) < TOL  # other size: RAE's bicubic resize
    # the pieces: each selected block normalised, and the extra term (token-mean of the last one)
    assert _maxdiff(io["layer_outputs_normed"].mean(0) + io["final_mean"][:, None], io["latent_tokens"]) < TOL
    k1 = build_frozen_encoder(_encoder_cfg(io, source, None))  # plain last block, no extra mean term
    assert _maxdiff(_as_map(k1(io["x"])), io["latent_k1"]) < TOL
    last = _encoder_cfg(io, source, [k1.model.config.num_hidden_layers - 1])
    assert _maxdiff(_as_map(build_frozen_encoder(last)(io["x"])), io["latent_k1"]) < TOL


def test_normalised_latent_with_stats_pt_and_eval_mode_kept(io):
    """RAE.encode with RAEv2's stats.pt equals RAEv2's normalised latent; .train() leaves DINOv3 in eval
    mode (RAEv2's stage 1 would jitter RoPE positions: io['train_mode'] shows its two calls differ)."""
    cfg = C.RAEConfig(encoder=_encoder_cfg(io, "hf", list(io["layers"])), stats_path=str(DIR / "stats.pt"),
                      decoder=C.DecoderConfig(preset=None, hidden_size=16, num_layers=1, num_heads=2,
                                              intermediate_size=32, patch_size=16))
    rae = build_rae(cfg)
    rae.eval()
    z_eval = rae.encode(io["x"]).latent
    assert _maxdiff(z_eval, io["latent_normalized"]) < TOL
    stats = torch.load(DIR / "stats.pt", weights_only=True)
    manual = (io["latent"] - stats["mean"]) / torch.sqrt(stats["var"] + io["eps"])
    assert _maxdiff(z_eval, manual) < TOL
    assert io["train_mode"]["max_abs_diff_between_calls"] > 1e-3  # what RAEv2 does in training mode
    rae.train()
    assert rae.decoder.training
    assert not any(m.training for m in rae.encoder.modules())
    assert rae.noise_tau == 0.0
    assert torch.equal(rae.encode(io["x"]).latent, rae.encode(io["x"]).latent)
    assert _maxdiff(rae.encode(io["x"]).latent, z_eval) == 0.0


def test_bad_layers_and_checkpoints_are_one_line_errors(io, tmp_path):
    from rae_scale.interop.dinov3_original import DINOv3CheckpointError
    from rae_scale.models.encoders import build_encoder

    depth = json.loads((DIR / "hf" / "config.json").read_text())["num_hidden_layers"]
    with pytest.raises(ValueError, match=rf"unknown layer index {depth}; allowed: .*0\.\.{depth - 1}") as e:
        build_encoder("dinov3", pretrained=str(DIR / "hf"), input_size=int(io["resolution"]), layers=[0, depth])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="repeat"):
        build_encoder("dinov3", pretrained=str(DIR / "hf"), input_size=int(io["resolution"]), layers=[1, 1])
    with pytest.raises(ValueError, match="kind 'mae' has no multi-layer latent"):
        build_encoder("mae", hidden_size=32, num_layers=1, num_heads=2, patch_size=16, input_size=32, layers=[0])
    # the config says so before any weights are read
    with pytest.raises(C.ConfigError, match=rf"rae.encoder.layers.*unknown layer index {depth}") as e:
        C.load_config(C.Stage1Job, None, [f"rae.encoder.num_layers={depth}", "rae.encoder.kind=dinov3",
                                          f"rae.encoder.layers=[0,{depth}]"])
    assert "\n" not in str(e.value)

    sd = torch.load(PTH, weights_only=True)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(DINOv3CheckpointError, match=r"missing blocks\.1\.attn\.qkv\.weight") as e:
        build_frozen_encoder(C.EncoderConfig(**{**_encoder_cfg(io, "pth", None).__dict__,
                                                "pretrained": str(tmp_path / "missing.pth")}))
    assert "\n" not in str(e.value)
    nan_mask = dict(sd, **{"blocks.0.attn.qkv.bias_mask": torch.full_like(sd["blocks.0.attn.qkv.bias_mask"],
                                                                          float("nan"))})
    torch.save(nan_mask, tmp_path / "nan.pth")
    from rae_scale.interop.dinov3_original import load_dinov3_original

    with pytest.raises(DINOv3CheckpointError, match="bias_mask holds NaN"):
        load_dinov3_original(str(tmp_path / "nan.pth"))
    torch.save({"model": sd}, tmp_path / "nested.pth")
    with pytest.raises(DINOv3CheckpointError, match="flat dict of tensors"):
        load_dinov3_original(str(tmp_path / "nested.pth"))
    # the key bias really is masked: with the mask ignored the latent changes
    unmasked = {k: v for k, v in sd.items() if not k.endswith("bias_mask")}
    torch.save(unmasked, tmp_path / "unmasked.pth")
    enc = build_encoder("dinov3", model=load_dinov3_original(str(tmp_path / "unmasked.pth")),
                        input_size=int(io["resolution"]), layers=list(io["layers"]))
    assert enc.model.config.key_bias
    assert _maxdiff(_as_map(enc(io["x"])), io["latent"]) > 1e-4


@pytest.mark.parametrize("kind", ["dinov2", "siglip2"])
def test_dinov2_and_siglip2_multilayer_follow_hidden_states(kind):
    """The same `layers` code for DINOv2 (plain mean) and SigLIP2 (mean + token-mean of the deepest
    block), against transformers' own hidden_states[i + 1] through a non-affine LayerNorm."""
    from rae_scale.models.encoders import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(kind, hidden_size=32, num_layers=3, num_heads=2, patch_size=8, input_size=32,
                        intermediate_size=64, layers=[1, 0])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        px = enc.preprocess(x)
        kw = {"interpolate_pos_encoding": True} if kind == "siglip2" else {}
        hs = enc.model(pixel_values=px, output_hidden_states=True, **kw).hidden_states
    skip = 0 if kind == "siglip2" else 1 + enc.model.config.num_register_tokens
    eps = enc.model.config.layer_norm_eps
    normed = [torch.nn.functional.layer_norm(hs[i + 1], (32,), eps=eps)[:, skip:] for i in (0, 1)]
    expect = (normed[0] + normed[1]) / 2
    if kind == "siglip2":
        expect = expect + normed[1].mean(1, keepdim=True)
    assert enc.layers == [0, 1]
    assert _maxdiff(enc(x), expect) < TOL


def test_raev2_configs_derive_the_latent_from_the_encoder(tmp_path):
    """The shipped RAEv2 presets: [1024, 16, 16], shift dim 262144 and the decoder/DiT widths follow from
    rae.encoder; the tiny config's random DINOv3 folder (written as data/tiny does) builds that latent."""
    from conftest import REPO_ROOT
    from rae_scale.builders import save_random_encoder

    s1 = C.load_config(C.Stage1Job, REPO_ROOT / "configs/stage1/raev2_dinov3l_k7_256.yaml")
    s2 = C.load_config(C.Stage2Job, REPO_ROOT / "configs/stage2/raev2_dinov3l_k7_256.yaml")
    for job in (s1, s2):
        assert job.rae.encoder.kind == "dinov3" and job.rae.encoder.layers == [11, 13, 15, 17, 19, 21, 23]
        assert C.latent_shape(job.rae) == (1024, 16, 16) and job.rae.image_size == 256
    assert (s2.dit.in_channels, s2.dit.input_size, s2.transport.shift_dim) == (1024, 16, 262144)
    assert (s2.dit.model, s2.transport.prediction, s2.optimizer.kind, s2.guidance.method) == \
        ("dit_dh_ig", "x", "muon", "ig")
    assert (s1.training.ema_decay, s1.training.clip_grad, s1.schedule.kind, s1.schedule.warmup_from_zero) == \
        (0.9978, 0.0, "cosine", True)

    tiny = C.load_config(C.Stage1Job, REPO_ROOT / "configs/stage1/raev2_tiny_cpu.yaml",
                         [f"rae.encoder.pretrained={tmp_path / 'enc'}"])
    save_random_encoder(C.EncoderConfig(**{**tiny.rae.encoder.__dict__, "pretrained": None}), str(tmp_path / "enc"))
    rae = build_rae(tiny.rae)
    z = rae.encode(torch.rand(2, 3, tiny.rae.image_size, tiny.rae.image_size)).latent
    assert tuple(z.shape[1:]) == C.latent_shape(tiny.rae) and rae.decoder.latent_dim == tiny.rae.encoder.hidden_size
    assert rae.encoder.layers == tiny.rae.encoder.layers
