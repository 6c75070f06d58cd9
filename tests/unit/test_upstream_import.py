"""Every upstream RAE YAML in the fixtures imports; key values survive; nothing is lost silently."""
from pathlib import Path

import pytest

from rae_scale import config as C
from rae_scale.interop.upstream_config import import_upstream_config

from conftest import FIXTURES

UPSTREAM = FIXTURES / "upstream_configs"
ALL = sorted(UPSTREAM.rglob("*.yaml"))


def test_fixture_configs_present():
    assert len(ALL) >= 10


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(UPSTREAM)))
def test_every_upstream_config_imports_and_reloads(path, tmp_path):
    result = import_upstream_config(path)
    assert result.job in ("stage1", "stage2", "sample")
    # the output is a valid rae_scale config file of that job
    out = tmp_path / "out.yaml"
    out.write_text(C.to_yaml(result.config))
    cls = {"stage1": C.Stage1Job, "stage2": C.Stage2Job, "sample": C.SampleJob}[result.job]
    assert C.load_config(cls, out) == result.config
    # only fields with no rae_scale meaning may be dropped
    assert set(result.dropped) <= {"eval.eval_model", "eval.data_path", "eval.metrics"}


def test_dit_dh_xl_training_values():
    r = import_upstream_config(UPSTREAM / "stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml")
    cfg = r.config
    assert r.job == "stage2"
    assert cfg.dit.model == "dit_dh" and cfg.dit.hidden_size == [1152, 2048] and cfg.dit.depth == [28, 2]
    assert cfg.dit.num_heads == [16, 16] and cfg.dit.use_swiglu and cfg.dit.use_rope and cfg.dit.use_rmsnorm
    assert cfg.transport.shift_dim == 196608 and cfg.transport.shift_base == 4096
    assert cfg.transport.time_dist == "logit_normal" and cfg.transport.time_mu == 0 and cfg.transport.time_sigma == 1
    assert cfg.training.ema_decay == 0.9995 and cfg.training.global_batch_size == 1024
    assert cfg.training.clip_grad == 1.0 and cfg.run.seed == 42
    assert cfg.schedule.kind == "linear" and cfg.schedule.warmup_epochs == 40 and not cfg.schedule.warmup_from_zero
    assert cfg.schedule.decay_end_epoch == 800 and cfg.schedule.final_lr == pytest.approx(2e-5)
    assert cfg.rae.stats_path.endswith("imagenet1k/stat.pt") and cfg.rae.noise_tau == 0.0
    assert cfg.eval.every_steps == 25000


def test_stage1_gan_values():
    r = import_upstream_config(UPSTREAM / "stage1/training/DINOv2-B_decXL.yaml")
    cfg = r.config
    assert r.job == "stage1"
    assert cfg.gan.disc_weight == 0.75 and cfg.gan.disc_start_epoch == 8 and cfg.gan.disc_update_start_epoch == 6
    assert cfg.gan.max_d_weight == 1e4 and cfg.gan.kernel_size == 9 and cfg.gan.norm_type == "bn"
    assert cfg.gan.disc_patch == 8 and cfg.gan.disc_width == 384
    # the decoder's sizes are the preset's (not repeated); the output size is derived: 224/14 * 16
    assert cfg.rae.noise_tau == 0.8 and cfg.rae.decoder.preset == "XL" and cfg.rae.decoder.hidden_size == 1152
    assert cfg.rae.image_size == 256
    assert cfg.training.ema_decay == 0.9978 and cfg.optimizer.betas == [0.9, 0.95]
    assert cfg.schedule.kind == "cosine" and cfg.schedule.warmup_epochs == 1 and cfg.schedule.warmup_from_zero


def test_autoguidance_sampling_512():
    r = import_upstream_config(UPSTREAM / "stage2/sampling/ImageNet512/DiTDH-XL_DINOv2-B_decXL_AG.yaml")
    cfg = r.config
    assert r.job == "sample"
    assert cfg.guidance.method == "autoguidance" and cfg.guidance.scale == 1.5
    assert cfg.guidance.guidance_model.hidden_size == [384, 2048] and cfg.guidance.guidance_model.input_size == 32
    assert cfg.transport.shift_dim == 786432 and cfg.rae.encoder.input_size == 448 and cfg.rae.image_size == 512


def test_inconsistent_512_training_config_is_corrected_and_reported():
    r = import_upstream_config(UPSTREAM / "stage2/training/ImageNet512/DiTDH-XL_DINOv2-B.yaml")
    assert r.config.dit.input_size == 32 and r.config.transport.shift_dim == 786432
    assert r.notes and "disagrees with the encoder grid 32" in r.notes[0]


def test_encoders_map():
    kinds = {p.stem: import_upstream_config(p).config.rae.encoder for p in (UPSTREAM / "stage1/pretrained").glob("*.yaml")}
    assert kinds["MAE"].kind == "mae" and kinds["MAE"].patch_size == 16 and kinds["MAE"].input_size == 256
    assert kinds["SigLIP2"].kind == "siglip2" and kinds["DINOv2-B"].kind == "dinov2"
    assert kinds["DINOv2-B"].patch_size == 14


def test_unsupported_value_is_a_clear_error(tmp_path):
    src = (UPSTREAM / "stage2/training/ImageNet256/DiTDH-S_DINOv2-B.yaml").read_text().replace("'Linear'", "'GVP'")
    f = tmp_path / "gvp.yaml"
    f.write_text(src)
    with pytest.raises(C.ConfigError, match="path_type.*'GVP' is not supported; allowed: Linear"):
        import_upstream_config(f)


def test_more_than_one_discriminator_update_is_a_clear_error(tmp_path):
    src = (UPSTREAM / "stage1/training/DINOv2-B_decXL.yaml").read_text()
    assert "disc_updates: 1" in src
    f = tmp_path / "two_updates.yaml"
    f.write_text(src.replace("disc_updates: 1", "disc_updates: 2"))
    with pytest.raises(C.ConfigError, match="'gan.loss.disc_updates': 2 is not supported; allowed: 1"):
        import_upstream_config(f)


def test_imported_latent_shape_agrees_with_the_encoder(tmp_path):
    """stage_2 sizes are checked against the encoder's latent like a rae_scale config's."""
    cfg = import_upstream_config(UPSTREAM / "stage2/training/ImageNet256/DiTDH-S_DINOv2-B.yaml").config
    assert (cfg.dit.in_channels, cfg.dit.input_size) == C.latent_shape(cfg.rae)[:2] == (768, 16)
    assert cfg.transport.shift_dim == 768 * 16 * 16
    src = (UPSTREAM / "stage2/training/ImageNet256/DiTDH-S_DINOv2-B.yaml").read_text()
    assert "time_dist_shift_dim: 196608" in src
    f = tmp_path / "bad_shift.yaml"
    f.write_text(src.replace("time_dist_shift_dim: 196608", "time_dist_shift_dim: 1000"))
    with pytest.raises(C.ConfigError, match="'transport.shift_dim'=1000 disagrees with the latent's C\\*H\\*W"):
        import_upstream_config(f)
