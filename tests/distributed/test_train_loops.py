"""The two training loops through the real CLI: strategies agree with a single process, a preempted
run resumes exactly, the loss goes down, and batch-size mistakes are clear errors.

Every run is a real `rae-scale train` process (2 gloo ranks where asked) on the tiny configs; the
dataset is built once per session under a temporary folder (the `tiny_data` fixture in
tests/conftest.py); the runs with train_cli's shared override lists are made once per session and
shared with test_loop_reference.py (which holds their recorded numbers) and the other loop tests.
"""
from __future__ import annotations

import subprocess

import pytest
from train_cli import (FSDP, REPO, STAGE1_GAN_4_STEPS, STAGE1_GAN_6_STEPS, STAGE2_5_STEPS, assert_close,
                       assert_same_weights, data_overrides, final_model, max_rel_diff, reference_run, resumed_run,
                       run_train, step_metric, train_cmd, train_env)

pytestmark = [pytest.mark.slow]

def test_stage2_single_ddp_fsdp_agree(tiny_data, tmp_path):
    losses = {name: step_metric(reference_run(tiny_data, "stage2", STAGE2_5_STEPS + extra, nproc))
              for name, (nproc, extra) in {"single": (1, []), "ddp": (2, []), "fsdp": (2, FSDP)}.items()}
    assert len(losses["single"]) == 5
    for name in ("ddp", "fsdp"):
        assert_close(losses[name], losses["single"], 1e-5, f"stage 2 {name} vs single process")
    # accumulation 2 x B/2 on one rank is the same global batch
    overrides = data_overrides(tiny_data) + STAGE2_5_STEPS + [f"run.dir={tmp_path / 'accum'}",
                                                              "training.grad_accum_steps=2"]
    assert run_train("stage2", overrides, 1) == 0
    assert_close(step_metric(tmp_path / "accum"), losses["single"], 1e-5, "accumulation 2 x B/2 vs 1 x B")


def test_stage1_with_gan_single_vs_ddp(tiny_data):
    single = reference_run(tiny_data, "stage1", STAGE1_GAN_4_STEPS)
    ddp = reference_run(tiny_data, "stage1", STAGE1_GAN_4_STEPS, nproc=2)
    assert step_metric(single, "gan_active")[4] == 1
    assert_close(step_metric(ddp), step_metric(single), 1e-5, "stage 1 (GAN on) ddp vs single")
    assert_close(step_metric(ddp, "loss_disc"), step_metric(single, "loss_disc"), 1e-5,
                 "discriminator loss ddp vs single")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_stage2_preempted_run_resumes_exactly(tiny_data, strategy):
    overrides = STAGE2_5_STEPS + (FSDP if strategy == "fsdp" else [])
    straight = reference_run(tiny_data, "stage2", overrides, nproc=2)
    resumed, _ = resumed_run(tiny_data, "stage2", overrides, 2, after_step=2)
    assert step_metric(resumed) == step_metric(straight), "per-step losses after resume differ from the uninterrupted run"
    assert_same_weights(final_model(resumed, 5), final_model(straight, 5), "final weights after resume")


def test_stage1_gan_preempted_run_resumes_exactly(tiny_data):
    """2 ranks (FSDP2 decoder), GAN on from step 3 (discriminator updates from step 2): the run
    preempted after step 3 repeats the uninterrupted one bit for bit, losses and final decoder, EMA and
    discriminator. (ZeRO-2: test_train_deepspeed.py; DDP's checkpoint path: the stage-2 resume tests.)"""
    overrides = STAGE1_GAN_6_STEPS + FSDP
    straight = reference_run(tiny_data, "stage1", overrides, nproc=2)
    resumed, saved_at = resumed_run(tiny_data, "stage1", overrides, 2, after_step=3)
    assert 3 <= saved_at < 6, f"preempted at step {saved_at} of 6"
    assert step_metric(resumed, "gan_active")[saved_at] == 1, "the GAN was not on at the resume point"
    for key in ("loss", "loss_disc"):
        assert step_metric(resumed, key) == step_metric(straight, key), \
            f"per-step {key} after resume differs from the uninterrupted run"
    weights = final_model(resumed, 6)
    assert "disc" in weights, "the stage-1 checkpoint holds no discriminator"
    assert_same_weights(weights, final_model(straight, 6), "final weights (decoder, EMA, discriminator) after resume")


def test_stage2_loss_goes_down(tiny_data, tmp_path):
    # measured: the last 10 of 60 steps average 0.50 of the first 10 (0.41 after 150 steps)
    overrides = data_overrides(tiny_data) + [f"run.dir={tmp_path / 'run'}", "training.max_steps=60",
                                              "checkpoint.every_steps=1000"]
    assert run_train("stage2", overrides, 1) == 0
    losses = step_metric(tmp_path / "run")
    first = sum(losses[s] for s in range(1, 11)) / 10
    last = sum(losses[s] for s in range(51, 61)) / 10
    assert last < 0.8 * first, f"stage-2 loss did not go down: first 10 steps {first:.4f}, last 10 {last:.4f}"


def test_stage1_loss_goes_down_with_the_gan_on(tiny_data, tmp_path):
    """50 steps of batch 8 (224 steps per epoch): discriminator updates from step 11, the
    adaptive-weighted GAN loss from step 23, so the last 28 steps train with the GAN active.
    Measured: the last 10 steps' L1 averages 0.48 of the first 10's (0.40 after 90 steps)."""
    overrides = data_overrides(tiny_data) + [f"run.dir={tmp_path / 'run'}", "training.max_steps=50",
                                             "training.global_batch_size=8", "gan.disc_start_epoch=0.1",
                                             "gan.disc_update_start_epoch=0.05", "checkpoint.every_steps=1000"]
    assert run_train("stage1", overrides, 1) == 0
    l1, gan_on = step_metric(tmp_path / "run", "loss_l1"), step_metric(tmp_path / "run", "gan_active")
    gan_weight = step_metric(tmp_path / "run", "gan_weight")
    assert [s for s in gan_on if gan_on[s]] == list(range(23, 51)), "the GAN loss is not on from step 23"
    assert all(gan_weight[s] > 0 for s in range(41, 51)), "the adaptive GAN weight is 0 at the end"
    first = sum(l1[s] for s in range(1, 11)) / 10
    last = sum(l1[s] for s in range(41, 51)) / 10
    assert last < 0.8 * first, f"stage-1 L1 did not go down: first 10 steps {first:.4f}, last 10 {last:.4f}"


def test_batch_that_does_not_divide_is_a_clear_error(tiny_data, tmp_path):
    proc = subprocess.run(train_cmd("stage2", data_overrides(tiny_data) + [f"run.dir={tmp_path}",
                                                                        "training.global_batch_size=33",
                                                                        "training.grad_accum_steps=2"]),
                          cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "training.global_batch_size=33 is not divisible by grad_accum_steps x world size" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stage2_bf16_tracks_fp32(tiny_data, tmp_path):
    """parallel.precision=bf16 (autocast compute, fp32 master weights and loss) stays near the fp32 run.

    Measured over 5 steps: step 1 is identical (the DiT's zero-initialised output layer predicts 0
    whatever the precision), steps 2-5 differ by up to 2.4e-4 relative; asserted at 5e-3.
    """
    fp32 = step_metric(reference_run(tiny_data, "stage2", STAGE2_5_STEPS))
    overrides = data_overrides(tiny_data) + [f"run.dir={tmp_path}", "training.max_steps=5",
                                             "checkpoint.every_steps=1000", "parallel.precision=bf16"]
    assert run_train("stage2", overrides, 1) == 0
    bf16 = step_metric(tmp_path)
    rel = max_rel_diff(bf16, fp32)
    print(f"bf16 vs fp32 over 5 steps: max relative loss difference {rel:.3e}")
    assert 0 < rel <= 5e-3, f"bf16 vs fp32: max relative loss difference {rel:.3e} (0 means bf16 was not used)"


def test_stage2_checks_its_decoder_at_start_and_grids_use_the_configured_sampler(tiny_data, tmp_path):
    """A decoder checkpoint that cannot be loaded stops the run before training, naming the path; the
    sample grid samples with the run's sampler, mode and guidance, and its log line says which."""
    bad = tmp_path / "no_such_decoder.safetensors"
    proc = subprocess.run(train_cmd("stage2", data_overrides(tiny_data) + [f"run.dir={tmp_path / 'bad'}",
                                                                         f"rae.decoder_checkpoint={bad}"]),
                          cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"rae.decoder_checkpoint='{bad}' could not be loaded" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists(), "the run trained before checking its decoder"

    proc = subprocess.run(train_cmd("stage2", data_overrides(tiny_data) + [
        f"run.dir={tmp_path / 'grid'}", "training.max_steps=1", "sampler.mode=sde", "sampler.num_steps=3",
        "guidance.method=cfg", "guidance.scale=2.0"]), cwd=REPO, env=train_env(), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sample grid (sde euler, 3 steps, guidance cfg 2) written to" in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "grid" / "samples" / "step-00000001.png").stat().st_size > 500
