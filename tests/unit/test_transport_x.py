"""x-prediction transport against RAEv2's own Transport (raev2/transport_x.pt): the path, the velocity
conversion, the loss with and without an internal-guidance base head, the losses of RAEv2's seeded
draws, and the time distribution (its transform exactly, our seeded draws statistically)."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from rae_scale import config as C
from rae_scale.diffusion.transport import LossParts, Transport, x_to_velocity
from rae_scale.seeding import Stream, per_sample_seeds, seeded_bernoulli, seeded_uniform
from raev2_toy import ToyModel

TOL = dict(rtol=1e-5, atol=1e-5)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def fx(fixtures_dir):
    return torch.load(fixtures_dir / "raev2" / "transport_x.pt", weights_only=False)


def _time_dist(name: str) -> tuple[float, float]:
    """(mu, sigma) of RAEv2's 'logit-normal_MU_SIGMA'."""
    kind, mu, sigma = name.split("_")
    assert kind == "logit-normal", name
    return float(mu), float(sigma)


def _transport(fx, **changes) -> Transport:
    """Our Transport with the fixture's settings (no truncation: RAEv2 draws t on all of (0, 1))."""
    tr = fx["transport"]
    mu, sigma = _time_dist(tr["time_dist_type"])
    kwargs = dict(prediction=tr["prediction"], t_eps=tr["t_eps"], shift=tr["time_dist_shift"], mu=mu, sigma=sigma,
                  t_max=1.0)
    return Transport(**{**kwargs, **changes})


def _with_labels(model, y):
    return lambda x, t: model(x, t, y)


def test_path_target_and_velocity_conversion(fx):
    tr, i = _transport(fx), fx["inputs"]
    x_t, target = tr.input_and_target(i["x1_data"], i["x0_noise"], i["t"])
    torch.testing.assert_close(x_t, fx["xt"], **TOL)
    torch.testing.assert_close(target, fx["target_vt"], **TOL)
    x_hat = ToyModel(fx["toy_model"], with_base=False)(fx["xt"], i["t"], i["y"])
    torch.testing.assert_close(x_hat, fx["x_pred"], **TOL)  # the toy model is the fixture's
    torch.testing.assert_close(x_to_velocity(fx["xt"], fx["x_pred"], i["t"], tr.t_eps), fx["v_pred_from_x"], **TOL)
    # above t_eps the target is the path's velocity eps - z; below, the clamp scales it by t / t_eps
    above = i["t"] >= tr.t_eps
    torch.testing.assert_close(target[above], (i["x0_noise"] - i["x1_data"])[above], **TOL)
    assert not bool(above.all()), "the fixture should exercise the clamp (a time below t_eps)"


def test_loss_of_a_full_head_only_model(fx):
    tr, i = _transport(fx), fx["inputs"]
    model = _with_labels(ToyModel(fx["toy_model"], with_base=False), i["y"])
    parts = tr.loss_parts(model, i["x1_data"], i["t"], i["x0_noise"])
    assert isinstance(parts, LossParts) and parts.base is None and parts.total is parts.full
    torch.testing.assert_close(parts.total, fx["loss_per_sample"], **TOL)
    torch.testing.assert_close(parts.total.mean(), fx["loss_mean"], **TOL)
    torch.testing.assert_close(tr.training_loss(model, i["x1_data"], i["t"], i["x0_noise"]), parts.total)
    x_t, target = tr.input_and_target(i["x1_data"], i["x0_noise"], i["t"])
    torch.testing.assert_close(tr.elementwise_loss(fx["x_pred"], x_t, i["t"], target), fx["loss_elementwise"], **TOL)


def test_loss_with_the_internal_guidance_base_head(fx):
    tr, i, ig = _transport(fx, base_model_coeff=fx["ig_loss"]["base_model_coeff"]), fx["inputs"], fx["ig_loss"]
    model = _with_labels(ToyModel(fx["toy_model"]), i["y"])
    parts = tr.loss_parts(model, i["x1_data"], i["t"], i["x0_noise"])
    torch.testing.assert_close(parts.total.mean(), ig["loss_mean"], **TOL)
    torch.testing.assert_close(parts.base.mean(), ig["loss_base_mean"], **TOL)
    torch.testing.assert_close(parts.full.mean(), fx["loss_mean"], **TOL)
    x_t, target = tr.input_and_target(i["x1_data"], i["x0_noise"], i["t"])
    _, x_base = model(x_t, i["t"])
    torch.testing.assert_close(tr.elementwise_loss(x_base, x_t, i["t"], target), ig["loss_base_elementwise"], **TOL)
    # another coefficient weighs the same base term
    half = _transport(fx, base_model_coeff=0.5).loss_parts(model, i["x1_data"], i["t"], i["x0_noise"])
    torch.testing.assert_close(half.total, parts.full + 0.5 * parts.base, rtol=1e-6, atol=0)


def test_loss_of_raev2_seeded_draws(fx):
    """RAEv2 drew dropout, noise and times from its global RNG; given those draws our loss is its loss.
    (Our loop draws them per sample from seeded streams instead: see the last lines.)"""
    s, i = fx["seeded"], fx["inputs"]
    null = i["null_label"]
    dropped = torch.where(s["dropout_mask"], torch.full_like(i["y"], null), i["y"])
    assert torch.equal(dropped, s["dropped_context"])
    model = _with_labels(ToyModel(fx["toy_model"]), s["dropped_context"])
    parts = _transport(fx).loss_parts(model, i["x1_data"], s["t"], s["x0"])
    torch.testing.assert_close(parts.total.mean(), s["loss_mean"], **TOL)
    torch.testing.assert_close(parts.base.mean(), s["loss_base_mean"], **TOL)
    # the loop's own label dropout: per-sample seeded, at the fixture's rate, independent of the batch
    seeds = per_sample_seeds(s["seed"], 0, range(len(i["y"])))
    drop = seeded_bernoulli(seeds, s["cfg_dropout_prob"], Stream.LABEL_DROP)
    assert drop.dtype == torch.bool and torch.equal(drop[1:], seeded_bernoulli(seeds[1:], s["cfg_dropout_prob"],
                                                                               Stream.LABEL_DROP))


# ----------------------------------------------------------------------------- time distribution


def test_time_transform_is_raev2s_sigmoid_and_shift(fx):
    """Fed the normal quantile u = Phi(n) of RAEv2's draws n, our inverse-CDF transform gives its times."""
    ts, tr = fx["time_sampler"], _transport(fx)
    u = torch.special.ndtr(ts["normal_draws"].double())
    torch.testing.assert_close(tr.time_from_uniform(u, tr.shift), ts["t_shifted"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Transport(mu=tr.mu, sigma=tr.sigma, t_max=1.0).time_from_uniform(u, 1.0),
                               ts["t_logit_normal"], rtol=1e-5, atol=1e-6)


def _ks_bound(n: int, m: int, alpha: float = 1e-4) -> float:
    """Two-sample KS critical value: D > c(alpha) sqrt((n + m) / (n m)) rejects equal distributions."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def test_seeded_time_draws_match_raev2s_distribution(fx):
    ts, tr = fx["time_sampler"], _transport(fx)
    ref = ts["t_shifted"].double().numpy()
    n = len(ref)
    bound = _ks_bound(n, n)
    u = seeded_uniform(per_sample_seeds(ts["seed"], 0, range(n)), Stream.TIME)  # as the training loop draws
    ours = tr.time_from_uniform(u, tr.shift).double().numpy()
    assert stats.ks_2samp(ours, ref).statistic < bound

    # The bound has power: each wrong variant fails it.
    s = tr.shift
    normal = torch.distributions.Normal(0.0, 1.0)
    wrong = {
        "shift / 2": tr.time_from_uniform(u, s / 2),
        "shift squared (no sqrt in s)": tr.time_from_uniform(u, s * s),
        "no shift": tr.time_from_uniform(u, 1.0),
        "uniform times": _transport(fx, time_dist="uniform").time_from_uniform(u, s),
        "no sigmoid (n clipped to [0, 1])": (lambda t: s * t / (1 + (s - 1) * t))(normal.icdf(u.float()).clamp(0, 1)),
    }
    for name, t in wrong.items():
        assert stats.ks_2samp(t.double().numpy(), ref).statistic > bound, name


def test_transport_from_config_section():
    section = C.TransportConfig(time_max=1.0, shift_dim=1024 * 16 * 16, prediction="x", t_eps=0.1,
                                base_model_coeff=0.5)
    tr = Transport.from_config(section)
    assert (tr.prediction, tr.t_eps, tr.base_model_coeff, tr.t_max) == ("x", 0.1, 0.5, 1.0)
    assert tr.shift_for((1, 1, 1)) == pytest.approx(8.0)  # RAEv2's s for its 1024x16x16 latents
    default = Transport.from_config(C.TransportConfig())
    assert (default.prediction, default.t_max) == ("velocity", Transport().t_max)  # RAE's setting stays


# ----------------------------------------------------------------------------- other paths and errors


def test_velocity_model_with_a_base_head_trains_both_on_eps_minus_z():
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0.01, 0.3, 0.6, 0.9])
    parts = Transport(base_model_coeff=2.0).loss_parts(lambda x, tt: (x, 0.5 * x), z, t, eps)
    x_t = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * eps
    full = (x_t - (eps - z)).pow(2).flatten(1).mean(1)
    base = (0.5 * x_t - (eps - z)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(parts.full, full)
    torch.testing.assert_close(parts.base, base)
    torch.testing.assert_close(parts.total, full + 2.0 * base)


def test_bad_x_prediction_settings_are_named():
    with pytest.raises(ValueError, match="prediction must be one of"):
        Transport(prediction="eps")
    with pytest.raises(ValueError, match="t_eps must be in"):
        Transport(prediction="x", t_eps=0.0)
    with pytest.raises(ValueError, match="base_model_coeff must be >= 0"):
        Transport(base_model_coeff=-1.0)
    z, t = torch.randn(2, 3, 2, 2), torch.rand(2)
    tr = Transport(prediction="x", t_max=1.0)
    with pytest.raises(ValueError, match=r"must return \(full, base\)"):
        tr.training_loss(lambda x, tt: (x, x, x), z, t, torch.randn_like(z))
    with pytest.raises(ValueError, match="base head output shape"):
        tr.training_loss(lambda x, tt: (x, x[:, :1]), z, t, torch.randn_like(z))
    with pytest.raises(C.ConfigError, match="'transport.prediction': bad value 'eps'"):
        C.validate(C.Stage2Job(transport=C.TransportConfig(prediction="eps")))
    with pytest.raises(C.ConfigError, match="'transport.t_eps': bad value 0.0; allowed: > 0.0"):
        C.validate(C.Stage2Job(transport=C.TransportConfig(t_eps=0.0)))
    with pytest.raises(C.ConfigError, match="'transport.time_max': bad value 1.5; allowed: <= 1.0"):
        C.validate(C.Stage2Job(transport=C.TransportConfig(time_max=1.5)))
