"""A generator as one function: sample_fn(labels, seeds) -> uint8 images, from the sampling sections
of a config (transport, sampler, guidance), a model, a decoder and an optional guide model.

Used by `rae-scale sample` / `evaluate`, the quickstart, online FID and the training loop's sample
grids, so all of them sample the same way. Sample i depends only on its seed. The two steps inside,
`sampling_velocity` (the network under the config's prediction and guidance) and `sample_latents`
(the config's sampler), are public so that they can be checked on their own.
"""
from __future__ import annotations

import torch

from rae_scale.config.derive import check_sampling
from rae_scale.diffusion.guidance import autoguidance, guided_prediction, guided_velocity
from rae_scale.diffusion.sampling import (VelocityFn, per_sample_noise, sample_ode, sample_sde,
                                         velocity_from_x_prediction)
from rae_scale.diffusion.transport import Transport

RAEV2_RULES_METHODS = ("ig", "ig_cfg")  # guidance methods that exist only with RAEv2's activation rules


def sampling_velocity(cfg, model, labels, guide_model=None, null_cond=None) -> VelocityFn:
    """velocity_fn(x, t) of `model` for fixed conditions under cfg's transport.prediction and guidance.

    labels: class labels [B], or a text condition (tokens, mask) with its null condition `null_cond`
    (the empty caption's). A velocity model with labels and none / cfg / autoguidance samples exactly as
    before the x-prediction path existed. Otherwise guidance acts on the prediction with RAEv2's
    activation rules (guided_prediction), and an x-prediction is turned into a velocity with
    1 / max(t, transport.t_eps).
    """
    g, prediction = cfg.guidance, cfg.transport.prediction
    text = null_cond is not None
    null_label = None if text else cfg.dit.num_classes
    if g.method == "autoguidance" and guide_model is None and (prediction == "x" or text):
        raise ValueError("guidance.method=autoguidance needs the guide model (guidance.guidance_model)")
    if prediction == "velocity" and g.method not in RAEV2_RULES_METHODS and not text:
        scale = g.scale if g.method != "none" else 1.0
        return guided_velocity(model, labels, scale=scale, null_label=null_label, t_min=g.t_min, t_max=g.t_max,
                               guide_model=guide_model if g.method == "autoguidance" else None)
    if g.method == "autoguidance":
        def predict(x, t):
            return autoguidance(model, guide_model, x, t, labels, scale=g.scale, t_min=g.t_min, t_max=g.t_max)
    else:
        use_cfg, use_ig = g.method in ("cfg", "ig_cfg"), g.method in ("ig", "ig_cfg")
        predict = guided_prediction(
            model, labels, null_label=null_label, null_cond=null_cond,
            cfg_scale=g.scale if use_cfg else 1.0, cfg_t_min=g.t_min, cfg_t_max=g.t_max,
            ig_scale=g.ig_scale if use_ig else 1.0, ig_t_min=g.ig_t_min, ig_t_max=g.ig_t_max,
            ig_unconditional_scale=g.ig_unconditional_scale if g.method == "ig_cfg" else None)
    return velocity_from_x_prediction(predict, cfg.transport.t_eps) if prediction == "x" else predict


def sample_latents(cfg, velocity: VelocityFn, x1: torch.Tensor, *, shift: float, seeds) -> torch.Tensor:
    """Run cfg's sampler (mode, method, num_steps, grid) from the noise x1 at t = 1 to the data end."""
    s = cfg.sampler
    if s.mode == "sde":
        return sample_sde(velocity, x1, num_steps=s.num_steps, shift=shift, seeds=seeds)
    return sample_ode(velocity, x1, num_steps=s.num_steps, shift=shift, method=s.method, atol=s.atol,
                      rtol=s.rtol, grid=s.grid)


def make_sample_fn(cfg, model, rae, device, guide_model=None, text_encoder=None):
    """sample_fn(conditions, seeds [B]) -> uint8 images [B, 3, H, W]; sample i depends only on seed i
    (and its condition).

    cfg: a SampleJob (its dit, transport, sampler, guidance and precision); rae: has .decode(z).sample.
    conditions: class labels [B]; for a text-conditioned model (text_encoder given), a list of B prompts
    (the empty prompt is the null condition; guidance's unconditional half uses it).
    """
    check_sampling(cfg)
    if (cfg.dit.condition_type == "text") != (text_encoder is not None):
        raise ValueError(f"dit.condition_type={cfg.dit.condition_type} samples "
                         f"{'with' if cfg.dit.condition_type == 'text' else 'without'} a text encoder")
    latent_shape = (cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size)
    shift = Transport.from_config(cfg.transport).shift_for(latent_shape)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32

    @torch.no_grad()
    def sample_fn(labels, seeds: torch.Tensor) -> torch.Tensor:
        seed_list = [int(s) for s in seeds]
        if text_encoder is not None:  # prompts -> (tokens, mask), outside autocast as in training
            cond, null = text_encoder.condition(list(labels)), text_encoder.null_condition(1)
        else:
            cond, null = labels.to(device), None
        x1 = per_sample_noise((len(labels), *latent_shape), seed_list, device=device)
        velocity = sampling_velocity(cfg, model, cond, guide_model, null_cond=null)
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            z = sample_latents(cfg, velocity, x1, shift=shift, seeds=seed_list)
            images = rae.decode(z.float()).sample
        # ADM convention: x 255, clamp, truncate to uint8
        return (images.float().clamp(0, 1) * 255).to(torch.uint8)

    return sample_fn
