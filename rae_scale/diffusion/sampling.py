"""Samplers for the linear flow path (t = 1 noise -> t = 0 data) and per-sample noise.

`velocity_fn(x, t) -> v` takes per-sample times t of shape [B] (the shifted time the network was
trained on). Every sampler treats samples independently: a sample's trajectory depends only on its own
start point and, for the SDE, its own seed, never on which other samples share the batch.
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from rae_scale.seeding import SDE_NOISE_STREAM, derive_seed

from .transport import time_shift, x_to_velocity

logger = logging.getLogger(__name__)

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ODE_METHODS = ("euler", "heun", "dopri5")
# rae: upstream RAE's grid, num_steps points from 1 to DEFAULT_T_END (num_steps - 1 Euler steps);
# raev2: RAEv2's, num_steps Euler steps from 1 exactly to 0 (raev2_method.md section 4.4)
GRIDS = ("rae", "raev2")
DEFAULT_T_END = 1e-3  # upstream's grid stops at 1 - 0.999 before the shift


# ----------------------------------------------------------------------------- per-sample noise

def _as_seed_list(seeds) -> list[int]:
    if torch.is_tensor(seeds):
        seeds = seeds.flatten().tolist()
    out = [int(s) for s in seeds]
    if any(s < 0 for s in out):
        raise ValueError("seeds must be non-negative integers")
    return out


class PerSampleNoise:
    """One CPU torch.Generator per sample; draws are device-independent and batch-independent."""

    def __init__(self, seeds, stream: int | None = None):
        seeds = _as_seed_list(seeds)
        if stream is not None:
            seeds = [derive_seed(s, stream) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, sample_shape: Sequence[int], *, device=None, dtype=torch.float32) -> torch.Tensor:
        """Standard normal noise of shape [B, *sample_shape], sample i from generator i."""
        out = torch.stack([torch.randn(tuple(sample_shape), generator=g) for g in self.generators])
        return out.to(device=device, dtype=dtype)


def per_sample_noise(shape: Sequence[int], seeds, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Noise of `shape` (batch first) whose sample i is drawn from its own seed `seeds[i]`.

    Drawn on the CPU in float32 and then moved, so the same seed gives the same noise on any device.
    """
    seed_list = _as_seed_list(seeds)
    if len(shape) < 1 or shape[0] != len(seed_list):
        raise ValueError(f"shape {tuple(shape)} needs batch size == number of seeds ({len(seed_list)})")
    return PerSampleNoise(seed_list).randn(tuple(shape[1:]), device=device, dtype=dtype)


# ----------------------------------------------------------------------------- time grid

def time_grid(num_steps: int, shift: float, *, t_end: float = DEFAULT_T_END) -> torch.Tensor:
    """num_steps times from 1 down to t_end, evenly spaced and then shifted (float64)."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (grid points including both ends), got {num_steps}")
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"t_end must be in [0, 1), got {t_end}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    tau = 1.0 - torch.linspace(0.0, 1.0 - t_end, num_steps, dtype=torch.float64)
    return time_shift(tau, shift)


def sampling_grid(grid: str, num_steps: int, shift: float, *, t_end: float = DEFAULT_T_END) -> torch.Tensor:
    """The sampler's shifted times from 1 down (float64).

    "rae": `time_grid(num_steps, shift, t_end=t_end)`, num_steps points ending at the shifted t_end.
    "raev2": linspace(1, 0, num_steps + 1) shifted, num_steps steps ending exactly at t = 0 (t_end
    does not apply); an Euler sampler evaluates the model at every point but the last, so never at 0.
    """
    if grid == "rae":
        return time_grid(num_steps, shift, t_end=t_end)
    if grid == "raev2":
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 on the raev2 grid (Euler steps), got {num_steps}")
        return time_grid(num_steps + 1, shift, t_end=0.0)
    raise ValueError(f"sampler grid must be one of {GRIDS}, got {grid!r}")


def velocity_from_x_prediction(predict_x: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                               t_eps: float) -> VelocityFn:
    """A velocity_fn for the samplers from an x-prediction predict_x(x, t) -> x_hat (maybe guided):
    v = (x - x_hat) / max(t, t_eps), as the x-prediction was trained (transport.x_to_velocity)."""
    if not 0.0 < t_eps <= 1.0:
        raise ValueError(f"t_eps must be in (0, 1], got {t_eps}")

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_to_velocity(x, predict_x(x, t), t, t_eps)

    return velocity


def _progress(iterable, enabled: bool, desc: str):
    return tqdm(iterable, desc=desc, disable=not (enabled and sys.stderr.isatty()), leave=False)


def _tvec(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(t) and t.dim() == 1:
        return t.to(device=x.device, dtype=x.dtype)
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.view(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------- ODE

@torch.no_grad()
def sample_ode(velocity_fn: VelocityFn, x1: torch.Tensor, *, num_steps: int, shift: float,
               method: str = "euler", t_end: float = DEFAULT_T_END, atol: float = 1e-6,
               rtol: float = 1e-3, max_evals: int = 100_000, progress: bool = False,
               grid: str = "rae") -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (x1, noise) down to the last grid time.

    On the default grid "rae": euler makes num_steps - 1 evaluations on `time_grid(num_steps, shift)`
    (upstream's sampler; the state at the last grid time, about 0.0069 at 256 px, is returned as is).
    heun: 2 (num_steps - 1) evaluations on the same grid. dopri5: adaptive Dormand-Prince 5(4) from 1
    to the same end time with per-sample step sizes (atol, rtol as torchdiffeq); num_steps only fixes
    the end time. On grid "raev2" (euler only): num_steps evaluations, the last step lands on t = 0.
    """
    if method not in ODE_METHODS:
        raise ValueError(f"ODE method must be one of {ODE_METHODS}, got {method!r}")
    if grid == "raev2" and method != "euler":
        raise ValueError(f"sampler grid 'raev2' is RAEv2's Euler sampler ending exactly at t = 0; method "
                         f"{method!r} would evaluate the model at t = 0 (use method 'euler' or grid 'rae')")
    ts = sampling_grid(grid, num_steps, shift, t_end=t_end)
    if method == "dopri5":
        return _dopri5(velocity_fn, x1, float(ts[0]), float(ts[-1]), atol=atol, rtol=rtol,
                       max_evals=max_evals)
    x = x1
    for k in _progress(range(len(ts) - 1), progress, f"ode-{method}"):
        t_cur, t_next = ts[k], ts[k + 1]
        dt = float(t_next - t_cur)  # negative: we integrate towards data
        v = velocity_fn(x, _tvec(t_cur, x))
        if method == "euler":
            x = x + dt * v
        else:
            v_next = velocity_fn(x + dt * v, _tvec(t_next, x))
            x = x + 0.5 * dt * (v + v_next)
    return x


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980).
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4))


def _rms(a: torch.Tensor) -> torch.Tensor:
    return a.float().pow(2).flatten(1).mean(dim=1).sqrt()


def _dopri5(f: VelocityFn, x0: torch.Tensor, t0: float, t1: float, *, atol: float, rtol: float,
            max_evals: int) -> torch.Tensor:
    """Adaptive RK45 with an independent time and step size per sample (batch-independent results)."""
    B, direction = x0.shape[0], math.copysign(1.0, t1 - t0)
    dev = x0.device
    t = torch.full((B,), t0, dtype=torch.float64, device=dev)
    x = x0
    k1 = f(x, _tvec(t, x))
    # Initial step (Hairer, Norsett & Wanner, II.4): h0 = 0.01 * |x| / |f|, per sample.
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale), _rms(k1 / scale)
    h = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).double()
    h = h.clamp(max=abs(t1 - t0)) * direction
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    evals = 1
    while not bool(done.all()):
        if evals > max_evals:
            raise RuntimeError(f"dopri5 did not reach t={t1} within {max_evals} evaluations "
                               f"(atol={atol}, rtol={rtol})")
        remaining = (t1 - t).abs()
        last = h.abs() >= remaining
        h = torch.where(last, remaining * direction, h)
        h = torch.where(done, torch.zeros_like(h), h)
        hx = _bcast(h, x).to(x.dtype)
        ks = [k1]
        for i in range(1, 7):
            xi = x + hx * sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0.0)
            ks.append(f(xi, _tvec(t + _DP_C[i] * h, x)))
        evals += 6
        # The 7th stage point equals the 5th-order solution (first-same-as-last).
        x5 = x + hx * sum(b * k for b, k in zip(_DP_B5, ks) if b != 0.0)
        err = hx * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
        tol = atol + rtol * torch.maximum(x.abs(), x5.abs())
        err_norm = _rms(err / tol).double()
        accept = (err_norm <= 1.0) & ~done
        acc_x = _bcast(accept, x)
        x = torch.where(acc_x, x5, x)
        k1 = torch.where(acc_x, ks[6], k1)
        t = torch.where(accept, torch.where(last, torch.full_like(t, t1), t + h), t)
        done = done | (accept & last)
        factor = torch.where(err_norm == 0, torch.full_like(err_norm, 10.0),
                             (0.9 * err_norm.clamp(min=1e-12).pow(-0.2)).clamp(0.2, 10.0))
        h = h * factor
    logger.debug("dopri5 finished with %d evaluations", evals)
    return x


# ----------------------------------------------------------------------------- SDE

@torch.no_grad()
def sample_sde(velocity_fn: VelocityFn, x1: torch.Tensor, *, num_steps: int, shift: float,
               diffusion_norm: float = 1.0, t_end: float = DEFAULT_T_END, seeds=None,
               generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE with the ODE's marginals, then one denoising step.

    Diffusion coefficient: g(t)^2 = 2 w t with w = diffusion_norm. For the linear path the score is
    s(x, t) = -(x + (1 - t) v) / t, so the reverse-time drift v - g^2/2 s = v + w (x + (1 - t) v) stays
    finite at t = 1 (upstream's SBDM form is singular there, and after the time flip its sign made the
    square root NaN). Each of the num_steps - 1 steps on `time_grid(num_steps, shift)` is
        x <- x - dt [v + w (x + (1 - t) v)] + sqrt(2 w t dt) xi,   dt = t_k - t_{k+1} > 0,
    and the last grid time t is followed by the denoising jump x0 = x - t v(x, t) (the posterior mean
    E[z | x_t]). num_steps evaluations in all. Noise xi comes from per-sample `seeds` (a stream apart
    from the seeds' initial noise, batch-independent), else from `generator`, else the global RNG.
    """
    if diffusion_norm < 0:
        raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    if seeds is not None and generator is not None:
        raise ValueError("pass either seeds or generator, not both")
    ts = time_grid(num_steps, shift, t_end=t_end)
    noise_src = PerSampleNoise(seeds, stream=SDE_NOISE_STREAM) if seeds is not None else None
    if noise_src is not None and len(noise_src) != x1.shape[0]:
        raise ValueError(f"got {len(noise_src)} seeds for a batch of {x1.shape[0]}")
    x = x1
    w = float(diffusion_norm)
    for k in _progress(range(num_steps - 1), progress, "sde"):
        t_cur, t_next = float(ts[k]), float(ts[k + 1])
        dt = t_cur - t_next
        v = velocity_fn(x, _tvec(t_cur, x))
        if noise_src is not None:
            xi = noise_src.randn(x.shape[1:], device=x.device, dtype=x.dtype)
        else:
            gen_dev = generator.device if generator is not None else x.device
            xi = torch.randn(x.shape, generator=generator, device=gen_dev, dtype=x.dtype).to(x.device)
        drift = v + w * (x + (1.0 - t_cur) * v)
        x = x - dt * drift + math.sqrt(2.0 * w * t_cur * dt) * xi
    t_last = float(ts[-1])
    return x - t_last * velocity_fn(x, _tvec(t_last, x))
