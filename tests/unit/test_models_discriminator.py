"""DINO discriminator: golden logits, frozen hidden backbone, gradients to the input; DiffAug."""
import pytest
import torch

from rae_scale.models import DiffAug, DinoDiscriminator
from rae_scale.models.discriminator import cutout, translate


@pytest.fixture(scope="module")
def disc_fixture():
    from conftest import FIXTURES

    return torch.load(FIXTURES / "dino_disc_tiny.pt", weights_only=False)


def _build(fx, source=None):
    return DinoDiscriminator(source if source is not None else fx["dino_checkpoint"], recipe=fx["recipe"],
                             ks=fx["ks"], key_depths=tuple(fx["key_depths"]), norm_type=fx["norm_type"],
                             using_spec_norm=fx["using_spec_norm"])


def test_logits_match_upstream(disc_fixture, tmp_path):
    fx = disc_fixture
    torch.save(fx["dino_checkpoint"], tmp_path / "dino.pth")  # the backbone comes from a local file
    disc = _build(fx, tmp_path / "dino.pth")
    disc.load_state_dict({f"heads.{k}": v for k, v in fx["heads_state_dict"].items()})  # upstream `disc` keys
    disc.eval()
    with torch.no_grad():
        logits = disc(fx["x"])
    assert logits.shape == fx["logits"].shape == (2, 2 * 28 * 28)
    assert (logits - fx["logits"]).abs().max() / fx["logits"].abs().max() < 1e-5
    # the key third of each qkv bias is zeroed on load; the caller's dict is untouched
    bias = disc.backbone.blocks[0].attn.qkv.bias
    assert torch.equal(bias[32:64], torch.zeros(32))
    assert fx["dino_checkpoint"]["blocks.0.attn.qkv.bias"][32:64].abs().sum() > 0


def test_backbone_frozen_hidden_and_differentiable(disc_fixture):
    disc = _build(disc_fixture)
    assert all(k.startswith("heads.") for k in disc.state_dict())
    n_backbone = sum(p.numel() for p in disc.backbone.parameters())
    assert n_backbone > 0 and all(not p.requires_grad for p in disc.backbone.parameters())
    disc.train()
    assert not disc.backbone.training
    x = torch.rand(1, 3, 64, 64, requires_grad=True) * 2 - 1
    x.retain_grad()
    disc(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters() if p.requires_grad)
    disc.to(torch.float64)
    assert disc.backbone.pos_embed.dtype == torch.float64
    with pytest.raises(ValueError, match="does not fit"):
        DinoDiscriminator(disc_fixture["dino_checkpoint"], recipe={**disc_fixture["recipe"], "depth": 5})


def test_diffaug_translation_and_cutout_are_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 16, 16) + 1.0  # strictly positive so zero fill is visible
    out = translate(x, 0.125, generator=g)
    for i in range(16):  # each image is an integer shift within +-2 px, zero filled
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.zeros_like(x[i])
                ys, yd = (slice(0, 16 - dy), slice(dy, 16)) if dy >= 0 else (slice(-dy, 16), slice(0, 16 + dy))
                xs, xd = (slice(0, 16 - dx), slice(dx, 16)) if dx >= 0 else (slice(-dx, 16), slice(0, 16 + dx))
                ref[:, yd, xd] = x[i][:, ys, xs]
                found |= torch.equal(out[i], ref)
        assert found
    cut = cutout(x, 0.25, generator=g)
    zeros = (cut == 0).all(dim=1).sum(dim=(1, 2))
    assert ((zeros > 0) & (zeros <= 16)).all()  # a clipped 4x4 square per image


def test_diffaug_policy_switches_and_dtype():
    x = torch.rand(4, 3, 8, 8, dtype=torch.bfloat16)
    assert torch.equal(DiffAug(prob=0.0)(x), x)
    g = torch.Generator().manual_seed(0)
    out = DiffAug(prob=1.0)(x, generator=g)
    assert out.dtype == torch.bfloat16 and not torch.equal(out, x)
    a = DiffAug()(x.float(), generator=torch.Generator().manual_seed(3))
    b = DiffAug()(x.float(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="prob"):
        DiffAug(prob=2.0)
