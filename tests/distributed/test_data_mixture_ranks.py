"""A weighted MDS mixture on 2 gloo ranks: preempted mid-epoch and resumed on the same 2 ranks, and on
1 rank with the same global batch (streaming's elastic resume through Stream proportions)."""
from __future__ import annotations

import gc
from types import SimpleNamespace as NS

import pytest

from conftest import run_ranks

from data_pipeline.tiny import build_digits_mixture
from distributed._workers_data import _mixture_ids, mixture_resume_worker
from rae_scale.data.mixture import SourceSpec, build_mixture_loader

pytestmark = [pytest.mark.slow]


def test_mds_mixture_resumes_on_the_same_and_on_another_world_size(tmp_path):
    srcs = [NS(name=n, url=str(tmp_path / n), format="mds") for n in ("plain", "colour")]
    build_digits_mixture(srcs, resolution=16, root=tmp_path, per_class=4, num_workers=0)  # 40 + 40 samples
    specs = [SourceSpec(s.name, s.url, w, "mds") for s, w in zip(srcs, (1.0, 3.0))]
    results = run_ranks(mixture_resume_worker, 2, specs, 3, 4)
    n = 80 // 8
    for full, before, after, state, counts in results:
        assert len(full) == 2 * n and full[:n] != full[n:]
        assert before + after == full[n:]  # same world size: exactly the ids that followed
        assert state["epoch"] == 1 and state["sample_in_epoch"] == 3 * 8
        assert sum(counts) == (n + n) * 4  # counted over epoch 1 (state) and the resumed rest
    global_batches = [sorted(results[0][0][t] + results[1][0][t]) for t in range(2 * n)]
    epoch0 = [i for b in global_batches[:n] for i in b]
    assert sum(i < 40 for i in epoch0) == 20  # streaming draws the epoch with the weights: 1/4 of 80
    one = build_mixture_loader(specs, batch_size=8, rank=0, world_size=1, seed=7, hflip=True, with_ids=True)
    one.load_state_dict(results[0][3])
    resumed = [sorted(b) for b in _mixture_ids(one, n - 3)]
    del one
    gc.collect()
    assert resumed == global_batches[n + 3:]  # another world size: the same global batches
