"""Transport: path identities, time distributions (KS test), the loss, and a 2-D learning test."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from rae_scale.diffusion import Transport, sample_ode, shift_from_dim, time_shift


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_shift_values_from_the_paper_setting():
    assert shift_from_dim(768 * 16 * 16) == pytest.approx(math.sqrt(48))
    assert shift_from_dim(768 * 32 * 32) == pytest.approx(13.856, abs=1e-3)
    assert time_shift(torch.tensor(0.5), math.sqrt(48)).item() == pytest.approx(0.874, abs=1e-3)
    tr = Transport()
    assert tr.shift_for((768, 16, 16)) == pytest.approx(math.sqrt(48))
    assert Transport(shift_dim=128, shift_base=64).shift_for((768, 16, 16)) == pytest.approx(math.sqrt(2))
    assert Transport(shift=3.0).shift_for((768, 16, 16)) == 3.0


def test_linear_path_identities():
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    x0, _ = Transport.interpolate(z, eps, torch.zeros(5))
    x1, target = Transport.interpolate(z, eps, torch.ones(5))
    torch.testing.assert_close(x0, z)
    torch.testing.assert_close(x1, eps)
    t, h = torch.rand(5, generator=g, dtype=torch.float64) * 0.8 + 0.1, 1e-6
    za, ea = z.double(), eps.double()
    fd = (Transport.interpolate(za, ea, t + h)[0] - Transport.interpolate(za, ea, t - h)[0]) / (2 * h)
    torch.testing.assert_close(fd, target.double(), atol=1e-6, rtol=1e-6)


def _shifted_logit_normal_cdf(u, mu, sigma, t_max, s):
    """Analytic CDF of s t / (1 + (s - 1) t) with logit(t) ~ N(mu, sigma^2) truncated to t <= t_max."""
    u = np.asarray(u, dtype=np.float64)
    t = np.clip(u / (s - (s - 1) * u), 1e-300, t_max)  # inverse of the shift
    z = (np.log(t) - np.log1p(-t) - mu) / sigma
    z_max = (math.log(t_max) - math.log1p(-t_max) - mu) / sigma
    return stats.norm.cdf(z) / stats.norm.cdf(z_max)


@pytest.mark.parametrize("mu,sigma,s", [(0.0, 1.0, math.sqrt(48)), (0.5, 0.7, 1.0), (-1.0, 1.5, 2.5)])
def test_shifted_logit_normal_matches_analytic_density(mu, sigma, s):
    tr = Transport(time_dist="logit_normal", mu=mu, sigma=sigma)
    t = tr.sample_time(20_000, shift=s, generator=torch.Generator().manual_seed(1))
    assert t.dtype == torch.float32 and t.shape == (20_000,)
    assert t.min() >= 0 and t.max() <= time_shift(torch.tensor(0.999), s) + 1e-6
    draws = t.double().numpy()
    res = stats.kstest(draws, lambda u: _shifted_logit_normal_cdf(u, mu, sigma, 0.999, s))
    assert res.pvalue > 1e-3, res
    # The same test rejects a wrong shift.
    bad = stats.kstest(draws, lambda u: _shifted_logit_normal_cdf(u, mu, sigma, 0.999, s * 1.3))
    assert bad.pvalue < 1e-6


def test_shifted_uniform_matches_analytic_density():
    s = 3.0
    t = Transport(time_dist="uniform").sample_time(20_000, shift=s, generator=torch.Generator().manual_seed(2))
    cdf = lambda u: (u / (s - (s - 1) * u)).clip(0, 0.999) / 0.999  # noqa: E731
    assert stats.kstest(t.double().numpy(), cdf).pvalue > 1e-3


def _draw(tr: Transport, z: torch.Tensor, g: torch.Generator):
    """(times, noise) for a batch of latents z, both from generator g."""
    t = tr.sample_time(z.shape[0], shift=tr.shift_for(z.shape[1:]), generator=g)
    return t, torch.randn(z.shape, generator=g, dtype=z.dtype)


def test_loss_is_zero_for_the_exact_velocity():
    """With a single data point c the exact field is v = (x - (1 - t) c) / t - c."""
    c = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z = c.expand(64, -1, -1, -1).clone()
    model = lambda x, t: (x - (1 - t.view(-1, 1, 1, 1)) * c) / t.view(-1, 1, 1, 1) - c  # noqa: E731
    tr = Transport(shift=2.0)
    loss = tr.training_loss(model, z, *_draw(tr, z, torch.Generator().manual_seed(0)))
    assert loss.shape == (64,)
    assert loss.max().item() < 1e-12


def test_loss_of_zero_model_is_mean_squared_target():
    """E[(eps - z)^2] = 1 + Var z + E[z]^2 for a zero network; per-sample mean over C, H, W."""
    g = torch.Generator().manual_seed(4)
    z = 2.0 + 0.5 * torch.randn(4096, 4, 2, 2, generator=g)
    tr = Transport()
    loss = tr.training_loss(lambda x, t: torch.zeros_like(x), z, *_draw(tr, z, g))
    assert loss.mean().item() == pytest.approx(1 + 0.25 + 4.0, rel=0.01)


def test_loss_passes_the_given_time_and_is_the_interpolation_mse():
    seen = {}

    def model(x, t):
        seen["t"] = t
        return x

    z = torch.randn(8, 3, 2, 2)
    tr = Transport(shift_dim=12, shift_base=3)  # s = 2
    t, eps = _draw(tr, z, torch.Generator().manual_seed(5))
    loss = tr.training_loss(model, z, t, eps)
    assert seen["t"] is t and loss.shape == (8,)
    x_t, target = tr.interpolate(z, eps, t)
    torch.testing.assert_close(loss, (x_t - target).pow(2).flatten(1).mean(1), rtol=0, atol=0)


def test_time_from_uniform_is_sample_time_and_batch_independent():
    tr = Transport(mu=0.3, sigma=1.2)
    u = torch.rand(64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    whole = tr.time_from_uniform(u, 2.5)
    alone = torch.cat([tr.time_from_uniform(u[i:i + 1], 2.5) for i in range(64)])
    assert torch.equal(whole, alone) and whole.dtype == torch.float32
    drawn = tr.sample_time(64, shift=2.5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(drawn, whole)


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="time_dist must be one of"):
        Transport(time_dist="lognormal")
    with pytest.raises(ValueError, match="sigma"):
        Transport(sigma=0.0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        Transport(shift=-1.0)
    with pytest.raises(ValueError, match="does not match the latent shape"):
        z = torch.randn(2, 3, 2, 2)
        Transport().training_loss(lambda x, t: x[:, :1], z, torch.rand(2), torch.randn_like(z))


# ----------------------------------------------------------------------------- learning test

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
STD = 0.3


class _MLP(nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, 9).float() * math.pi)
        self.net = nn.Sequential(nn.Linear(18, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, y=None):
        emb = torch.cat([torch.sin(t[:, None] * self.freqs), torch.cos(t[:, None] * self.freqs)], 1)
        return self.net(torch.cat([x, emb], 1))


@pytest.mark.slow
def test_mlp_learns_gaussian_mixture():
    """Train with the transport loss, sample with Heun: per-mode mass and mean within 5%."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    def data(n):
        k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
        return MEANS[k] + STD * torch.randn(n, 2, generator=g)

    model, tr, steps = _MLP(), Transport(time_dist="uniform", shift=1.0), 2000
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        z = data(256)
        loss = tr.training_loss(model, z, *_draw(tr, z, g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        out = sample_ode(lambda x, t: model(x, t), torch.randn(20_000, 2, generator=g), num_steps=51,
                         shift=1.0, method="heun")
    mode = torch.cdist(out, MEANS).argmin(1)
    for j in range(3):
        mass = (mode == j).float().mean().item()
        assert abs(mass - WEIGHTS[j].item()) <= 0.05 * WEIGHTS[j].item(), (j, mass)
        mean = out[mode == j].mean(0)
        assert (mean - MEANS[j]).norm().item() <= 0.05 * MEANS[j].norm().item(), (j, mean)
