"""Golden check against upstream RAE: Euler ODE sample and batched CFG of a tiny DiT-DH."""
from __future__ import annotations

import pytest
import torch

from rae_scale.diffusion import classifier_free_guidance, guided_velocity, sample_ode, shift_from_dim


def _build_upstream_model(fixtures_dir):
    from upstream_models import build_stage2_from_upstream

    fx = torch.load(fixtures_dir / "dit_dh_tiny.pt", weights_only=False)
    model = build_stage2_from_upstream(fx["upstream_class"], fx["upstream_params"])
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval(), fx


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_euler_ode_matches_upstream(fixtures_dir):
    model, fx = _build_upstream_model(fixtures_dir)
    e = fx["ode_euler"]
    assert e["shift"] == pytest.approx(shift_from_dim(e["shift_dim"], e["shift_base"]))
    with torch.no_grad():
        out = sample_ode(guided_velocity(model, e["y"]), e["z1"], num_steps=e["num_steps"],
                         shift=e["shift"], method="euler")
    assert _rel(out, e["final"]) < 1e-5


def test_cfg_matches_upstream(fixtures_dir):
    model, fx = _build_upstream_model(fixtures_dir)
    c = fx["cfg"]
    B = c["x"].shape[0] // 2  # upstream's inputs are the doubled batch [cond; uncond]
    null = fx["upstream_params"]["num_classes"]
    assert bool((c["y"][B:] == null).all())
    t_min, t_max = c["interval"]
    with torch.no_grad():
        out = classifier_free_guidance(model, c["x"][:B], c["t"][:B], c["y"][:B], scale=c["scale"],
                                       null_label=null, t_min=t_min, t_max=t_max)
        via_fn = guided_velocity(model, c["y"][:B], scale=c["scale"], null_label=null, t_min=t_min,
                                 t_max=t_max)(c["x"][:B], c["t"][:B])
    for half in (c["out"][:B], c["out"][B:]):  # upstream duplicates the guided half
        assert _rel(out, half) < 1e-5
    torch.testing.assert_close(via_fn, out)
