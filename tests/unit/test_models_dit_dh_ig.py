"""RAEv2's DiT^DH-IG (`dit_dh_ig`): golden outputs from RAEv2's own code, text masks, REPA, the XL
parameter count, FSDP2 / activation checkpointing, and the errors for bad input.

Every shape and setting is read from the fixture files (shared/fixtures/raev2/), so the same tests
pass on fixture sets with other shapes and seeds.
"""
from __future__ import annotations

import copy

import pytest
import torch

from rae_scale.interop.upstream import build_stage2_from_upstream
from rae_scale.models.dit import build_dit
from rae_scale.models.dit_dh_ig import InContextDiTDH, InContextDiTDHIG

ATOL = 1e-5  # the fixture README's suggestion for DiT values (absolute)


def _fixture(fixtures_dir, name):
    return torch.load(fixtures_dir / "raev2" / name, weights_only=False)


def _loaded(fx) -> InContextDiTDHIG:
    model = build_stage2_from_upstream(fx["class_path"], fx["params"])
    fresh = model.state_dict()
    for key in ("enc_rope.freqs_cos", "enc_rope.freqs_sin", "dec_rope.freqs_cos", "dec_rope.freqs_sin"):
        # the RoPE tables we build are RAEv2's (the fixture stores them: they are persistent buffers)
        torch.testing.assert_close(fresh[key], fx["state_dict"][key], rtol=0, atol=1e-6, msg=key)
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval()


def _cond(fx, inputs):
    """Our condition argument for a fixture's RAEv2 call (context=..., attn_mask=...)."""
    if fx["params"]["condition_type"] == "label":
        return inputs["y"]
    return inputs["context"], inputs["attn_mask"]


def _close(got, want):
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@torch.no_grad()
def test_label_conditioned_outputs_match_raev2(fixtures_dir):
    fx = _fixture(fixtures_dir, "dit_dh_ig_label.pt")
    model = _loaded(fx)
    inputs = fx["inputs"]
    x_full, x_base = model(inputs["x"], inputs["t"], inputs["y"])
    _close(x_full, fx["out"])
    _close(x_base, fx["out_ig_base"])
    # without REPA the intermediate is None (RAEv2 crashes here at depth >= repa_layer_depth)
    (again, _), zt = model(inputs["x"], inputs["t"], inputs["y"], return_intermediate=True)
    assert zt is None and fx["intermediate"] is None
    assert torch.equal(again, x_full)


@torch.no_grad()
def test_text_conditioned_outputs_mask_and_encoder_tokens_match_raev2(fixtures_dir):
    fx = _fixture(fixtures_dir, "dit_dh_ig_text.pt")
    model = _loaded(fx)
    inputs = fx["inputs"]
    seen = []  # what the first body block receives as its attention mask
    hook = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[2]))
    x_full, x_base = model(inputs["x"], inputs["t"], _cond(fx, inputs))
    hook.remove()
    _close(x_full, fx["out"])
    _close(x_base, fx["out_ig_base"])
    assert torch.equal(seen[0], fx["additive_attn_mask"])

    # padded (and null-caption) positions are masked keys: other values there change nothing
    other = fx["out_with_other_values_at_masked_positions"]
    assert fx["masked_positions_are_ignored"]
    assert not torch.equal(other["context"], inputs["context"])
    x_full2, x_base2 = model(inputs["x"], inputs["t"], (other["context"], inputs["attn_mask"]))
    assert torch.equal(x_full2, x_full) and torch.equal(x_base2, x_base)
    _close(x_full2, other["out"])

    # the DiT on the tiny Qwen3's tokens, as RAEv2's text encoder produced them
    io = fx["text_encoder_io"]
    x_full, x_base = model(inputs["x"], inputs["t"], (io["tokens"], io["attention_mask"]))
    _close(x_full, io["dit_out"])
    _close(x_base, io["dit_out_ig_base"])


@torch.no_grad()
def test_repa_projector_output_matches_raev2(fixtures_dir):
    fx = _fixture(fixtures_dir, "repa.pt")
    model = _loaded(fx)
    assert torch.equal(model.repa_projector.weight, fx["projector"]["weight"])
    inputs = fx["inputs"]
    (x_full, x_base), zt = model(inputs["xt"], inputs["t"], inputs["y"], return_intermediate=True)
    _close(zt, fx["zt_pred"])
    _close(x_full, fx["out"])
    _close(x_base, fx["out_ig_base"])
    loss_repa = fx["repa_coeff"] * torch.nn.functional.mse_loss(zt, inputs["z_clean"])
    torch.testing.assert_close(loss_repa, fx["loss_repa"], rtol=1e-5, atol=ATOL)


@torch.no_grad()
def test_non_ig_class_path_returns_the_full_head_only(fixtures_dir):
    """RAEv2's DiTwDDTHead returns one tensor (its transport accepts a tensor or a pair): mirrored."""
    fx = _fixture(fixtures_dir, "dit_dh_ig_label.pt")
    ig = _loaded(fx)
    params = {k: v for k, v in fx["params"].items() if k != "base_model_depth"}
    plain = build_stage2_from_upstream("stage2.models.DDT.DiTwDDTHead", params)
    assert type(plain) is InContextDiTDH
    plain.load_state_dict({k: v for k, v in fx["state_dict"].items() if not k.startswith("base_final_layer.")},
                          strict=True)
    inputs = fx["inputs"]
    out = plain.eval()(inputs["x"], inputs["t"], inputs["y"])
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, ig(inputs["x"], inputs["t"], inputs["y"])[0])
    out2, zt = plain(inputs["x"], inputs["t"], inputs["y"], return_intermediate=True)
    assert zt is None and torch.equal(out2, out)


def _raev2_counts(D, H, C, depth, heads, n_t, n_c, num_classes, mlp_ratio=4.0, p=1, fourier=256):
    """(all parameters, elements of 2-D parameters) of RAEv2's DiTwDDTHeadIG, from raev2_method.md
    section 3 (label conditioning), counted by hand."""
    total = two_d = 0

    def linear(i, o, bias=True):
        nonlocal total, two_d
        total += i * o + (o if bias else 0)
        two_d += i * o

    def vector(n):
        nonlocal total
        total += n

    def block(w, h, adaln):
        f = int(2 / 3 * w * mlp_ratio)
        vector(2 * w)  # norm1, norm2
        for _ in range(4):
            linear(w, w)  # q, k, v, proj
        vector(2 * (w // h))  # per-head q/k RMSNorm
        linear(w, f), linear(w, f), linear(f, w)  # SwiGLU w1, w2, w3
        if adaln:
            linear(w, 6 * w)

    def final(w):
        vector(w), linear(w, p * p * C), linear(w, 2 * w)

    total += C * p * p * (D + H) + D + H  # s_ and x_embedder: 4-D convs + biases
    linear(D, H)  # s_projector
    vector(fourier)  # t_embedder.W
    linear(D, n_t, bias=False)  # time learnable tokens
    linear(2 * fourier, D), linear(D, D)  # time MLP
    linear(D, num_classes + 1, bias=False), linear(D, n_c, bias=False)  # label table, cond tokens
    for _ in range(depth[0]):
        block(D, heads[0], adaln=False)
    for _ in range(depth[1]):
        block(H, heads[1], adaln=True)
    final(H)  # final_layer
    final(D)  # base_final_layer
    return total, two_d


def test_xl_preset_parameter_counts_match_raev2_on_meta():
    with torch.device("meta"):
        model = build_dit("dit_dh_ig", "XL", input_size=16, in_channels=1024, num_classes=1000,
                          base_model_depth=8, num_t_tokens=4, num_c_tokens=8)
    total = sum(p.numel() for p in model.parameters())
    two_d = sum(p.numel() for p in model.parameters() if p.ndim == 2)
    want = _raev2_counts(1440, 2048, 1024, (28, 2), (20, 16), n_t=4, n_c=8, num_classes=1000)
    assert (total, two_d) == want
    # RAEv2's own DiTwDDTHeadIG on the meta device gave these when this test was written
    assert want == (875_216_500, 871_046_688)
    assert len(model.transformer_blocks()) == 30
    assert model.s_embedder.proj.weight.ndim == 4 and model.x_embedder.proj.weight.ndim == 4  # not Muon's


def _tiny(condition_type="label", **overrides):
    kw = dict(input_size=4, in_channels=6, hidden_size=[16, 24], depth=[2, 1], num_heads=[2, 2], num_classes=5,
              condition_type=condition_type, context_dim=12 if condition_type == "text" else None,
              num_t_tokens=2, num_c_tokens=3, base_model_depth=1)
    return InContextDiTDHIG(**{**kw, **overrides})


def test_init_gives_zero_outputs_and_raev2_init():
    torch.manual_seed(0)
    model = _tiny().eval()
    x, t, y = torch.randn(3, 6, 4, 4), torch.rand(3), torch.tensor([0, 4, 5])
    x_full, x_base = model(x, t, y)
    assert torch.equal(x_full, torch.zeros_like(x)) and torch.equal(x_base, torch.zeros_like(x))
    for block in model.blocks[2:]:
        assert not block.adaln_modulation[-1].weight.any() and not block.adaln_modulation[-1].bias.any()
    assert not model.s_embedder.proj.bias.any() and not model.x_embedder.proj.bias.any()
    assert model.t_embedder.W.requires_grad  # RAEv2's trainer trains it (raev2_method.md 10.4)
    assert not _tiny(learn_time_frequencies=False).t_embedder.W.requires_grad


def test_fsdp2_on_one_rank_matches_the_plain_model(fixtures_dir, one_rank):
    from torch.distributed.tensor import DTensor

    from rae_scale.parallel.fsdp import apply_fsdp, build_mesh

    fx = _fixture(fixtures_dir, "dit_dh_ig_text.pt")  # text: the mask travels through FSDP's hooks
    device = one_rank.device
    plain = _loaded(fx).to(device)
    sharded = copy.deepcopy(plain)
    apply_fsdp(sharded, sharded.transformer_blocks(), build_mesh(device.type, one_rank.world_size))
    inputs = {k: v.to(device) for k, v in fx["inputs"].items() if isinstance(v, torch.Tensor)}
    outs = []
    for model in (plain, sharded):
        x_full, x_base = model(inputs["x"], inputs["t"], _cond(fx, inputs))
        (x_full.square().mean() + x_base.square().mean()).backward()
        outs.append((x_full.detach(), x_base.detach()))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    grads = dict(plain.named_parameters())
    for name, p in sharded.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(g, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointing_gives_identical_outputs_and_gradients(fixtures_dir):
    from rae_scale.parallel import apply_ac

    fx = _fixture(fixtures_dir, "dit_dh_ig_text.pt")
    plain = _loaded(fx).train()
    ac = copy.deepcopy(plain)
    assert apply_ac(ac.transformer_blocks(), "full") == list(range(len(ac.blocks)))
    inputs = fx["inputs"]
    results = []
    for model in (plain, ac):
        x_full, x_base = model(inputs["x"], inputs["t"], _cond(fx, inputs))
        (x_full.square().mean() + x_base.abs().mean()).backward()
        results.append(((x_full, x_base), {n: p.grad for n, p in model.named_parameters()}))
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    for name, g in results[0][1].items():
        assert torch.equal(results[1][1][name], g), name
    assert list(ac.state_dict()) == list(plain.state_dict())


def test_wrong_condition_and_shapes_are_named():
    label, text = _tiny("label"), _tiny("text")
    x, t = torch.randn(2, 6, 4, 4), torch.rand(2)
    context, mask = torch.randn(2, 3, 12), torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"condition_type='label' takes a LongTensor of labels \[B\]"):
        label(x, t, (context, mask))
    with pytest.raises(ValueError, match="condition_type='label' takes a LongTensor"):
        label(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"condition_type='text' takes a pair \(context"):
        text(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"text context must be \[B, num_c_tokens, context_dim\] = \[2, 3, 12\]"):
        text(x, t, (torch.randn(2, 4, 12), mask))
    with pytest.raises(ValueError, match=r"text mask must be \[B, num_c_tokens\] = \[2, 3\]"):
        text(x, t, (context, torch.ones(2, 4)))
    with pytest.raises(ValueError, match=r"x must be \[B, 6, H, W\]"):
        label(torch.randn(2, 5, 4, 4), t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="input spatial size"):
        label(torch.randn(2, 6, 8, 8), t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"t must be a float tensor \[B\] = \[2\]"):
        label(x, torch.rand(3), torch.tensor([0, 1]))
    text(x, t, (context, None))  # no mask: every text token is real


@pytest.mark.parametrize("overrides,message", [
    (dict(hidden_size=[24, 24], num_heads=[4, 2]), "body width 24 / 4 heads must give a head dim .* multiple of 4"),
    (dict(hidden_size=[16, 20], num_heads=[2, 2]), "head width 20 / 2 heads .* multiple of 4"),
    (dict(base_model_depth=3), r"base_model_depth must be in \[1, body depth 2\]"),
    (dict(patch_size=[1, 2]), "patch_size must be the same for body and head"),
    (dict(condition_type="nwm"), "condition_type='nwm' is not supported; allowed: label, text"),
    (dict(condition_type="text", context_dim=None), "condition_type='text' needs context_dim"),
    (dict(enable_repa=True, z_dim=None), "enable_repa needs z_dim >= 1"),
    (dict(enable_repa=True, z_dim=4, repa_layer_depth=3), "1 <= repa_layer_depth <= body depth 2"),
])
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**overrides)


def test_upstream_params_raev2_cannot_build_are_refused(fixtures_dir):
    params = _fixture(fixtures_dir, "dit_dh_ig_label.pt")["params"]
    path = "stage2.models.DDT.DiTwDDTHeadIG"
    with pytest.raises(ValueError, match="use_cfg_conds=True .* not supported"):
        build_stage2_from_upstream(path, {**params, "use_cfg_conds": True})
    with pytest.raises(ValueError, match=r"unknown keys \['use_qknorm'\]"):
        build_stage2_from_upstream(path, {**params, "use_qknorm": True})
    with pytest.raises(ValueError, match=r"cond_arch has unknown keys \['extra'\]"):
        build_stage2_from_upstream(path, {**params, "cond_arch": {**params["cond_arch"], "extra": 1}})
    with pytest.raises(ValueError, match="unknown upstream stage-2 class 'stage2.models.DDT.Other'"):
        build_stage2_from_upstream("stage2.models.DDT.Other", params)
