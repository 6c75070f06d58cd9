"""Classifier-free guidance and autoguidance for a network called as model(x, t, y).

Both apply v = v_ref + w (v_main - v_ref) on all channels of samples whose (shifted) time lies in
[t_min, t_max] (inclusive) and plain v_main elsewhere (rae_method.md sections 6.3, 6.4). Scale 1 is
guidance off and costs a single forward pass.
"""
from __future__ import annotations

from typing import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_interval(t_min: float, t_max: float) -> None:
    if t_min > t_max:
        raise ValueError(f"guidance interval needs t_min <= t_max, got [{t_min}, {t_max}]")


def _in_interval(t: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
    return (t >= t_min) & (t <= t_max)


def _combine(v_main, v_ref, scale, mask):
    guided = v_ref + scale * (v_main - v_ref)
    return torch.where(mask.view(-1, *([1] * (v_main.dim() - 1))), guided, v_main)


def classifier_free_guidance(model: Model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                             scale: float, null_label: int, t_min: float = 0.0,
                             t_max: float = 1.0) -> torch.Tensor:
    """Guided velocity for a batch of B samples, one forward on the doubled batch [cond; uncond].

    The unconditional half uses label `null_label` (the model's extra class row, num_classes).
    """
    _check_interval(t_min, t_max)
    mask = _in_interval(t, t_min, t_max)
    if scale == 1.0 or not bool(mask.any()):
        return model(x, t, y)
    B = x.shape[0]
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
    v_cond, v_uncond = out[:B], out[B:]
    return _combine(v_cond, v_uncond, scale, mask)


def autoguidance(model: Model, guide_model: Model, x: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor, *, scale: float, t_min: float = 0.0,
                 t_max: float = 1.0) -> torch.Tensor:
    """Autoguidance: v = v_weak + w (v_main - v_weak), the weak model on the same inputs and labels."""
    _check_interval(t_min, t_max)
    v_main = model(x, t, y)
    mask = _in_interval(t, t_min, t_max)
    if scale == 1.0 or not bool(mask.any()):
        return v_main
    return _combine(v_main, guide_model(x, t, y), scale, mask)


def guided_velocity(model: Model, y: torch.Tensor, *, scale: float = 1.0, null_label: int | None = None,
                    t_min: float = 0.0, t_max: float = 1.0,
                    guide_model: Model | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A velocity_fn(x, t) for the samplers: CFG, or autoguidance when guide_model is given."""
    _check_interval(t_min, t_max)
    if guide_model is not None:
        return lambda x, t: autoguidance(model, guide_model, x, t, y, scale=scale, t_min=t_min, t_max=t_max)
    if scale != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance with scale != 1 needs null_label (the model's "
                         "num_classes, the index of the null class)")
    if scale == 1.0:
        return lambda x, t: model(x, t, y)
    return lambda x, t: classifier_free_guidance(model, x, t, y, scale=scale, null_label=null_label,
                                                 t_min=t_min, t_max=t_max)
