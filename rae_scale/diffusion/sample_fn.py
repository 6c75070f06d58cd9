"""A generator as one function: sample_fn(labels, seeds) -> uint8 images, from the sampling sections
of a config (transport, sampler, guidance), a model, a decoder and an optional guide model.

Used by `rae-scale sample` / `evaluate`, the quickstart, online FID and the training loop's sample
grids, so all of them sample the same way. Sample i depends only on its seed.
"""
from __future__ import annotations

import torch

from rae_scale.diffusion.guidance import guided_velocity
from rae_scale.diffusion.sampling import per_sample_noise, sample_ode, sample_sde
from rae_scale.diffusion.transport import Transport


def make_sample_fn(cfg, model, rae, device, guide_model=None):
    """sample_fn(labels [B], seeds [B]) -> uint8 images [B, 3, H, W]; sample i depends only on seed i.

    cfg: a SampleJob (its dit, transport, sampler, guidance and precision); rae: has .decode(z).sample.
    """
    transport = Transport(shift_dim=cfg.transport.shift_dim, shift_base=cfg.transport.shift_base)
    latent_shape = (cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size)
    shift = transport.shift_for(latent_shape)
    g = cfg.guidance
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32

    @torch.no_grad()
    def sample_fn(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        labels = labels.to(device)
        x1 = per_sample_noise((len(labels), *latent_shape), [int(s) for s in seeds], device=device)
        scale = g.scale if g.method != "none" else 1.0
        velocity = guided_velocity(model, labels, scale=scale, null_label=cfg.dit.num_classes,
                                   t_min=g.t_min, t_max=g.t_max,
                                   guide_model=guide_model if g.method == "autoguidance" else None)
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            if cfg.sampler.mode == "sde":
                z = sample_sde(velocity, x1, num_steps=cfg.sampler.num_steps, shift=shift,
                               seeds=[int(s) for s in seeds])
            else:
                z = sample_ode(velocity, x1, num_steps=cfg.sampler.num_steps, shift=shift,
                               method=cfg.sampler.method, atol=cfg.sampler.atol, rtol=cfg.sampler.rtol)
            images = rae.decode(z.float()).sample
        # ADM convention: x 255, clamp, truncate to uint8
        return (images.float().clamp(0, 1) * 255).to(torch.uint8)

    return sample_fn
