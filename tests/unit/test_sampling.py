"""Samplers against the closed-form velocity field of Gaussian data, grids and per-sample seeds."""
from __future__ import annotations

import math

import pytest
import torch

from rae_scale.diffusion import per_sample_noise, sample_ode, sample_sde, time_grid

MU = torch.tensor([1.5, -2.0, 1.0, 3.0], dtype=torch.float64)
SIGMA = torch.tensor([0.6, 1.2, 0.9, 1.6], dtype=torch.float64)
N = 20_000
SHIFT_256PX = math.sqrt(16 * 16 * 768 / 4096)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact E[eps - z | x_t] for z ~ N(MU, diag SIGMA^2), x_t = (1 - t) z + t eps.

    x_t and z are jointly Gaussian per dim: Var x_t = a^2 s^2 + t^2 (a = 1 - t), Cov(z, x_t) = a s^2,
    Cov(eps, x_t) = t, so E[z | x] = MU + a s^2 / V (x - a MU) and E[eps | x] = t / V (x - a MU).
    """
    t = t.double().view(-1, 1)
    a = 1 - t
    var = a**2 * SIGMA**2 + t**2
    r = x.double() - a * MU
    e_eps = t / var * r
    e_z = MU + a * SIGMA**2 / var * r
    return (e_eps - e_z).to(x.dtype)


@pytest.fixture(scope="module")
def x1():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g)
    # Standardised start noise: the exact flow maps it to data with exactly MU, SIGMA, so the
    # measured error is the solver's alone (fresh SDE noise still adds ~0.5% sampling error).
    return (x - x.mean(0)) / x.std(0)


SAMPLERS = {
    "euler": lambda x, s, n=101: sample_ode(gaussian_velocity, x, num_steps=n, shift=s, method="euler"),
    "heun": lambda x, s, n=21: sample_ode(gaussian_velocity, x, num_steps=n, shift=s, method="heun"),
    "dopri5": lambda x, s, n=50: sample_ode(gaussian_velocity, x, num_steps=n, shift=s, method="dopri5"),
    "sde": lambda x, s, n=201: sample_sde(gaussian_velocity, x, num_steps=n, shift=s,
                                          generator=torch.Generator().manual_seed(1)),
}


def _assert_recovers(out, tol=0.02):
    mean, std = out.double().mean(0), out.double().std(0)
    assert torch.all((mean - MU).abs() <= tol * MU.abs()), f"mean {mean} vs {MU}"
    assert torch.all((std - SIGMA).abs() <= tol * SIGMA), f"std {std} vs {SIGMA}"


@pytest.mark.parametrize("shift", [1.0, 1.5])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_recover_gaussian(x1, name, shift):
    """Euler 100 steps, Heun 20 steps, dopri5, SDE 200 steps: mean and std within 2%."""
    _assert_recovers(SAMPLERS[name](x1, shift))


@pytest.mark.parametrize("name,num_steps", [("euler", 401), ("heun", 61), ("dopri5", 50), ("sde", 201)])
def test_samplers_recover_gaussian_at_256px_shift(x1, name, num_steps):
    """At s = sqrt(48) the shifted grid's last steps are long (0.072 -> 0.0069 for 100 Euler steps),
    so Euler needs ~400 steps and Heun ~60 for 2% (with 100 / 20 they are ~5.5% / 3% low in std)."""
    _assert_recovers(SAMPLERS[name](x1, SHIFT_256PX, num_steps))


def test_euler_and_heun_converge_with_order(x1):
    """Error against the exact flow map x0 = MU + SIGMA x1 shrinks ~2x (Euler) / ~4x (Heun) per 2x steps."""
    x = x1[:256]
    exact = MU + SIGMA * x.double()

    def err(method, n):  # t_end = 0 so the exact target is the data itself
        out = sample_ode(gaussian_velocity, x, num_steps=n, shift=1.0, method=method, t_end=0.0)
        return (out.double() - exact).abs().max().item()

    assert 1.7 < err("euler", 41) / err("euler", 81) < 2.3
    assert 3.3 < err("heun", 21) / err("heun", 41) < 4.7


def test_dopri5_matches_exact_flow_map(x1):
    x = x1[:512]
    out = sample_ode(gaussian_velocity, x, num_steps=50, shift=1.0, method="dopri5", t_end=0.0,
                     atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(out.double(), MU + SIGMA * x.double(), atol=1e-4, rtol=1e-4)


def test_time_grid_is_upstreams():
    s = 2.0
    ts = time_grid(50, s)
    tau = 1 - torch.arange(50, dtype=torch.float64) * 0.999 / 49
    torch.testing.assert_close(ts, s * tau / (1 + (s - 1) * tau))
    assert ts[0].item() == 1.0
    assert time_grid(50, SHIFT_256PX)[-1].item() == pytest.approx(0.00689, abs=1e-5)


def test_number_of_evaluations():
    calls = []

    def v(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    x = torch.zeros(2, 3)
    sample_ode(v, x, num_steps=50, shift=1.0, method="euler")
    assert len(calls) == 49
    calls.clear()
    sample_ode(v, x, num_steps=11, shift=1.0, method="heun")
    assert len(calls) == 20
    calls.clear()
    sample_sde(v, x, num_steps=10, shift=1.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 10


def test_per_sample_noise_depends_only_on_own_seed():
    a = per_sample_noise((3, 4, 2, 2), [7, 11, 13])
    b = per_sample_noise((2, 4, 2, 2), torch.tensor([13, 7]))
    torch.testing.assert_close(a[0], b[1], rtol=0, atol=0)
    torch.testing.assert_close(a[2], b[0], rtol=0, atol=0)
    expected = torch.randn((4, 2, 2), generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(a[1], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="number of seeds"):
        per_sample_noise((2, 4), [1, 2, 3])


@pytest.mark.parametrize("method", ["euler", "heun", "dopri5", "sde"])
def test_sample_does_not_depend_on_batch_mates(method):
    seeds = [3, 5, 8, 13]
    x1 = per_sample_noise((4, 4), seeds)

    def run(idx):
        x = x1[idx]
        if method == "sde":
            return sample_sde(gaussian_velocity, x, num_steps=30, shift=2.0, seeds=[seeds[i] for i in idx])
        return sample_ode(gaussian_velocity, x, num_steps=30, shift=2.0, method=method)

    full = run([0, 1, 2, 3])
    alone = run([2])
    mixed = run([3, 2])
    torch.testing.assert_close(alone[0], full[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[1], full[2], rtol=1e-6, atol=1e-6)


def test_sde_seed_noise_is_not_the_start_noise():
    """With seeds, the SDE's step noise is a separate stream from per_sample_noise(seeds)."""
    seeds = [1, 2]
    x1 = per_sample_noise((2, 64), seeds)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    # One EM step at t = 1 with v = 0: x <- x - dt w x + sqrt(2 w dt) xi; recover xi.
    ts = time_grid(3, 1.0)
    dt = float(ts[0] - ts[1])
    out = sample_sde(zero, x1, num_steps=2, shift=1.0, seeds=seeds, t_end=float(ts[1]))
    xi = (out - x1 * (1 - dt)) / math.sqrt(2 * dt)
    corr = torch.nn.functional.cosine_similarity(xi, x1, dim=1)
    assert corr.abs().max() < 0.5


def test_bad_arguments_are_named():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        sample_ode(gaussian_velocity, x, num_steps=10, shift=1.0, method="rk4")
    with pytest.raises(ValueError, match="num_steps"):
        sample_ode(gaussian_velocity, x, num_steps=1, shift=1.0)
    with pytest.raises(ValueError, match="seeds or generator"):
        sample_sde(gaussian_velocity, x, num_steps=5, shift=1.0, seeds=[1, 2],
                   generator=torch.Generator())
    with pytest.raises(ValueError, match="2 seeds for a batch of"):
        sample_sde(gaussian_velocity, torch.zeros(3, 3), num_steps=5, shift=1.0, seeds=[1, 2])
