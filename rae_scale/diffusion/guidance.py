"""Guidance for a network called as model(x, t, cond): CFG, autoguidance and internal guidance (IG).

Each combines two predictions as p = p_ref + w (p_main - p_ref) on all channels of samples whose
(shifted) time lies in [t_min, t_max] (inclusive) and keeps p_main elsewhere (rae_method.md sections
6.3, 6.4; raev2_method.md section 4.5). The prediction may be a velocity or an x-prediction: for fixed
x_t and t the conversion between them is affine, so guiding either is the same.

A condition `cond` is a label tensor [B] or a text condition (context [B, L, D], mask [B, L]). A
network with an internal-guidance head returns (full, base); CFG and autoguidance use its full
prediction, IG combines base and full: p = base + s (full - base).
"""
from __future__ import annotations

from typing import Callable, Union

import torch

from .transport import split_prediction

Cond = Union[torch.Tensor, tuple]
Model = Callable[[torch.Tensor, torch.Tensor, Cond], object]
PredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_interval(t_min: float, t_max: float, what: str = "guidance") -> None:
    if t_min > t_max:
        raise ValueError(f"{what} interval needs t_min <= t_max, got [{t_min}, {t_max}]")


def _in_interval(t: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
    return (t >= t_min) & (t <= t_max)


def _combine(v_main, v_ref, scale, mask):
    guided = v_ref + scale * (v_main - v_ref)
    return torch.where(mask.view(-1, *([1] * (v_main.dim() - 1))), guided, v_main)


def _full(out) -> torch.Tensor:
    return split_prediction(out)[0]


def _full_and_base(out) -> tuple[torch.Tensor, torch.Tensor]:
    full, base = split_prediction(out)
    if base is None:
        raise ValueError("internal guidance needs a model that returns (full, base) predictions (a network "
                         "with an internal-guidance head, e.g. dit_dh_ig); this one returned a single tensor")
    return full, base


# ----------------------------------------------------------------------------- conditions


def _null_condition(cond: Cond, null, batch: int) -> Cond:
    """The null condition for a batch: an int null label for label conditions, or a condition with the
    structure of `cond` (batch `batch` or 1, then expanded) as the caller made it (e.g. the empty caption)."""
    if isinstance(null, int) and not isinstance(null, bool):
        if not torch.is_tensor(cond):
            raise ValueError("a text condition (context, mask) needs its null condition (null_context, null_mask) "
                             "from the caller, not a null label")
        return torch.full_like(cond, null)
    if torch.is_tensor(cond) != torch.is_tensor(null) or (
            not torch.is_tensor(cond) and len(cond) != len(null)):
        raise ValueError("the null condition must have the structure of the condition: a label tensor, or a "
                         f"tuple of {len(cond) if not torch.is_tensor(cond) else 1} tensors")
    parts = (null,) if torch.is_tensor(null) else tuple(null)
    out = []
    for p in parts:
        if p is None:
            out.append(None)
        elif p.shape[0] in (1, batch):
            out.append(p.expand(batch, *p.shape[1:]))
        else:
            raise ValueError(f"null condition of batch {p.shape[0]} for a batch of {batch}; allowed: 1 or {batch}")
    return out[0] if torch.is_tensor(null) else tuple(out)


def _concat_conditions(cond: Cond, null: Cond) -> Cond:
    """[cond; null] along the batch, part by part for text conditions (None parts stay None)."""
    if torch.is_tensor(cond):
        return torch.cat([cond, null])
    return tuple(None if c is None else torch.cat([c, n]) for c, n in zip(cond, null))


def _null_of(null_label, null_cond):
    if (null_label is None) == (null_cond is None):
        raise ValueError("classifier-free guidance needs exactly one of null_label (the model's num_classes, the "
                         "index of the null class) and null_cond (the null condition, e.g. for text)")
    return null_cond if null_cond is not None else null_label


# ----------------------------------------------------------------------------- the guidance rules


def classifier_free_guidance(model: Model, x: torch.Tensor, t: torch.Tensor, y: Cond, *,
                             scale: float, null_label: int | None = None, null_cond: Cond | None = None,
                             t_min: float = 0.0, t_max: float = 1.0) -> torch.Tensor:
    """Guided prediction for a batch of B samples, one forward on the doubled batch [cond; null].

    The unconditional half uses label `null_label` (the model's extra class row, num_classes), or the
    condition `null_cond` (batch B or 1; text: the encoded empty caption and its mask). Scale 1, or no
    sample inside the interval, costs a single forward on the conditional batch.
    """
    _check_interval(t_min, t_max)
    null = _null_of(null_label, null_cond)
    mask = _in_interval(t, t_min, t_max)
    if scale == 1.0 or not bool(mask.any()):
        return _full(model(x, t, y))
    B = x.shape[0]
    out = _full(model(torch.cat([x, x]), torch.cat([t, t]), _concat_conditions(y, _null_condition(y, null, B))))
    return _combine(out[:B], out[B:], scale, mask)


def autoguidance(model: Model, guide_model: Model, x: torch.Tensor, t: torch.Tensor,
                 y: Cond, *, scale: float, t_min: float = 0.0,
                 t_max: float = 1.0) -> torch.Tensor:
    """Autoguidance: p = p_weak + w (p_main - p_weak), the weak model on the same inputs and labels."""
    _check_interval(t_min, t_max)
    v_main = _full(model(x, t, y))
    mask = _in_interval(t, t_min, t_max)
    if scale == 1.0 or not bool(mask.any()):
        return v_main
    return _combine(v_main, _full(guide_model(x, t, y)), scale, mask)


def internal_guidance(model: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond, *, scale: float,
                      t_min: float = 0.0, t_max: float = 1.0) -> torch.Tensor:
    """Internal guidance: one forward on the conditional batch, base + s (full - base) inside
    [t_min, t_max], full elsewhere (RAEv2's forward_with_internalguidance)."""
    _check_interval(t_min, t_max, "internal-guidance")
    full, base = _full_and_base(model(x, t, cond))
    return _combine(full, base, scale, _in_interval(t, t_min, t_max))


def internal_and_classifier_free_guidance(
        model: Model, x: torch.Tensor, t: torch.Tensor, cond: Cond, *, ig_scale: float, cfg_scale: float,
        null_label: int | None = None, null_cond: Cond | None = None, ig_t_min: float = 0.0,
        ig_t_max: float = 1.0, cfg_t_min: float = 0.0, cfg_t_max: float = 1.0,
        ig_unconditional_scale: float | None = None) -> torch.Tensor:
    """IG on both halves of one forward on [cond; null], then CFG between the guided halves.

    ig_unconditional_scale (None: ig_scale) is the IG scale of the unconditional half; each guidance
    acts inside its own interval (RAEv2's forward_with_ig_and_cfg). With no sample inside the CFG
    interval only the conditional half is needed: a single forward with internal guidance.
    """
    _check_interval(ig_t_min, ig_t_max, "internal-guidance")
    _check_interval(cfg_t_min, cfg_t_max, "classifier-free-guidance")
    null = _null_of(null_label, null_cond)
    uncond_scale = ig_scale if ig_unconditional_scale is None else ig_unconditional_scale
    cfg_mask = _in_interval(t, cfg_t_min, cfg_t_max)
    if not bool(cfg_mask.any()):
        return internal_guidance(model, x, t, cond, scale=ig_scale, t_min=ig_t_min, t_max=ig_t_max)
    B = x.shape[0]
    full, base = _full_and_base(model(torch.cat([x, x]), torch.cat([t, t]),
                                      _concat_conditions(cond, _null_condition(cond, null, B))))
    ig_mask = _in_interval(t, ig_t_min, ig_t_max)
    guided_cond = _combine(full[:B], base[:B], ig_scale, ig_mask)
    guided_uncond = _combine(full[B:], base[B:], uncond_scale, ig_mask)
    return _combine(guided_cond, guided_uncond, cfg_scale, cfg_mask)


# ----------------------------------------------------------------------------- for the samplers


def guidance_active(cfg_scale: float = 1.0, ig_scale: float = 1.0,
                    ig_unconditional_scale: float | None = None) -> tuple[bool, bool]:
    """(CFG on, IG on) by RAEv2's rules: CFG iff cfg_scale > 1; IG iff ig_scale > 1 or an unconditional
    IG scale other than 1 is given (raev2_method.md section 4.5)."""
    use_ig = ig_scale > 1.0 or (ig_unconditional_scale is not None and ig_unconditional_scale != 1.0)
    return cfg_scale > 1.0, use_ig


def guided_prediction(model: Model, cond: Cond, *, null_label: int | None = None, null_cond: Cond | None = None,
                      cfg_scale: float = 1.0, cfg_t_min: float = 0.0, cfg_t_max: float = 1.0,
                      ig_scale: float = 1.0, ig_t_min: float = 0.0, ig_t_max: float = 1.0,
                      ig_unconditional_scale: float | None = None) -> PredictFn:
    """predict(x, t) for fixed conditions: CFG, IG, both or neither, chosen by `guidance_active`.

    For an x-prediction model, `sampling.velocity_from_x_prediction` turns it into the samplers'
    velocity_fn; a velocity model's guided prediction is a velocity_fn already.
    """
    _check_interval(cfg_t_min, cfg_t_max, "classifier-free-guidance")
    _check_interval(ig_t_min, ig_t_max, "internal-guidance")
    use_cfg, use_ig = guidance_active(cfg_scale, ig_scale, ig_unconditional_scale)
    if use_cfg:
        _null_of(null_label, null_cond)
    nulls = dict(null_label=null_label, null_cond=null_cond)
    if use_cfg and use_ig:
        return lambda x, t: internal_and_classifier_free_guidance(
            model, x, t, cond, ig_scale=ig_scale, cfg_scale=cfg_scale, ig_t_min=ig_t_min, ig_t_max=ig_t_max,
            cfg_t_min=cfg_t_min, cfg_t_max=cfg_t_max, ig_unconditional_scale=ig_unconditional_scale, **nulls)
    if use_ig:
        return lambda x, t: internal_guidance(model, x, t, cond, scale=ig_scale, t_min=ig_t_min, t_max=ig_t_max)
    if use_cfg:
        return lambda x, t: classifier_free_guidance(model, x, t, cond, scale=cfg_scale, t_min=cfg_t_min,
                                                     t_max=cfg_t_max, **nulls)
    return lambda x, t: _full(model(x, t, cond))


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
