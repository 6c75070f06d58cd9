"""The deterministic toy x-prediction model stored in raev2/transport_x.pt, for the transport and
guidance tests: x_full = A.x + (1 - t) e[y], x_base = Bm.x + 0.5 (1 - t) e[y] (A, Bm mix channels)."""
from __future__ import annotations

import torch


class ToyModel:
    """model(x, t, y) -> (x_full, x_base), or x_full alone with with_base=False. Records every call's
    times and batch size (the samplers' time grid and the guidance's doubled batches)."""

    def __init__(self, toy: dict, with_base: bool = True):
        self.A, self.Bm, self.e, self.with_base = toy["A"], toy["Bm"], toy["e"], with_base
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (t, y) of each call

    def __call__(self, x, t, y):
        self.calls.append((t.clone(), y.clone()))
        keep = (1 - t).view(-1, *([1] * (x.dim() - 1)))
        ey = self.e[y].view(*self.e[y].shape, *([1] * (x.dim() - 2)))
        full = torch.einsum("ij,bj...->bi...", self.A, x) + keep * ey
        if not self.with_base:
            return full
        return full, torch.einsum("ij,bj...->bi...", self.Bm, x) + 0.5 * keep * ey
