"""Per-sample seeded training times: the batched path equals Transport.sample_time drawn per sample.

The stage-2 loop relies on each sample's time depending only on (seed, step, sample index), never on
the batch it sits in (1 vs 2 ranks, micro-batches); seeded_times computes the transform over the
whole batch for speed, so these tests compare it bit for bit with the per-sample reference.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from rae_scale.diffusion.transport import Transport
from rae_scale.train import loop_utils
from rae_scale.train.loop_utils import per_sample_seeds, seeded_times

TRANSPORTS = [Transport(), Transport(mu=0.4, sigma=1.6), Transport(t_max=1.0), Transport(time_dist="uniform"),
              Transport(mu=-60.0, sigma=25.0)]  # the last reaches exp overflow in the sigmoid


def _reference(transport, seeds, shift, stream):
    """Transport.sample_time(1, generator=g) with each sample's own generator, one sample at a time."""
    return torch.cat([transport.sample_time(1, shift=shift, generator=g)
                      for g in loop_utils._generators(seeds, stream)])


@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: f"{t.time_dist}-{t.mu}-{t.sigma}-{t.t_max}")
@pytest.mark.parametrize("shift", [1.0, 6.928])
def test_seeded_times_match_per_sample_sample_time(transport, shift):
    seeds = per_sample_seeds(7, 123, torch.arange(300) * 11)
    got = seeded_times(transport, seeds, shift, stream=1)
    want = _reference(transport, seeds, shift, stream=1)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
    assert loop_utils._FAST_TIMES_OK[(repr(transport), shift)]  # the batched path was the one used


def test_a_samples_time_does_not_depend_on_its_batch():
    transport = Transport(mu=0.2, sigma=1.3)
    seeds = per_sample_seeds(0, 5, torch.arange(96))
    whole = seeded_times(transport, seeds, 3.0, stream=1)
    alone = torch.cat([seeded_times(transport, [s], 3.0, stream=1) for s in seeds])
    order = torch.randperm(len(seeds), generator=torch.Generator().manual_seed(0))
    shuffled = seeded_times(transport, [seeds[i] for i in order], 3.0, stream=1)
    assert torch.equal(whole, alone)
    assert torch.equal(whole[order], shuffled)


@dataclasses.dataclass
class _HalvedTimes(Transport):
    """A transport whose sample_time differs from the batched transform: seeded_times must follow it."""

    def sample_time(self, batch_size, *, shift, generator=None, device=None):
        return super().sample_time(batch_size, shift=shift, generator=generator, device=device) * 0.5


def test_seeded_times_follows_a_changed_sample_time():
    transport = _HalvedTimes()
    seeds = per_sample_seeds(1, 2, torch.arange(20))
    assert torch.equal(seeded_times(transport, seeds, 2.0, stream=1), _reference(transport, seeds, 2.0, stream=1))
    assert loop_utils._FAST_TIMES_OK[(repr(transport), 2.0)] is False
