"""Flow-matching transport on the linear path, with RAE's time convention (t = 1 is noise).

x_t = (1 - t) z + t eps. The network predicts either the velocity dx_t/dt = eps - z (RAE) or the data
z itself (RAEv2's x-prediction, raev2_method.md section 4.1), whose loss is taken in velocity space:
v_hat = (x_t - x_hat) / max(t, t_eps) against (x_t - z) / max(t, t_eps). A network with an
internal-guidance head returns (full, base) and both parts are trained; RAEv2's optional REPA term is
added from the network's projector output (`repa_loss`). Training times are drawn
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
PREDICTIONS = ("velocity", "x")
DEFAULT_SHIFT_BASE = 4096
DEFAULT_T_EPS = 0.05  # RAEv2's clamp of 1/t in the x-prediction loss and sampler


def shift_from_dim(dim: int, base: int = DEFAULT_SHIFT_BASE) -> float:
    """The dimension-dependent shift s = sqrt(dim / base)."""
    if dim <= 0 or base <= 0:
        raise ValueError(f"shift dim and base must be positive, got dim={dim}, base={base}")
    return math.sqrt(dim / base)


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Map t to s t / (1 + (s - 1) t); s > 1 moves mass towards noise (t = 1)."""
    return shift * t / (1 + (shift - 1) * t)


def x_to_velocity(x_t: torch.Tensor, x_hat: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """The velocity (x_t - x_hat) / max(t, t_eps) of an x-prediction x_hat at per-sample times t [B].

    The clamp keeps the 1/t weight finite near the data end; above t_eps it is the exact velocity of the
    linear path given the prediction.
    """
    return (x_t - x_hat) / t.view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype).clamp_min(t_eps)


def split_prediction(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(full, base) of a network output: a tensor, or the pair (full, base) of an internal-guidance model."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"a model that returns a tuple must return (full, base), got {len(out)} items")
        return out[0], out[1]
    return out, None


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RAEv2's explicit REPA term per sample [B]: the mean over tokens and channels of (projected - target)^2
    in float32 (plain MSE, not REPA's negative cosine; its batch mean is RAEv2's F.mse_loss)."""
    if projected.shape != target.shape:
        raise ValueError(f"REPA projector output shape {tuple(projected.shape)} does not match the target shape "
                         f"{tuple(target.shape)} (tokens and width of the target encoder)")
    return (projected.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class LossParts:
    """Per-sample losses [B] of one batch: total = full + base_model_coeff * base + repa_coeff * repa (base is
    None for a network without an internal-guidance head, repa None without a REPA target)."""

    total: torch.Tensor
    full: torch.Tensor
    base: torch.Tensor | None = None
    repa: torch.Tensor | None = None


@dataclass
class Transport:
    """Linear-path flow matching with velocity or x-prediction.

    Args:
        time_dist: "uniform" or "logit_normal" (logit(t) ~ N(mu, sigma^2), truncated to [0, t_max]).
        shift: the time shift s; None computes it from shift_dim, or from the latent's C*H*W.
        shift_dim, shift_base: m and n of s = sqrt(m / n).
        t_max: upper end of the training times before the shift (upstream RAE: 1 - 1/1000; RAEv2: 1,
            no truncation).
        prediction: what the network returns, "velocity" (eps - z) or "x" (the data z).
        t_eps: x-prediction only: the clamp of t in 1 / max(t, t_eps) (RAEv2: 0.05).
        base_model_coeff: weight of the base head's loss for networks that return (full, base).
    """

    time_dist: str = "logit_normal"
    mu: float = 0.0
    sigma: float = 1.0
    shift: float | None = None
    shift_dim: int | None = None
    shift_base: int = DEFAULT_SHIFT_BASE
    t_max: float = 1.0 - 1e-3
    prediction: str = "velocity"
    t_eps: float = DEFAULT_T_EPS
    base_model_coeff: float = 1.0

    @classmethod
    def from_config(cls, section) -> "Transport":
        """The transport of a config's `transport` section (rae_scale.config.schema.TransportConfig)."""
        return cls(time_dist=section.time_dist, mu=section.time_mu, sigma=section.time_sigma,
                   shift_dim=section.shift_dim, shift_base=section.shift_base, t_max=section.time_max,
                   prediction=section.prediction, t_eps=section.t_eps, base_model_coeff=section.base_model_coeff)

    def __post_init__(self):
        if self.time_dist not in TIME_DISTS:
            raise ValueError(f"time_dist must be one of {TIME_DISTS}, got {self.time_dist!r}")
        if not self.sigma > 0:
            raise ValueError(f"logit-normal sigma must be > 0, got {self.sigma}")
        if not 0.0 < self.t_max <= 1.0:
            raise ValueError(f"t_max must be in (0, 1], got {self.t_max}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not 0.0 < self.t_eps <= 1.0:
            raise ValueError(f"t_eps must be in (0, 1], got {self.t_eps}")
        if not self.base_model_coeff >= 0.0:
            raise ValueError(f"base_model_coeff must be >= 0, got {self.base_model_coeff}")

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
        t = self.time_from_uniform(u, shift)
        return t.to(device=device if device is not None else t.device)

    def time_from_uniform(self, u: torch.Tensor, shift: float) -> torch.Tensor:
        """Shifted training times (float32) from float64 uniforms u in [0, 1), one per sample.

        Each time depends on its own u only, bit for bit, whatever the batch (see _sigmoid_per_element):
        the loops draw u per sample from seeded generators, and a sample's time must not change with
        the rank or micro-batch it lands in.
        """
        if self.time_dist == "uniform":
            t = u * self.t_max
        else:
            # Truncated normal in logit space by inverse CDF: u ~ U(0, Phi(b)), b the standardised
            # logit(t_max); logit(0) = -inf so the lower bound has CDF 0.
            normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64, device=u.device),
                                                torch.tensor(1.0, dtype=torch.float64, device=u.device))
            if self.t_max < 1.0:
                b = (math.log(self.t_max / (1 - self.t_max)) - self.mu) / self.sigma
                u = u * normal.cdf(torch.tensor(b, dtype=torch.float64, device=u.device))
            u = u.clamp(1e-300, 1.0 - 1e-16)  # keep icdf finite
            t = _sigmoid_per_element(self.mu + self.sigma * normal.icdf(u)).clamp(0.0, self.t_max)
        return time_shift(t, shift).to(dtype=torch.float32)

    @staticmethod
    def interpolate(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor):
        """Return (x_t, velocity target) for data z, noise eps and per-sample times t [B]."""
        tb = t.view(-1, *([1] * (z.dim() - 1))).to(z.dtype)
        return (1 - tb) * z + tb * eps, eps - z

    def input_and_target(self, z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor):
        """(x_t, the velocity target of the loss): eps - z for velocity prediction; for x-prediction
        RAEv2's (x_t - z) / max(t, t_eps), which equals eps - z for t >= t_eps."""
        x_t, target = self.interpolate(z, eps, t)
        if self.prediction == "x":
            target = x_to_velocity(x_t, z, t, self.t_eps)
        return x_t, target

    def training_loss(self, model: Callable, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B] (the total of `loss_parts`; its parts are there for logging).

        The caller draws the times t [B] (sample_time or time_from_uniform) and the noise eps, so
        their seeding stays the loop's business; model(x_t, t) returns the prediction.
        """
        return self.loss_parts(model, z, t, eps).total

    def loss_parts(self, model: Callable, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                   repa_target: torch.Tensor | None = None, repa_coeff: float = 0.0) -> LossParts:
        """Per-sample losses [B]: mean over all non-batch dims of the squared velocity error.

        velocity: (v_hat - (eps - z))^2 with v_hat = model(x_t, t). x: (v_hat - v_t)^2 with
        v_hat = (x_t - x_hat) / max(t, t_eps) and v_t = (x_t - z) / max(t, t_eps) (RAEv2's loss, equal to
        eps - z for t >= t_eps). A model that returns (full, base) adds base_model_coeff times the
        same loss of its base head. With repa_target [B, N, D] the model returns (prediction, projector
        output) (dit_dh_ig's return_intermediate) and repa_coeff times `repa_loss` is added (RAEv2's REPA).
        """
        x_t, target = self.input_and_target(z, eps, t)
        out = model(x_t, t)
        repa = None
        if repa_target is not None:
            out, projected = out
            repa = repa_loss(projected, repa_target)
        full, base = split_prediction(out)
        loss_full = self._per_sample_loss(full, x_t, t, target, "model output")
        total = loss_full
        loss_base = None
        if base is not None:
            loss_base = self._per_sample_loss(base, x_t, t, target, "base head output")
            total = total + self.base_model_coeff * loss_base
        if repa is not None:
            total = total + repa_coeff * repa
        return LossParts(total=total, full=loss_full, base=loss_base, repa=repa)

    def _per_sample_loss(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                         what: str) -> torch.Tensor:
        if out.shape != x_t.shape:
            raise ValueError(f"{what} shape {tuple(out.shape)} does not match the latent shape "
                             f"{tuple(x_t.shape)}")
        return self.elementwise_loss(out, x_t, t, target).flatten(1).mean(dim=1)

    def elementwise_loss(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                         target: torch.Tensor) -> torch.Tensor:
        """(v_hat - target)^2 in float32 before any reduction; v_hat is `out`, or for x-prediction
        (x_t - out) / max(t, t_eps). target is the velocity target of `loss_parts`."""
        if self.prediction == "x":
            out = x_to_velocity(x_t.float(), out.float(), t, self.t_eps)
        return (out.float() - target.float()).pow(2)


def _sigmoid_per_element(x: torch.Tensor) -> torch.Tensor:
    """Element-wise 1 / (1 + exp(-x)) in float64 as torch's scalar kernel computes it (libm exp).

    torch.sigmoid on a batch takes a SIMD path whose exp differs from libm's in the last bit for a
    few % of float64 inputs; on a batch of one it takes the scalar path, which this repeats for
    every element, so a sample's time is the same alone or in any batch.
    """
    out = []
    for v in x.tolist():
        try:
            out.append(1.0 / (1.0 + math.exp(-v)))
        except OverflowError:  # exp(-v) = inf in C: the sigmoid is 0
            out.append(0.0)
    return torch.tensor(out, dtype=torch.float64, device=x.device)
