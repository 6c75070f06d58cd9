"""Stage 2 on a weighted mixture of image shard folders (data.sources), encoded online (data.source=images),
in virtual epochs (training.virtual_epoch_steps): a 2-rank run preempted by SIGTERM mid-epoch resumes with
identical per-step losses and source shares, the metrics report each source's realised share near its
weight, and the epoch counter turns every virtual_epoch_steps steps.

The two sources are the tiny digits mixture (grey digits from captioned webdataset tars, colourised ones
from a class-folder tree) prepared by the real `prepare` as webdataset shards: the mixer whose position
is part of the checkpoint (exact resume on the same world size)."""
from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
from train_cli import data_overrides, preempt_then_resume, run_train, step_metric

from data_pipeline.tiny import build_digits_mixture

pytestmark = [pytest.mark.slow]

WEIGHTS = {"plain": 1, "colour": 3}
STEPS = ["training.max_steps=6", "training.virtual_epoch_steps=4", "checkpoint.every_steps=1000", "data.hflip=true"]


@pytest.fixture(scope="module")
def mixture(tiny_data, tmp_path_factory) -> list[str]:
    """The overrides of the mixture runs: the session's tiny encoder and statistics, two wds sources."""
    root = tmp_path_factory.mktemp("stage2_mix")
    specs = [NS(name=name, url=str(root / name), format="wds") for name in WEIGHTS]
    build_digits_mixture(specs, resolution=32, root=root, per_class=8, num_workers=0)  # 80 images per source
    sources = ", ".join(f"{{name: {s.name}, url: {s.url}, weight: {WEIGHTS[s.name]}, format: wds}}" for s in specs)
    return data_overrides(tiny_data) + ["data.source=images", "data.url=", f"data.sources=[{sources}]"] + STEPS


def test_stage2_mixture_in_virtual_epochs_resumes_exactly(mixture, tmp_path):
    straight = tmp_path / "straight"
    assert run_train("stage2", mixture + [f"run.dir={straight}"], 2) == 0
    losses = step_metric(straight)
    assert sorted(losses) == list(range(1, 7))
    # 16 samples per rank and step: the stratified mixer holds each share near its weight (rank 0's shares)
    colour = step_metric(straight, "data_share/colour")
    assert all(abs(colour[s] + step_metric(straight, "data_share/plain")[s] - 1) < 1e-12 for s in colour)
    assert abs(colour[6] - 0.75) <= 0.03, colour
    # virtual epochs of 4 steps: steps 1-3 in epoch 0, 4-6 in epoch 1 (the epoch the row's step ends in)
    epochs = step_metric(straight, "epoch")
    assert [epochs[s] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1], epochs

    resumed = tmp_path / "resumed"
    saved_at = preempt_then_resume("stage2", mixture, resumed, 2, after_step=2)
    assert 2 <= saved_at < 4, f"preempted at step {saved_at}, not inside the first virtual epoch"
    assert step_metric(resumed) == losses, "per-step losses after resume differ"
    assert step_metric(resumed, "data_share/colour") == colour, "source shares after resume differ"
