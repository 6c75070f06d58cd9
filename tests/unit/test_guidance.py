"""CFG and autoguidance against hand-computed values, and their forward-pass counts."""
from __future__ import annotations

import pytest
import torch

from rae_scale.diffusion import autoguidance, classifier_free_guidance, guided_velocity, sample_ode

NULL = 10


class CountingModel:
    """v = x * (y + 1) + factor * t; records the batch size of every call."""

    def __init__(self, factor=1.0):
        self.factor, self.calls = factor, []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        return x * (y.view(-1, 1).float() + 1) + self.factor * t.view(-1, 1)


def test_cfg_by_hand_inside_and_outside_the_interval():
    model = CountingModel()
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [2.0, 2.0]])
    t = torch.tensor([0.05, 0.2, 0.6, 0.6])  # first sample outside [0.2, 0.6], bounds inclusive
    y = torch.tensor([1, 2, 3, 0])
    out = classifier_free_guidance(model, x, t, y, scale=4.0, null_label=NULL, t_min=0.2, t_max=0.6)
    v_c = x * (y.view(-1, 1) + 1) + t.view(-1, 1)
    v_u = x * (NULL + 1) + t.view(-1, 1)
    expected = v_u + 4.0 * (v_c - v_u)
    expected[0] = v_c[0]
    torch.testing.assert_close(out, expected)
    assert len(model.calls) == 1 and model.calls[0][0] == 8  # one pass on the doubled batch
    assert model.calls[0][1][4:].eq(NULL).all()


def test_cfg_scale_one_and_empty_interval_cost_one_plain_pass():
    model = CountingModel()
    x, t, y = torch.randn(3, 2), torch.full((3,), 0.5), torch.tensor([1, 2, 3])
    out = classifier_free_guidance(model, x, t, y, scale=1.0, null_label=NULL)
    torch.testing.assert_close(out, model(x, t, y))
    assert [c[0] for c in model.calls] == [3, 3]
    model.calls.clear()
    out = classifier_free_guidance(model, x, t, y, scale=3.0, null_label=NULL, t_min=0.7, t_max=0.9)
    torch.testing.assert_close(out, x * (y.view(-1, 1) + 1) + 0.5)
    assert [c[0] for c in model.calls] == [3]


def test_autoguidance_by_hand():
    main, weak = CountingModel(1.0), CountingModel(-2.0)
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 2])
    t = torch.tensor([0.1, 0.5, 0.95])
    out = autoguidance(main, weak, x, t, y, scale=1.5, t_min=0.0, t_max=0.9)
    v_m = x * (y.view(-1, 1) + 1) + t.view(-1, 1)
    v_w = x * (y.view(-1, 1) + 1) - 2 * t.view(-1, 1)
    expected = v_w + 1.5 * (v_m - v_w)
    expected[2] = v_m[2]
    torch.testing.assert_close(out, expected)
    assert len(main.calls) == 1 and len(weak.calls) == 1  # no doubled batch, same labels
    assert torch.equal(weak.calls[0][1], y)
    main.calls.clear(), weak.calls.clear()
    autoguidance(main, weak, x, t, y, scale=1.0)
    assert len(main.calls) == 1 and weak.calls == []


def test_guided_velocity_drives_the_sampler():
    model = CountingModel()
    y = torch.tensor([1, 2])
    fn = guided_velocity(model, y, scale=2.0, null_label=NULL)
    out = sample_ode(fn, torch.ones(2, 2), num_steps=5, shift=1.0)
    assert out.shape == (2, 2) and len(model.calls) == 4
    assert all(c[0] == 4 for c in model.calls)
    ag = guided_velocity(model, y, scale=2.0, guide_model=CountingModel(0.0))
    torch.testing.assert_close(ag(torch.ones(2, 2), torch.full((2,), 0.5)),
                               torch.tensor([[2.0, 2.0], [3.0, 3.0]]) + 2 * 0.5)


def test_bad_guidance_arguments_are_named():
    model = CountingModel()
    with pytest.raises(ValueError, match="needs null_label"):
        guided_velocity(model, torch.tensor([1]), scale=2.0)
    with pytest.raises(ValueError, match="t_min <= t_max"):
        guided_velocity(model, torch.tensor([1]), scale=2.0, null_label=NULL, t_min=0.8, t_max=0.2)
