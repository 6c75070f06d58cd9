"""Text-to-image stage 2 through the real training loop (configs/stage2/tiny_t2i_cpu.yaml: DiT-DH-IG with
condition tokens from a frozen tiny Qwen3, caption dropout, x-prediction) with rae_scale's guarantees:
2 DDP ranks repeat the single process, and a 2-rank run preempted by SIGTERM resumes with identical
per-step losses and weights.

The data are the captioned colour digits, prepared by the real pipeline on first use; the images are
encoded inside the step (data.source=images), so one `prepare` is all the set-up these runs need.
"""
from __future__ import annotations

import pytest
from train_cli import assert_close, assert_same_weights, final_model, preempt_then_resume, run_train, step_metric

pytestmark = [pytest.mark.slow]

T2I = "tiny_t2i_cpu"
STEPS = ["training.max_steps=5", "checkpoint.every_steps=1000"]


def _overrides(root) -> list[str]:
    return [f"data.url={root / 'shards'}", "data.source=images", "rae.stats_path=null",
            f"rae.encoder.pretrained={root / 'encoder'}", f"text_encoder.pretrained={root / 'qwen3'}",
            # caption dropout in the draws: at 0.5 both branches are surely taken in 5 steps of 32
            "dit.class_dropout_prob=0.5"]


@pytest.fixture(scope="module")
def t2i_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    assert run_train("stage2", _overrides(root) + [f"run.dir={root / 'single'}"] + STEPS, config=T2I) == 0
    return root


def test_t2i_two_ranks_repeat_one_and_resume_exactly(t2i_root):
    single = step_metric(t2i_root / "single")
    assert len(single) == 5
    straight = t2i_root / "ddp"
    assert run_train("stage2", _overrides(t2i_root) + STEPS + [f"run.dir={straight}"], 2, config=T2I) == 0
    assert_close(step_metric(straight), single, 1e-5, "text-to-image DDP (2 ranks) vs single process")
    resumed = t2i_root / "resumed"
    saved_at = preempt_then_resume("stage2", _overrides(t2i_root) + STEPS, resumed, 2, after_step=2, config=T2I)
    assert 2 <= saved_at < 5, f"preempted at step {saved_at} of 5"
    for key in ("loss", "loss_base"):
        assert step_metric(resumed, key) == step_metric(straight, key), f"per-step {key} after resume differs"
    assert_same_weights(final_model(resumed, 5), final_model(straight, 5), "final weights after resume")
