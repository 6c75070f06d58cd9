"""RAEv2's explicit REPA loss (dit.repa_depth, the `repa` section): the projector and its loss against
RAEv2's own numbers (shared/fixtures/raev2/repa.pt), the target encoder's preprocessing against RAEv2's,
the config rules, and one training step through the loop's pieces (strategy, transport, target encoder).

Every shape and setting of the golden test is read from the fixture, so it passes on fixture sets with other
shapes and seeds.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rae_scale import config as C
from rae_scale.builders import build_dit_model, build_frozen_encoder, save_random_encoder
from rae_scale.diffusion.transport import Transport, repa_loss
from rae_scale.train.stage2 import _predict, repa_targets

RTOL = 1e-5  # the brief: relative agreement with RAEv2's values
TINY = "configs/stage2/raev2_tiny_cpu.yaml"
# timm's IMAGENET_DEFAULT_MEAN / _STD, which RAEv2's DINOv2Encoder.preprocess normalises with
TIMM_IMAGENET_MEAN, TIMM_IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _fixture(fixtures_dir):
    return torch.load(fixtures_dir / "raev2" / "repa.pt", weights_only=False)


def _dit_config(params: dict) -> C.DiTConfig:
    """Our dit section for RAEv2's DiTwDDTHeadIG params (label conditioning)."""
    arch = params["cond_arch"]
    return C.DiTConfig(
        model="dit_dh_ig", preset=None, input_size=params["input_size"], patch_size=params["patch_size"][0],
        in_channels=params["in_channels"], hidden_size=list(params["hidden_size"]), depth=list(params["depth"]),
        num_heads=list(params["num_heads"]), mlp_ratio=params["mlp_ratio"], num_classes=params["num_classes"],
        num_t_tokens=arch["num_t_tokens"], num_c_tokens=arch["num_c_tokens"],
        base_model_depth=params["base_model_depth"], repa_depth=params["repa_layer_depth"], repa_dim=params["z_dim"])


def _close(got, want):
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-6)


@torch.no_grad()
def test_projector_outputs_and_repa_loss_match_raev2(fixtures_dir):
    fx = _fixture(fixtures_dir)
    assert fx["params"]["enable_repa"]
    model = build_dit_model(_dit_config(fx["params"]))  # through the config keys
    model.load_state_dict(fx["state_dict"], strict=True)  # RAEv2's parameter names, the projector's included
    model.eval()
    assert torch.equal(model.repa_projector.weight, fx["projector"]["weight"])
    i = fx["inputs"]
    (x_full, x_base), zt = model(i["xt"], i["t"], i["y"], return_intermediate=True)
    _close(zt, fx["zt_pred"])
    _close(x_full, fx["out"])
    _close(x_base, fx["out_ig_base"])
    # the default call is unchanged: (x_full, x_base), no projector output
    plain = model(i["xt"], i["t"], i["y"])
    assert torch.equal(plain[0], x_full) and torch.equal(plain[1], x_base)

    # the loss as the loop computes it: per-sample terms whose batch means are RAEv2's
    coeff = fx["repa_coeff"]
    transport = Transport(prediction="x")
    x_t, _ = transport.input_and_target(i["x1_data"], i["x0_noise"], i["t"])
    _close(x_t, i["xt"])
    parts = transport.loss_parts(lambda x, t: model(x, t, i["y"], return_intermediate=True), i["x1_data"], i["t"],
                                 i["x0_noise"], repa_target=i["z_clean"], repa_coeff=coeff)
    _close(coeff * parts.repa.mean(), fx["loss_repa"])
    _close((parts.full + parts.base).mean(), fx["loss_diffusion_mean"])
    _close(parts.base.mean(), fx["loss_base_mean"])
    _close(parts.total.mean(), fx["loss_diffusion_mean"] + fx["loss_repa"])  # RAEv2's trainer: loss + loss_repa
    _close(coeff * repa_loss(zt, i["z_clean"]).mean(), fx["loss_repa"])


def test_without_repa_the_model_has_no_projector(fixtures_dir):
    fx = _fixture(fixtures_dir)
    on = _dit_config(fx["params"])
    off = copy.deepcopy(on)
    off.repa_depth = off.repa_dim = None
    model_on, model_off = build_dit_model(on), build_dit_model(off)
    assert not hasattr(model_off, "repa_projector")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    body, z = on.hidden_size[0], on.repa_dim
    assert count(model_on) - count(model_off) == body * z + z
    sd = {k: v for k, v in fx["state_dict"].items() if not k.startswith("repa_projector.")}
    model_off.load_state_dict(sd, strict=True)
    i = fx["inputs"]
    with torch.no_grad():
        (x_full, _), zt = model_off.eval()(i["xt"], i["t"], i["y"], return_intermediate=True)
    assert zt is None
    _close(x_full, fx["out"])


def test_repa_loss_names_a_shape_mismatch():
    with pytest.raises(ValueError, match=r"REPA projector output shape \(2, 4, 3\) does not match the target "
                                         r"shape \(2, 4, 5\)"):
        repa_loss(torch.zeros(2, 4, 3), torch.zeros(2, 4, 5))


def _tiny_target_encoder(folder, hidden=32, patch=14, size=224):
    """A random DINOv2 (with registers) saved in the transformers format and loaded back as a run loads it."""
    enc = C.EncoderConfig(kind="dinov2", hidden_size=hidden, num_layers=1, num_heads=2, intermediate_size=2 * hidden,
                          patch_size=patch, input_size=size)
    enc.pretrained = save_random_encoder(enc, str(folder))
    return enc, build_frozen_encoder(enc, key="repa.encoder")


def _fp32_strategy():
    from rae_scale.parallel import build_strategy
    from rae_scale.parallel.dist import DistInfo

    one = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                   is_distributed=False)
    return build_strategy("ddp", dist=one)


@torch.no_grad()
def test_targets_follow_raev2_preprocessing(tmp_path):
    """RAEv2: images * 255 -> / 255 -> ImageNet mean/std -> bicubic (no antialias) to 224 -> the encoder's
    normed patch tokens (registers and CLS dropped). Ours resizes before standardising: the same map."""
    _, encoder = _tiny_target_encoder(tmp_path / "target")
    torch.manual_seed(0)
    images = torch.rand(2, 3, 256, 256)
    ours = repa_targets(encoder, images, _fp32_strategy())
    x = images * 255.0 / 255.0
    mean, std = torch.tensor(TIMM_IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(TIMM_IMAGENET_STD).view(1, 3, 1, 1)
    x = F.interpolate((x - mean) / std, 224, mode="bicubic")
    hidden = encoder.model(pixel_values=x).last_hidden_state  # final norm without affine, as RAEv2's
    theirs = hidden[:, 1 + encoder.model.config.num_register_tokens:]
    assert ours.shape == (2, (224 // 14) ** 2, 32) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-5)


def _tiny_repa_job(folder) -> C.Stage2Job:
    """configs/stage2/raev2_tiny_cpu.yaml with REPA on: the DiT's 8x8 patch grid, a 32-px target encoder with
    4-px patches (8x8 tokens of width 24)."""
    enc = ["repa.encoder.pretrained=null", "repa.encoder.hidden_size=24", "repa.encoder.num_layers=1",
           "repa.encoder.num_heads=2", "repa.encoder.intermediate_size=48", "repa.encoder.patch_size=4",
           "repa.encoder.input_size=32"]
    return C.load_config(C.Stage2Job, TINY, ["dit.repa_depth=1", "data.source=images", f"data.url={folder}", *enc])


def test_config_derives_repa_dim_and_round_trips(tmp_path):
    job = _tiny_repa_job(tmp_path)
    assert (job.dit.repa_depth, job.dit.repa_dim, job.repa.coeff) == (1, 24, 0.5)
    saved = tmp_path / "config.yaml"
    saved.write_text(C.to_yaml(job))
    assert C.load_config(C.Stage2Job, saved) == job
    # RAEv2's defaults: DINOv2-B with registers at 224 px
    default = C.Stage2Job().repa
    assert (default.encoder.kind, default.encoder.pretrained, default.encoder.hidden_size,
            default.encoder.patch_size, default.encoder.input_size) == (
        "dinov2", "facebook/dinov2-with-registers-base", 768, 14, 224)
    # a sample job builds the projector from the stated width
    sample = C.from_generator(C.SampleJob, job)
    C.resolve(sample)
    assert hasattr(build_dit_model(sample.dit), "repa_projector")


REPA_ON = ["dit.repa_depth=1", "data.source=images", "data.url=shards", "repa.encoder.pretrained=null",
           "repa.encoder.hidden_size=24", "repa.encoder.patch_size=4", "repa.encoder.input_size=32"]


@pytest.mark.parametrize("overrides,message", [
    (["dit.repa_depth=1"], r"'data.source'=latents with 'dit.repa_depth' set: .*cached REPA targets are not built"
                           r".*allowed with REPA: data.source=images"),
    (REPA_ON + ["repa.encoder.input_size=64"], r"the REPA target grid 16x16 .* must be the DiT's patch grid 8x8 .*"
                                               r"allowed: input_size 32"),
    (REPA_ON + ["repa.encoder.input_size=30"], r"'repa.encoder.input_size'=30 is not a multiple"),
    (REPA_ON + ["dit.repa_depth=3"], r"'dit.repa_depth'=3 is deeper than the body \(dit.depth\[0\]=2\); allowed: 1 ... 2"),
    (REPA_ON + ["dit.repa_dim=7"], r"'dit.repa_dim'=7 disagrees with the REPA target width 'repa.encoder.hidden_size'"),
    (REPA_ON + ["repa.coeff=-1"], r"'repa.coeff': bad value -1.*allowed: >= 0"),
    (["dit.repa_dim=7"], r"'dit.repa_dim'=7 without 'dit.repa_depth'.*allowed: null"),
    (["dit.repa_depth=0"], r"'dit.repa_depth': bad value 0"),
])
def test_bad_repa_settings_are_named(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(C.Stage2Job, TINY, overrides)


def test_repa_is_for_dit_dh_ig_and_sample_jobs_state_the_width():
    with pytest.raises(C.ConfigError, match=r"'dit.repa_depth'=1: the REPA projector is dit_dh_ig's .* allowed with "
                                            r"dit.model=dit_dh: null"):
        C.load_config(C.Stage2Job, "configs/stage2/tiny_cpu.yaml", ["dit.repa_depth=1"])
    job = C.load_config(C.Stage2Job, TINY)
    sample = C.from_generator(C.SampleJob, job)
    sample.dit.repa_depth = 1
    with pytest.raises(C.ConfigError, match=r"'dit.repa_dim' is null with 'dit.repa_depth'=1: .* allowed: its width"):
        C.resolve(sample)


def test_one_training_step_with_repa_trains_the_projector(tmp_path, one_rank):
    """The loop's pieces with REPA on: the target encoder (saved in the transformers format, loaded as a run
    loads it), the network wrapped by the strategy (DDP on one rank), the transport's loss with the REPA term
    and one optimizer step; then FSDP2 on one rank gives the plain model's outputs and projector gradient."""
    from rae_scale.optim import optimizer_factory
    from rae_scale.parallel import build_strategy
    from rae_scale.parallel.fsdp import apply_fsdp, build_mesh
    from rae_scale.train.tripwires import zero_prediction_loss

    job = _tiny_repa_job(tmp_path)
    e = job.repa.encoder
    enc, target_encoder = _tiny_target_encoder(tmp_path / "target", hidden=e.hidden_size, patch=e.patch_size,
                                               size=e.input_size)
    torch.manual_seed(0)
    model = build_dit_model(job.dit)
    plain = copy.deepcopy(model)
    strategy = build_strategy("ddp", dist=one_rank)
    net = strategy.wrap(model, blocks=model.transformer_blocks(), optimizer_factory=optimizer_factory(job.optimizer))
    transport = Transport.from_config(job.transport)
    c, h, w = C.latent_shape(job.rae)
    b = 4
    images, z = torch.rand(b, 3, 32, 32), torch.randn(b, c, h, w)
    t, eps, y = torch.rand(b), torch.randn(b, c, h, w), torch.arange(b) % job.dit.num_classes
    target = repa_targets(target_encoder, images, strategy)
    assert target.shape == (b, h * w, job.dit.repa_dim)

    parts = transport.loss_parts(_predict(strategy, net, y, intermediate=True), z, t, eps, target, job.repa.coeff)
    assert torch.isfinite(parts.total).all() and (parts.repa > 0).all()
    torch.testing.assert_close(parts.total, parts.full + parts.base + job.repa.coeff * parts.repa)
    strategy.backward(parts.total.mean())
    grad = model.repa_projector.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    before = model.repa_projector.weight.detach().clone()
    strategy.step()
    assert not torch.equal(model.repa_projector.weight, before)
    # the tripwire's baseline counts the REPA term of a zero projector output
    zero = zero_prediction_loss(transport, z, t, eps, two_heads=True, device=torch.device("cpu"))
    zero_repa = zero_prediction_loss(transport, z, t, eps, two_heads=True, device=torch.device("cpu"),
                                     repa_target=target, repa_coeff=job.repa.coeff)
    assert zero_repa == pytest.approx(zero + job.repa.coeff * target.double().pow(2).mean().item(), rel=1e-6)

    # under FSDP2 the projector is one more parameter of the root unit
    sharded = copy.deepcopy(plain)
    apply_fsdp(sharded, sharded.transformer_blocks(), build_mesh("cpu", 1))
    results = []
    for m in (plain, sharded):
        (x_full, x_base), zt = m(transport.interpolate(z, eps, t)[0], t, y, return_intermediate=True)
        (x_full.square().mean() + x_base.square().mean() + repa_loss(zt, target).mean()).backward()
        g = m.repa_projector.weight.grad
        results.append((zt.detach(), g.full_tensor() if hasattr(g, "full_tensor") else g))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
    assert enc.pretrained  # the target encoder was read back from its saved folder
