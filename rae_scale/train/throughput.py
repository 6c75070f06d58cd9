"""Where a step's time goes, and the throughput figures of the metrics rows (memory, MFU)."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StepTimer:
    """Splits a step's wall time into data wait, forward+backward and optimizer, without stalling a GPU.

    On CUDA a device phase records a pair of events on the current stream (no synchronisation); pop(),
    called when a metrics row is written, waits for the last event once and sums the elapsed times.
    Host phases (the data wait: how long the loop blocked on its next batch) use the host clock.
    Elsewhere every phase uses the host clock: CPU work is synchronous.
    """

    HOST_PHASES = ("data",)

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self._events: list[tuple[str, object, object]] = []  # (phase, start event, end event)

    @contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda" and name not in self.HOST_PHASES:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((name, start, end))
            return
        t0 = time.perf_counter()
        yield
        self._add(name, time.perf_counter() - t0)

    def _add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def pop(self) -> dict[str, float]:
        """Seconds per phase since the last pop (the only place that waits for the device)."""
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                self._add(name, start.elapsed_time(end) / 1000.0)
            self._events = []
        out, self.totals = self.totals, {}
        return out


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except Exception:  # pragma: no cover - non-Linux
        return float("nan")


# Dense bf16 peak FLOP/s of common accelerators, for MFU; unknown devices report no MFU.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def count_params(module: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
