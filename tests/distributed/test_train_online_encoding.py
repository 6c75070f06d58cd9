"""Stage 2 with online encoding (data.source=images): the frozen encoder runs inside the step on image
shards, flipping each sample as a both-flips latent cache would hand it out, with the same per-sample
seeding. Its losses equal those of the session's reference run on the cache of the same images."""
from __future__ import annotations

import pytest
from train_cli import REPO, STAGE2_5_STEPS, data_overrides, reference_run, run_train, step_metric

from rae_scale import config as C
from rae_scale.train.metrics import read_metrics

pytestmark = [pytest.mark.slow]


def test_online_encoding_repeats_the_cached_run(tiny_data, tmp_path):
    cached = reference_run(tiny_data, "stage2", STAGE2_5_STEPS)
    online = tmp_path / "online"
    assert run_train("stage2", data_overrides(tiny_data) + STAGE2_5_STEPS + [f"run.dir={online}",
                                                                            "data.source=images"]) == 0
    want, got = step_metric(cached), step_metric(online)
    assert got.keys() == want.keys() and len(got) == 5
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-6 * abs(loss), (step, got[step], loss)
    # the metrics report the encoder's share of the step; the cached run has no such column
    assert all(v > 0 for v in step_metric(online, "time_encode_s").values())
    assert all("time_encode_s" not in row for row in read_metrics(str(cached)))
    # online encoding needs image shards
    with pytest.raises(C.ConfigError, match="data.url"):
        C.load_config(C.Stage2Job, REPO / "configs/stage2/tiny_cpu.yaml", ["data.source=images", "data.url="])
