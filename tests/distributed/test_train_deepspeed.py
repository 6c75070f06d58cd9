"""DeepSpeed ZeRO-1/2/3 through the real training loops (`rae-scale train ... parallel.strategy=deepspeed`).

On 2 gloo ranks each ZeRO stage must repeat the single-process run (per-sample randomness is keyed by
sample id, not rank), and a preempted DeepSpeed run must resume exactly: same per-step losses and
bit-identical final fp32 master weights and EMA, read back with DeepSpeed's own zero_to_fp32
consolidation of the native checkpoint the loop stored in the step folder.
"""
from __future__ import annotations

import pytest
from train_cli import (STAGE1_GAN_4_STEPS, STAGE1_GAN_6_STEPS, STAGE2_5_STEPS, ZERO2, assert_close,
                       assert_same_weights, final_model_deepspeed, reference_run, resumed_run, step_metric)

pytestmark = [pytest.mark.slow]

STAGE2 = STAGE2_5_STEPS
DEEPSPEED = ["parallel.strategy=deepspeed"]


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_stage2_deepspeed_agrees_with_single_process(tiny_data, zero_stage):
    single = step_metric(reference_run(tiny_data, "stage2", STAGE2))
    run_dir = reference_run(tiny_data, "stage2", STAGE2 + DEEPSPEED + [f"parallel.zero_stage={zero_stage}"], nproc=2)
    assert len(single) == 5
    assert_close(step_metric(run_dir), single, 1e-5, f"stage 2 deepspeed ZeRO-{zero_stage} (2 ranks) vs single process")


def test_stage1_gan_deepspeed_zero2_agrees_with_single_process(tiny_data):
    # as test_stage1_with_gan_single_vs_ddp: the GAN loss (adaptive weight) is on from step 1,
    # the discriminator (plain DDP whatever the decoder's strategy) updates from step 0
    single = reference_run(tiny_data, "stage1", STAGE1_GAN_4_STEPS)
    ds = reference_run(tiny_data, "stage1", STAGE1_GAN_4_STEPS + ZERO2, nproc=2)
    assert step_metric(ds, "gan_active")[4] == 1
    assert_close(step_metric(ds), step_metric(single), 1e-5, "stage 1 (GAN on) deepspeed ZeRO-2 vs single")
    assert_close(step_metric(ds, "loss_disc"), step_metric(single, "loss_disc"), 1e-5,
                 "discriminator loss deepspeed ZeRO-2 vs single")


def test_stage2_deepspeed_preempted_run_resumes_exactly(tiny_data):
    overrides = STAGE2 + ZERO2
    straight = reference_run(tiny_data, "stage2", overrides, nproc=2)
    resumed, _ = resumed_run(tiny_data, "stage2", overrides, 2, after_step=2)
    assert step_metric(resumed) == step_metric(straight), "per-step losses after resume differ"
    assert_same_weights(final_model_deepspeed(resumed, 5), final_model_deepspeed(straight, 5),
                        "final weights (fp32 master, EMA) after resume")


def test_stage1_gan_deepspeed_preempted_run_resumes_exactly(tiny_data):
    """ZeRO-2 decoder, plain-DDP discriminator, 2 ranks, GAN on from step 3: the run preempted after
    step 3 repeats the uninterrupted one bit for bit (losses, fp32 master, EMA, discriminator)."""
    overrides = STAGE1_GAN_6_STEPS + ZERO2
    straight = reference_run(tiny_data, "stage1", overrides, nproc=2)
    resumed, saved_at = resumed_run(tiny_data, "stage1", overrides, 2, after_step=3)
    assert 3 <= saved_at < 6, f"preempted at step {saved_at} of 6"
    assert step_metric(resumed, "gan_active")[saved_at] == 1, "the GAN was not on at the resume point"
    for key in ("loss", "loss_disc"):
        assert step_metric(resumed, key) == step_metric(straight, key), f"per-step {key} after resume differ"
    weights = final_model_deepspeed(resumed, 6)
    assert "disc" in weights, "the stage-1 checkpoint holds no discriminator"
    assert_same_weights(weights, final_model_deepspeed(straight, 6),
                        "final weights (fp32 master, EMA, discriminator) after resume")
