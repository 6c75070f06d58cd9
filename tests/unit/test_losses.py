"""Stage-1 losses: GAN losses and adaptive weight by hand, LPIPS against a hand-written LPIPS."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rae_scale.losses import (adaptive_gan_weight, adaptive_weight_from_grads, build_lpips, d_loss_fn, g_loss_fn,
                              hinge_d_loss, vanilla_d_loss, vanilla_g_loss)


def test_hinge_and_vanilla_losses_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    fake = torch.tensor([[-2.0, 0.5], [0.0, -0.5]])
    # relu(1 - real) = [0, .5, 2, 0] -> .625; relu(1 + fake) = [0, 1.5, 1, .5] -> .75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.625 + 0.75))
    assert vanilla_g_loss(fake).item() == pytest.approx(0.5)
    sp = lambda v: torch.log1p(torch.exp(v))  # noqa: E731
    assert vanilla_d_loss(real, fake).item() == pytest.approx(
        0.5 * (sp(-real).mean() + sp(fake).mean()).item(), rel=1e-6)


def test_adaptive_weight_matches_hand_computation():
    torch.manual_seed(0)
    body, last = nn.Linear(6, 8), nn.Linear(8, 5)
    x, target = torch.randn(4, 6), torch.randn(4, 5)
    out = last(torch.tanh(body(x)))
    rec = (out - target).abs().mean() + 0.3 * out.pow(2).mean()
    gan = -(out * torch.linspace(-1, 1, 5)).mean()
    lam = adaptive_gan_weight(rec, gan, last.weight)

    # Hand computation: d rec / d W = (d rec / d out)^T h, with h the last layer's input.
    h = torch.tanh(body(x)).detach()
    o = out.detach()
    d_rec = torch.sign(o - target) / o.numel() + 0.3 * 2 * o / o.numel()
    d_gan = -torch.linspace(-1, 1, 5).expand(4, 5) / o.numel()
    expected = (d_rec.T @ h).norm() / ((d_gan.T @ h).norm() + 1e-6)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not lam.requires_grad
    (rec + lam * gan).backward()  # the graph is still there for the real backward
    assert last.weight.grad is not None


def test_losses_by_name():
    real, fake = torch.tensor([0.2, -0.3]), torch.tensor([0.5, -1.5])
    assert d_loss_fn("hinge")(real, fake) == hinge_d_loss(real, fake)
    assert d_loss_fn("vanilla")(real, fake) == vanilla_d_loss(real, fake)
    assert g_loss_fn("hinge")(fake).item() == g_loss_fn("vanilla")(fake).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="allowed"):
        d_loss_fn("wgan")
    with pytest.raises(ValueError, match="allowed"):
        g_loss_fn("softplus")


def test_adaptive_weight_from_grads_by_hand():
    lam = adaptive_weight_from_grads(torch.tensor([3.0, 4.0]), torch.tensor([[0.0, 2.0]]), eps=0.0)
    assert lam.item() == pytest.approx(2.5)
    assert adaptive_weight_from_grads(torch.tensor(1e9), torch.tensor(1.0), max_weight=7.0).item() == 7.0


def test_adaptive_weight_is_clamped():
    w = torch.ones(3, requires_grad=True)
    lam = adaptive_gan_weight((w * 100).sum(), (w * 1e-9).sum(), w, max_weight=50.0)
    assert lam.item() == 50.0
    with pytest.raises(ValueError, match="requires_grad"):
        adaptive_gan_weight(w.sum(), w.sum(), torch.ones(3))


# ----------------------------------------------------------------------------- LPIPS

# LPIPS v0.1 input scaling (Zhang et al. 2018): (x - shift) / scale per RGB channel.
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
_RELU_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features


def _reference_lpips(features: nn.Sequential, heads: list[torch.Tensor], x, y):
    """LPIPS written out: unit-normalise each tap over channels, weight squared diffs, average."""
    def taps(img):
        h, out = (img - _SHIFT) / _SCALE, []
        for i, layer in enumerate(features[:30]):
            h = layer(h)
            if i in _RELU_TAPS:
                out.append(h.clone())
        return out

    total = 0.0
    for fx, fy, w in zip(taps(x), taps(y), heads):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((nx - ny) ** 2, w).mean(dim=(2, 3))
    return total.flatten()


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random torchvision VGG16 saved in torchvision's format (conv part only, to keep it small)."""
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, path)
    return path, vgg.features


def _package_heads():
    spec = importlib.util.find_spec("lpips")
    state = torch.load(Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu",
                       weights_only=True)
    return [state[f"lin{k}.model.1.weight"] for k in range(5)]


def test_lpips_matches_hand_written_lpips(vgg_file):
    path, features = vgg_file
    lp = build_lpips(vgg_weights=path)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 64, 64, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        got = lp(x, y)
        expected = _reference_lpips(features, _package_heads(), x, y)
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_lpips_reads_torchvision_cache(vgg_file, tmp_path, monkeypatch):
    path, features = vgg_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        build_lpips()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / path.name).symlink_to(path)
    lp = build_lpips()
    torch.testing.assert_close(lp.net.net.slice1[0].weight, features[0].weight)


def test_lpips_is_frozen_eval_and_differentiable_in_input():
    lp = build_lpips(pretrained_backbone=False)
    parent = nn.ModuleDict({"lpips": lp, "dec": nn.Linear(2, 2)})
    parent.train()
    assert not lp.training and not any(m.training for m in lp.modules())
    assert not any(p.requires_grad for p in lp.parameters())
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    a, b = lp(x, y), lp(x, y)  # dropout off: deterministic
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.all(lp(y, y) == 0)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_rejects_a_foreign_file(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a torchvision VGG16 state dict"):
        build_lpips(vgg_weights=bad)
