"""RAEv2's sampler grid and guidance on x-predictions against RAEv2's own Sampler and guidance
functions (raev2/transport_x.pt, `sampler`): the grid, and for each guidance mode the times the model
sees and the sample, through the diffusion functions and through a sample job's config. Then text
conditions, the activation rules and the refused combinations, by hand."""
from __future__ import annotations

import pytest
import torch

from rae_scale import config as C
from rae_scale.config.derive import check_sampling
from rae_scale.diffusion.guidance import (guidance_active, guided_prediction, internal_and_classifier_free_guidance,
                                          internal_guidance)
from rae_scale.diffusion.sample_fn import sample_latents, sampling_velocity
from rae_scale.diffusion.sampling import sample_ode, sampling_grid, time_grid, velocity_from_x_prediction
from rae_scale.diffusion.transport import Transport
from raev2_toy import ToyModel

TOL = dict(rtol=1e-5, atol=1e-5)
# RAEv2's forward function of each guided mode, and ours (guided_prediction picks by guidance_active)
FORWARDS = {"forward": (False, False), "forward_with_cfg": (True, False),
            "forward_with_internalguidance": (False, True), "forward_with_ig_and_cfg": (True, True)}


@pytest.fixture
def fx(fixtures_dir):
    return torch.load(fixtures_dir / "raev2" / "transport_x.pt", weights_only=False)


def _guidance_kwargs(mode: dict) -> dict:
    return dict(cfg_scale=mode["cfg_scale"], cfg_t_min=mode["cfg_interval"][0], cfg_t_max=mode["cfg_interval"][1],
                ig_scale=mode["ig_scale"], ig_t_min=mode["ig_interval"][0], ig_t_max=mode["ig_interval"][1],
                ig_unconditional_scale=mode["ig_unconditional_scale"])


def _check_calls(model: ToyModel, mode: dict, n: int, num_steps: int) -> None:
    """One call per step at RAEv2's times, never at t = 0; the doubled batch [cond; null] only while CFG
    acts (RAEv2 doubles it at every step; outside the CFG interval we skip the null half it discards)."""
    assert len(model.calls) == num_steps
    seen = torch.stack([t[0] for t, _ in model.calls])
    torch.testing.assert_close(seen, mode["t_seen"], rtol=0, atol=1e-6)
    assert all(bool((t == t[0]).all()) for t, _ in model.calls) and bool((seen > 0).all())
    lo, hi = mode["cfg_interval"]
    doubled = [mode["use_cfg"] and lo <= float(t) <= hi for t in seen]
    assert [len(t) for t, _ in model.calls] == [2 * n if d else n for d in doubled]


def test_raev2_grid(fx):
    sm = fx["sampler"]
    shift = fx["transport"]["time_dist_shift"]
    grid = sampling_grid("raev2", sm["num_steps"], shift)
    torch.testing.assert_close(grid.float(), sm["t_grid"], rtol=0, atol=1e-6)
    assert len(grid) == sm["num_steps"] + 1 and grid[0] == 1.0 and grid[-1] == 0.0
    # the default grid stays upstream RAE's: num_steps points ending at the shifted 0.001
    assert torch.equal(sampling_grid("rae", sm["num_steps"], shift), time_grid(sm["num_steps"], shift))


@pytest.mark.parametrize("name", ["none", "cfg", "cfg_interval", "ig", "ig_cfg"])
def test_guided_euler_sample_matches_raev2(fx, name):
    sm, i = fx["sampler"], fx["inputs"]
    mode = sm["modes"][name]
    assert guidance_active(mode["cfg_scale"], mode["ig_scale"], mode["ig_unconditional_scale"]) == \
        (mode["use_cfg"], mode["use_ig"]) == FORWARDS[mode["model_fn"]]
    model = ToyModel(fx["toy_model"])
    predict = guided_prediction(model, sm["y"], null_label=i["null_label"], **_guidance_kwargs(mode))
    velocity = velocity_from_x_prediction(predict, fx["transport"]["t_eps"])
    out = sample_ode(velocity, sm["noise"], num_steps=sm["num_steps"], shift=fx["transport"]["time_dist_shift"],
                     grid="raev2")
    torch.testing.assert_close(out, mode["sample"], **TOL)
    _check_calls(model, mode, len(sm["y"]), sm["num_steps"])
    if mode["use_cfg"]:
        assert all(bool((y[len(sm["y"]):] == i["null_label"]).all()) for _, y in model.calls)


def _sample_job(fx, mode: dict, method: str) -> C.SampleJob:
    """A sample job with the fixture's settings (the toy stands for a DiT-DH-IG network)."""
    sm, tr = fx["sampler"], fx["transport"]
    job = C.SampleJob()
    job.dit.model = "dit_dh_ig"
    job.dit.num_classes = fx["inputs"]["null_label"]
    job.transport.prediction, job.transport.t_eps = tr["prediction"], tr["t_eps"]
    job.transport.shift_dim = round(tr["time_dist_shift"] ** 2 * job.transport.shift_base)
    job.sampler.grid, job.sampler.num_steps = "raev2", sm["num_steps"]
    g = job.guidance
    g.method = method
    g.scale, (g.t_min, g.t_max) = mode["cfg_scale"], mode["cfg_interval"]
    g.ig_scale, (g.ig_t_min, g.ig_t_max) = mode["ig_scale"], mode["ig_interval"]
    g.ig_unconditional_scale = mode["ig_unconditional_scale"]
    return job


@pytest.mark.parametrize("name,method", [("none", "none"), ("cfg", "cfg"), ("cfg_interval", "cfg"), ("ig", "ig"),
                                         ("ig_cfg", "ig_cfg")])
def test_sample_job_config_samples_as_raev2(fx, name, method):
    sm = fx["sampler"]
    mode = sm["modes"][name]
    job = _sample_job(fx, mode, method)
    for section in ("transport", "sampler", "guidance"):
        C.validate(getattr(job, section), section + ".")
    check_sampling(job)
    shift = Transport.from_config(job.transport).shift_for(sm["noise"].shape[1:])
    assert shift == fx["transport"]["time_dist_shift"]
    model = ToyModel(fx["toy_model"])
    out = sample_latents(job, sampling_velocity(job, model, sm["y"]), sm["noise"], shift=shift,
                         seeds=range(len(sm["y"])))
    torch.testing.assert_close(out, mode["sample"], **TOL)
    _check_calls(model, mode, len(sm["y"]), sm["num_steps"])


# ----------------------------------------------------------------------------- by hand


class TextModel:
    """x-prediction conditioned on text: full = x + (1 - t) m, base = 0.5 x + (1 - t) m, m the
    mask-weighted mean of the context's first channel (all-masked rows give 0). Records batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, cond):
        context, mask = cond
        self.batches.append(x.shape[0])
        w = mask.float()
        m = (context[..., 0] * w).sum(1) / w.sum(1).clamp_min(1)
        shift = ((1 - t) * m).view(-1, 1, 1, 1)
        return x + shift, 0.5 * x + shift


def test_ig_and_cfg_with_text_conditions_by_hand():
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    null = (torch.randn(1, 5, 4, generator=g), torch.tensor([[1, 1, 0, 0, 0]]))  # batch 1: expanded
    t = torch.tensor([0.05, 0.5, 0.9])
    model = TextModel()
    out = internal_and_classifier_free_guidance(model, x, t, (context, mask), null_cond=null, ig_scale=2.0,
                                                cfg_scale=3.0, ig_t_min=0.3, ig_t_max=1.0, cfg_t_min=0.0,
                                                cfg_t_max=0.6, ig_unconditional_scale=1.5)
    assert model.batches == [6]
    fc, bc = model(x, t, (context, mask))
    fu, bu = model(x, t, (null[0].expand(3, -1, -1), null[1].expand(3, -1)))
    ig_in = torch.tensor([False, True, True]).view(-1, 1, 1, 1)
    cfg_in = torch.tensor([True, True, False]).view(-1, 1, 1, 1)
    c = torch.where(ig_in, bc + 2.0 * (fc - bc), fc)
    u = torch.where(ig_in, bu + 1.5 * (fu - bu), fu)
    torch.testing.assert_close(out, torch.where(cfg_in, u + 3.0 * (c - u), c))


def test_internal_guidance_is_one_conditional_forward():
    model = TextModel()
    x, t = torch.randn(2, 1, 2, 2), torch.tensor([0.05, 0.5])
    cond = (torch.randn(2, 3, 1), torch.ones(2, 3, dtype=torch.long))
    out = internal_guidance(model, x, t, cond, scale=1.78, t_min=0.1, t_max=1.0)
    assert model.batches == [2]
    full, base = model(x, t, cond)
    torch.testing.assert_close(out[0], full[0])  # outside the interval: the full head
    torch.testing.assert_close(out[1], (base + 1.78 * (full - base))[1])
    # no sample inside the CFG interval: IG + CFG needs the conditional half only
    model.batches.clear()
    internal_and_classifier_free_guidance(model, x, t, cond, null_cond=cond, ig_scale=1.5, cfg_scale=2.0,
                                          cfg_t_min=0.8, cfg_t_max=1.0)
    assert model.batches == [2]


def test_activation_rules_are_raev2s():
    assert guidance_active(1.0, 1.0, None) == (False, False)
    assert guidance_active(0.5, 0.5, None) == (False, False)  # scales <= 1 are off
    assert guidance_active(1.01, 1.0, 1.0) == (True, False)
    assert guidance_active(1.0, 1.0, 2.0) == (False, True)  # an unconditional IG scale alone turns IG on
    model = ToyModel({"A": torch.eye(2), "Bm": torch.zeros(2, 2), "e": torch.ones(3, 2)})
    x, t, y = torch.randn(2, 2, 1, 1), torch.tensor([0.5, 0.5]), torch.tensor([0, 1])
    torch.testing.assert_close(guided_prediction(model, y, cfg_scale=0.5)(x, t), model(x, t, y)[0])
    assert [len(tt) for tt, _ in model.calls] == [2, 2]


def test_bad_guidance_inputs_are_named():
    single = ToyModel({"A": torch.eye(2), "Bm": torch.eye(2), "e": torch.ones(3, 2)}, with_base=False)
    x, t, y = torch.randn(2, 2, 1, 1), torch.tensor([0.5, 0.5]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"internal guidance needs a model that returns \(full, base\)"):
        internal_guidance(single, x, t, y, scale=2.0)
    with pytest.raises(ValueError, match="needs exactly one of null_label"):
        guided_prediction(single, y, cfg_scale=2.0)
    with pytest.raises(ValueError, match="text condition .* needs its null condition"):
        guided_prediction(TextModel(), (torch.randn(2, 3, 1), torch.ones(2, 3)), null_label=5, cfg_scale=2.0)(x, t)
    with pytest.raises(ValueError, match="null condition of batch 3 for a batch of 2"):
        guided_prediction(single, y, null_cond=torch.tensor([5, 5, 5]), cfg_scale=2.0)(x, t)
    with pytest.raises(ValueError, match="internal-guidance interval needs t_min <= t_max"):
        guided_prediction(single, y, ig_scale=2.0, ig_t_min=0.8, ig_t_max=0.2)
    with pytest.raises(ValueError, match="grid 'raev2' is RAEv2's Euler sampler"):
        sample_ode(lambda a, b: a, x, num_steps=4, shift=1.0, method="heun", grid="raev2")
    with pytest.raises(ValueError, match="sampler grid must be one of"):
        sampling_grid("edm", 4, 1.0)


def _job(**sections) -> C.SampleJob:
    job = C.SampleJob()
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        setattr(getattr(job, section), key, value)
    return job


@pytest.mark.parametrize("changes,message", [
    (dict(sampler__grid="raev2", sampler__mode="sde"), r"'sampler.grid'=raev2 needs 'sampler.mode'=ode"),
    (dict(sampler__grid="raev2", sampler__method="heun"), r"'sampler.grid'=raev2 needs"),
    (dict(transport__prediction="x", sampler__method="dopri5"), r"'transport.prediction'=x with sampler.method=dopri5"),
    (dict(transport__prediction="x", sampler__mode="sde"), r"'transport.prediction'=x with sampler.mode=sde"),
    (dict(guidance__method="ig"), r"'guidance.method'=ig needs a network with an internal-guidance head"),
    (dict(dit__model="dit_dh_ig", guidance__method="ig", guidance__ig_t_min=0.9, guidance__ig_t_max=0.1),
     r"'guidance.ig_t_min'=0.9 is above 'guidance.ig_t_max'=0.1"),
    (dict(transport__prediction="x", guidance__method="cfg", guidance__scale=0.5), r"'guidance.scale'=0.5 is below 1"),
])
def test_unsupported_combinations_are_refused_by_name(changes, message):
    with pytest.raises(C.ConfigError, match=message):
        check_sampling(_job(**changes))


def test_supported_combinations_and_key_validation():
    for changes in (dict(), dict(sampler__grid="raev2"), dict(transport__prediction="x", sampler__method="heun"),
                    dict(guidance__method="cfg", guidance__scale=0.5),  # velocity CFG keeps any scale
                    dict(transport__prediction="x", guidance__method="autoguidance", guidance__scale=2.0),
                    dict(dit__model="dit_dh_ig", guidance__method="ig_cfg", guidance__ig_unconditional_scale=1.0)):
        check_sampling(_job(**changes))
    with pytest.raises(C.ConfigError, match="'guidance.ig_scale': bad value 0.5; allowed: a number >= 1"):
        C.validate(_job(guidance__ig_scale=0.5))
    with pytest.raises(C.ConfigError, match="'sampler.grid': bad value 'edm'; allowed: rae, raev2"):
        C.validate(_job(sampler__grid="edm"))
    with pytest.raises(C.ConfigError, match="'guidance.method': bad value 'pag'; allowed: none, cfg, autoguidance, ig"):
        C.validate(_job(guidance__method="pag"))
