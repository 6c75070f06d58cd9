"""Flow-matching transport on the linear path, with RAE's time convention (t = 1 is noise).

x_t = (1 - t) z + t eps, the network predicts the velocity dx_t/dt = eps - z. Training times are drawn
uniformly or logit-normally on [0, t_max] and then moved by the dimension-dependent shift
t <- s t / (1 + (s - 1) t), s = sqrt(m / n) (rae_method.md section 5).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

TIME_DISTS = ("uniform", "logit_normal")
DEFAULT_SHIFT_BASE = 4096


def shift_from_dim(dim: int, base: int = DEFAULT_SHIFT_BASE) -> float:
    """The dimension-dependent shift s = sqrt(dim / base)."""
    if dim <= 0 or base <= 0:
        raise ValueError(f"shift dim and base must be positive, got dim={dim}, base={base}")
    return math.sqrt(dim / base)


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Map t to s t / (1 + (s - 1) t); s > 1 moves mass towards noise (t = 1)."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class Transport:
    """Linear-path flow matching with velocity prediction.

    Args:
        time_dist: "uniform" or "logit_normal" (logit(t) ~ N(mu, sigma^2), truncated to [0, t_max]).
        shift: the time shift s; None computes it from shift_dim, or from the latent's C*H*W.
        shift_dim, shift_base: m and n of s = sqrt(m / n).
        t_max: upper end of the training times before the shift (upstream: 1 - 1/1000).
    """

    time_dist: str = "logit_normal"
    mu: float = 0.0
    sigma: float = 1.0
    shift: float | None = None
    shift_dim: int | None = None
    shift_base: int = DEFAULT_SHIFT_BASE
    t_max: float = 1.0 - 1e-3

    def __post_init__(self):
        if self.time_dist not in TIME_DISTS:
            raise ValueError(f"time_dist must be one of {TIME_DISTS}, got {self.time_dist!r}")
        if not self.sigma > 0:
            raise ValueError(f"logit-normal sigma must be > 0, got {self.sigma}")
        if not 0.0 < self.t_max <= 1.0:
            raise ValueError(f"t_max must be in (0, 1], got {self.t_max}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def shift_for(self, latent_shape: Sequence[int]) -> float:
        """The shift used for latents of per-sample shape (C, H, W) (or any shape)."""
        if self.shift is not None:
            return float(self.shift)
        dim = self.shift_dim if self.shift_dim is not None else math.prod(latent_shape)
        return shift_from_dim(dim, self.shift_base)

    def sample_time(self, batch_size: int, *, shift: float, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
        """Draw batch_size shifted training times (float32)."""
        dev = generator.device if generator is not None else device
        u = torch.rand(batch_size, generator=generator, device=dev, dtype=torch.float64)
        if self.time_dist == "uniform":
            t = u * self.t_max
        else:
            # Truncated normal in logit space by inverse CDF: u ~ U(0, Phi(b)), b the standardised
            # logit(t_max); logit(0) = -inf so the lower bound has CDF 0.
            normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64, device=dev),
                                                torch.tensor(1.0, dtype=torch.float64, device=dev))
            if self.t_max < 1.0:
                b = (math.log(self.t_max / (1 - self.t_max)) - self.mu) / self.sigma
                u = u * normal.cdf(torch.tensor(b, dtype=torch.float64, device=dev))
            u = u.clamp(1e-300, 1.0 - 1e-16)  # keep icdf finite
            t = torch.sigmoid(self.mu + self.sigma * normal.icdf(u)).clamp(0.0, self.t_max)
        t = time_shift(t, shift)
        return t.to(device=device if device is not None else t.device, dtype=torch.float32)

    @staticmethod
    def interpolate(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor):
        """Return (x_t, velocity target) for data z, noise eps and per-sample times t [B]."""
        tb = t.view(-1, *([1] * (z.dim() - 1))).to(z.dtype)
        return (1 - tb) * z + tb * eps, eps - z

    def training_loss(self, model: Callable, z: torch.Tensor, y: torch.Tensor | None, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample loss [B]: mean over all non-batch dims of (model(x_t, t, y) - (eps - z))^2.

        Times and noise come from generator (drawn on its device) or from the global RNG.
        """
        shift = self.shift_for(z.shape[1:])
        t = self.sample_time(z.shape[0], shift=shift, generator=generator, device=z.device)
        gen_dev = generator.device if generator is not None else z.device
        eps = torch.randn(z.shape, generator=generator, device=gen_dev, dtype=z.dtype).to(z.device)
        x_t, target = self.interpolate(z, eps, t)
        v = model(x_t, t.to(z.dtype), y)
        if v.shape != z.shape:
            raise ValueError(f"model output shape {tuple(v.shape)} does not match the latent shape "
                             f"{tuple(z.shape)}")
        return (v.float() - target.float()).pow(2).flatten(1).mean(dim=1)
