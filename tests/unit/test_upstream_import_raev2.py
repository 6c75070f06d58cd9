"""RAEv2 stage-2 YAML (nanovisionx/RAEv2 layout) imports: values key by key, the dropped keys with their
reasons, RAEv2's guidance activation rules, and clear refusals (text conditioning first of all).

The YAML below is our own small excerpt with RAEv2's keys and structure (configs/stage2/training/
imagenet-*.yaml, dataclasses in src/configs/stage2.py), tiny sizes, values chosen here.
"""
import copy

import pytest
import yaml

from rae_scale import config as C
from rae_scale.interop.upstream_config import import_upstream_config, is_raev2_config

from conftest import FIXTURES

LABEL_TRAINING = """
stage_1:
  target: stage1.RAE
  params:
    encoder_name: dinov3mls-vit-s16[layers=3.5.7]
    resolution: 64
    decoder_config_path: configs/decoder/ViTB
    pretrained_decoder_path: weights/decoder.pt
    noise_tau: 0.0
    normalization_stat_path: weights/stats.pt
stage_2:
  target: stage2.models.DDT.DiTwDDTHeadIG
  params:
    input_size: 4
    patch_size: [1, 1]
    in_channels: 32
    hidden_size: [64, 96]
    depth: [4, 1]
    num_heads: [4, 2]
    mlp_ratio: 2.0
    base_model_depth: 3
conditioning:
  type: label
  cfg_dropout_prob: 0.2
  arch:
    num_t_tokens: 3
    num_c_tokens: 5
transport:
  prediction: x
  time_dist_type: logit-normal_0.5_1.5
  t_eps: 0.04
sampler:
  num_steps: 12
guidance:
  cfg:
    scale: 1.0
    t_min: 0.1
    t_max: 0.9
dataset:
  target: imagenet
  type: hf
  data_dir: ./data/tiny
  split: train
  condition_type: label
training:
  epochs: 6
  global_batch_size: 64
  grad_accum_steps: 2
  ema_decay: 0.999
  num_workers: 3
  log_interval: 7
  checkpoint_interval: 2
  sample_every: 11
  clip_grad: 0.5
  global_seed: 5
  optimizer:
    type: gmuon
    lr: 0.0003
    momentum: 0.9
    nesterov: false
    ns_coefficients_preset: POLAR_EXPRESS_COEFFICIENTS
    ns_use_kernels: false
    weight_decay: 0.01
  scheduler:
    type: linear
    warmup_epochs: 2
    decay_end_epoch: 4
    base_lr: 0.0003
    final_lr: 3.0e-05
    warmup_from_zero: false
  image_size: 64
eval:
  eval_interval: 40
  eval_model: false
  eval_dir: results/eval
  datasets:
    tiny:
      type: hf
      split: val
      metrics: [fid]
misc:
  latent_size: [32, 4, 4]
  num_classes: 10
  time_dist_shift_dim: 512
  time_dist_shift_base: 128
"""

DROP_REASONS = {  # dropped key -> a phrase its reason must contain
    "stage_1.params.encoder_name": "no rae_scale encoder kind",
    "dataset.target": "cached latents", "dataset.data_dir": "cached latents", "dataset.split": "cached latents",
    "training.optimizer.ns_use_kernels": "kernel choice",
    "eval.eval_model": "eval.reference", "eval.eval_dir": "eval.reference", "eval.datasets.tiny.type": "eval.reference",
    "eval.datasets.tiny.split": "eval.reference", "eval.datasets.tiny.metrics": "eval.reference",
}


def base() -> dict:
    return yaml.safe_load(LABEL_TRAINING)


def run_import(tmp_path, data: dict, name: str = "raev2.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return import_upstream_config(path)


def refused(tmp_path, data: dict, match: str) -> None:
    with pytest.raises(C.ConfigError, match=match):
        run_import(tmp_path, data)


def test_detection_keeps_rae_v1_configs_on_their_path():
    assert is_raev2_config(base())
    for path in sorted((FIXTURES / "upstream_configs").rglob("*.yaml")):
        assert not is_raev2_config(yaml.safe_load(path.read_text())), path


def test_label_training_config_maps_key_by_key(tmp_path):
    src = base()
    r = run_import(tmp_path, src)
    cfg = r.config
    assert r.job == "stage2" and isinstance(cfg, C.Stage2Job)
    p, arch = src["stage_2"]["params"], src["conditioning"]["arch"]
    d = cfg.dit
    assert (d.model, d.preset, d.patch_size) == ("dit_dh_ig", None, p["patch_size"][0])
    assert (d.input_size, d.in_channels, d.mlp_ratio) == (p["input_size"], p["in_channels"], p["mlp_ratio"])
    assert (d.hidden_size, d.depth, d.num_heads) == (p["hidden_size"], p["depth"], p["num_heads"])
    assert d.base_model_depth == p["base_model_depth"] and d.learn_time_frequencies and d.checkpoint is None
    assert (d.num_t_tokens, d.num_c_tokens) == (arch["num_t_tokens"], arch["num_c_tokens"])
    assert d.class_dropout_prob == src["conditioning"]["cfg_dropout_prob"]
    assert d.num_classes == src["misc"]["num_classes"]

    t, misc = cfg.transport, src["misc"]
    assert (t.prediction, t.time_dist, t.time_mu, t.time_sigma, t.time_max) == ("x", "logit_normal", 0.5, 1.5, 1.0)
    assert t.t_eps == src["transport"]["t_eps"] and t.base_model_coeff == 1.0
    assert (t.shift_dim, t.shift_base) == (misc["time_dist_shift_dim"], misc["time_dist_shift_base"])
    s = cfg.sampler
    assert (s.grid, s.mode, s.method, s.num_steps) == ("raev2", "ode", "euler", src["sampler"]["num_steps"])
    g, cfg_block = cfg.guidance, src["guidance"]["cfg"]
    assert g.method == "none"  # CFG scale 1 is off and there is no ig block (RAEv2's default: off)
    assert (g.scale, g.t_min, g.t_max) == (cfg_block["scale"], cfg_block["t_min"], cfg_block["t_max"])

    o, opt = cfg.optimizer, src["training"]["optimizer"]
    assert (o.kind, o.lr, o.momentum, o.nesterov) == ("muon", opt["lr"], opt["momentum"], opt["nesterov"])
    assert (o.weight_decay, o.ns_safety_factor, o.betas, o.eps) == (opt["weight_decay"], 1.05, [0.9, 0.95], 1e-8)
    sc, sched = cfg.schedule, src["training"]["scheduler"]
    assert (sc.kind, sc.warmup_from_zero, sc.final_lr) == ("linear", False, sched["final_lr"])
    assert (sc.warmup_epochs, sc.decay_end_epoch, sc.warmup_steps, sc.decay_end_step) == (2.0, 4.0, 0, None)
    assert sc.decay_start_epoch is None and sc.decay_start_step is None  # RAEv2 decays from the warmup's end
    tr, train = cfg.training, src["training"]
    assert (tr.global_batch_size, tr.grad_accum_steps, tr.epochs, tr.max_steps) == (64, 2, 6.0, None)
    assert (tr.ema_decay, tr.clip_grad) == (train["ema_decay"], train["clip_grad"])
    assert cfg.parallel.precision == "bf16" and any("--precision" in n for n in r.notes)
    assert (cfg.run.seed, cfg.data.num_workers) == (train["global_seed"], train["num_workers"])
    assert (cfg.logging.every_steps, cfg.logging.sample_every_steps) == (train["log_interval"], train["sample_every"])
    assert cfg.checkpoint.every_epochs == 2 and cfg.eval.every_steps == 40
    assert cfg.data.hflip is False  # RAEv2 does not flip hf / wds datasets

    rae, sp = cfg.rae, src["stage_1"]["params"]
    assert (rae.stats_path, rae.decoder_checkpoint) == (sp["normalization_stat_path"], sp["pretrained_decoder_path"])
    assert (rae.decoder.preset, rae.decoder.patch_size, rae.noise_tau, rae.image_size) == ("B", 16, 0.0, 64)
    # the encoder cannot be represented: a weightless stand-in stating the latent's sizes
    assert rae.encoder.pretrained is None and C.latent_shape(rae) == tuple(misc["latent_size"])
    assert any("stand-in" in n for n in r.notes)


def test_dropped_keys_are_listed_with_reasons(tmp_path):
    r = run_import(tmp_path, base())
    assert set(r.dropped) == set(DROP_REASONS)
    for key, phrase in DROP_REASONS.items():
        assert phrase in r.reasons[key], (key, r.reasons[key])
    assert all(line.startswith(key + ": ") for line, key in zip(r.dropped_with_reasons(), r.dropped))


def test_imported_config_reloads_as_a_rae_scale_config(tmp_path):
    r = run_import(tmp_path, base())
    out = tmp_path / "out.yaml"
    out.write_text(C.to_yaml(r.config))
    assert C.load_config(C.Stage2Job, out) == r.config


def test_disabled_settings_are_dropped_with_their_reason(tmp_path):
    src = base()
    src["repa"] = {"use_repa": False, "repa_layer_depth": 8, "repa_coeff": 0.5}
    src["stage_2"]["params"].update(use_cfg_conds=False, enable_repa=False)
    src["conditioning"]["arch"].update(num_cfg_omega_tokens=4, n_action_tokens=4)
    src["conditioning"]["text_encoder"] = {"model_name": "some/text-model", "max_length": 16}
    src["training"]["optimizer"]["adamw_lr"] = 0.001
    src["training"]["batch_size"] = 8
    r = run_import(tmp_path, src)
    phrases = {"repa.use_repa": "REPA loss is off", "repa.repa_layer_depth": "REPA loss is off",
               "repa.repa_coeff": "REPA loss is off", "stage_2.params.enable_repa": "REPA loss is off",
               "stage_2.params.use_cfg_conds": "CFG-scale tokens",
               "conditioning.arch.num_cfg_omega_tokens": "use_cfg_conds",
               "conditioning.arch.n_action_tokens": "navigation-world-model",
               "conditioning.text_encoder.model_name": "label conditioning",
               "conditioning.text_encoder.max_length": "label conditioning",
               "training.optimizer.adamw_lr": "scheduler.base_lr",
               "training.batch_size": "global_batch_size is set"}
    assert set(r.dropped) == set(DROP_REASONS) | set(phrases)
    for key, phrase in phrases.items():
        assert phrase in r.reasons[key], (key, r.reasons[key])


def test_text_conditioned_config_is_refused(tmp_path):
    src = base()
    src["conditioning"].update(type="text", text_encoder={"model_name": "some/text-model", "max_length": 16})
    refused(tmp_path, src, r"'conditioning.type': 'text' \(text-to-image\) is not supported yet.*allowed: label")
    # RAEv2 takes the dataset's condition type when conditioning.type is left at label
    src = base()
    src["dataset"]["condition_type"] = "text"
    refused(tmp_path, src, r"'dataset.condition_type': 'text' \(text-to-image\) is not supported yet")
    src = base()
    src["conditioning"]["type"] = "nwm"
    refused(tmp_path, src, r"'conditioning.type': 'nwm' is not supported.*allowed: label")


# (cfg scale, ig block) -> guidance.method by RAEv2's rules; None: no ig block (its default, off)
GUIDANCE_CASES = [
    (1.0, None, "none"),
    (1.0, {"scale": 1.78, "t_min": 0.1, "t_max": 1.0}, "ig"),
    (1.0, {"scale": 1.0, "t_min": 0.0, "t_max": 1.0}, "none"),
    (3.0, {"scale": 0.0, "t_min": 0.0, "t_max": 1.0}, "cfg"),  # IG scale <= 1: off
    (3.0, {"scale": 1.5, "t_min": 0.2, "t_max": 0.8, "unconditional_scale": 1.0}, "ig_cfg"),
    (3.0, {"scale": 1.0, "t_min": 0.0, "t_max": 1.0, "unconditional_scale": 0.5}, "ig_cfg"),  # on by uncond
]


@pytest.mark.parametrize("cfg_scale,ig,method", GUIDANCE_CASES)
def test_guidance_method_follows_raev2_activation_rules(tmp_path, cfg_scale, ig, method):
    src = base()
    src["guidance"]["cfg"]["scale"] = cfg_scale
    if ig is not None:
        src["guidance"]["ig"] = copy.deepcopy(ig)
    g = run_import(tmp_path, src).config.guidance
    assert g.method == method and g.scale == cfg_scale
    if ig is not None and method in ("ig", "ig_cfg"):
        assert (g.ig_scale, g.ig_t_min, g.ig_t_max) == (ig["scale"], ig["t_min"], ig["t_max"])
        assert g.ig_unconditional_scale == ig.get("unconditional_scale")


def test_ig_scale_that_cannot_be_stored(tmp_path):
    src = base()
    src["guidance"]["ig"] = {"scale": 0.0, "t_min": 0.0, "t_max": 1.0}
    r = run_import(tmp_path, src)
    assert r.config.guidance.ig_scale == 1.0 and "internal guidance is off" in r.reasons["guidance.ig.scale"]
    src["guidance"]["ig"] = {"scale": 0.5, "unconditional_scale": 2.0}  # on (by uncond) with a scale below 1
    refused(tmp_path, src, r"'guidance.ig.scale': 0.5 with internal guidance on .*allowed: >= 1")


def test_sampling_config_with_weights_is_a_sample_job(tmp_path):
    src = base()
    src["stage_2"]["ckpt"] = "weights/stage2.pt"
    src["sampler"]["num_steps"] = 30
    src["guidance"]["ig"] = {"scale": 1.78, "t_min": 0.1, "t_max": 1.0}
    r = run_import(tmp_path, src)
    assert r.job == "sample" and isinstance(r.config, C.SampleJob)
    assert r.config.checkpoint == r.config.dit.checkpoint == "weights/stage2.pt"
    assert r.config.sampler.num_steps == 30 and r.config.guidance.method == "ig"
    assert "training.optimizer.lr" in r.dropped and "sample job" in r.reasons["training.optimizer.lr"]
    out = tmp_path / "out.yaml"
    out.write_text(C.to_yaml(r.config))
    assert C.load_config(C.SampleJob, out) == r.config


def test_model_params_win_over_the_typed_blocks(tmp_path):
    """RAEv2 fills stage_2.params with setdefault: cond_arch / base_model_depth given there win."""
    src = base()
    src["stage_2"]["params"]["cond_arch"] = {"num_t_tokens": 2, "num_c_tokens": 6}
    src["internal_guidance"] = {"base_model_depth": 1, "base_model_coeff": 0.5}
    r = run_import(tmp_path, src)
    d = r.config.dit
    assert (d.num_t_tokens, d.num_c_tokens, d.base_model_depth) == (2, 6, 3)
    assert r.config.transport.base_model_coeff == 0.5
    assert "cond_arch wins" in r.reasons["conditioning.arch.num_t_tokens"]
    assert "wins" in r.reasons["internal_guidance.base_model_depth"]


def test_schedule_points_in_steps_and_virtual_epochs(tmp_path):
    src = base()
    src["training"]["scheduler"].update(warmup_steps=30, decay_end_steps=90)
    r = run_import(tmp_path, src)
    sc = r.config.schedule
    assert (sc.warmup_steps, sc.decay_end_step, sc.warmup_epochs, sc.decay_end_epoch) == (30, 90, None, None)
    assert "warmup_steps is set" in r.reasons["training.scheduler.warmup_epochs"]
    # an epoch of virtual_epoch_steps batches: epoch points become steps (grad_accum 2 -> 50 steps/epoch)
    src = base()
    src["training"]["virtual_epoch_steps"] = 100
    cfg = run_import(tmp_path, src).config
    assert (cfg.training.max_steps, cfg.training.epochs) == (300, None)
    assert (cfg.schedule.warmup_steps, cfg.schedule.decay_end_step) == (100, 200)
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.every_epochs) == (100, None)


def test_scheduler_base_lr_sets_the_lr_and_no_scheduler_is_constant(tmp_path):
    src = base()
    src["training"]["optimizer"]["lr"] = 0.01
    r = run_import(tmp_path, src)
    assert r.config.optimizer.lr == src["training"]["scheduler"]["base_lr"]
    assert any("base_lr" in n for n in r.notes)
    del src["training"]["scheduler"]
    cfg = run_import(tmp_path, src).config
    assert cfg.optimizer.lr == 0.01 and cfg.schedule.kind == "constant" and cfg.schedule.warmup_steps == 0


@pytest.mark.parametrize("edit,match", [
    (lambda s: s["transport"].pop("prediction"), r"'transport.prediction': 'velocity' is not supported.*allowed: x"),
    (lambda s: s["transport"].update(time_dist_type="uniform"), r"'transport.time_dist_type': 'uniform'"),
    (lambda s: s.update(repa={"use_repa": True}), r"'repa.use_repa': true needs online encoding .* rae.encoder is a "
                                                   r"weightless stand-in"),
    (lambda s: s["stage_2"]["params"].update(use_cfg_conds=True), r"'stage_2.params.use_cfg_conds': true"),
    (lambda s: s["stage_2"]["params"].update(patch_size=[1, 2]), r"'stage_2.params.patch_size': \[1, 2\]"),
    (lambda s: s["stage_2"].update(target="stage2.models.DDT.DiTwDDTHead"), r"no internal-guidance head"),
    (lambda s: s["training"]["optimizer"].update(ns_coefficients_preset="OTHER"),
     r"'training.optimizer.ns_coefficients_preset': 'OTHER' is not supported; allowed: POLAR_EXPRESS"),
    (lambda s: s["training"]["scheduler"].update(type="step"), r"'training.scheduler.type': 'step'"),
    (lambda s: s["misc"].pop("time_dist_shift_dim"),
     r"'misc.time_dist_shift_dim': 196608 \(RAEv2's default when the key is absent\) is not the latent's "
     r"C\*H\*W = 512"),
    (lambda s: s["stage_1"]["params"].update(resolution=256), r"'stage_1.params.resolution': 256 does not give"),
    (lambda s: s["training"].pop("global_batch_size"), r"'training.global_batch_size' is not set"),
    (lambda s: s["stage_2"]["params"].update(num_classes=12), r"'stage_2.params.num_classes' 12 disagrees"),
])
def test_unrepresentable_values_are_refused_clearly(tmp_path, edit, match):
    src = base()
    edit(src)
    refused(tmp_path, src, match)


def _with_repa(repa: dict) -> dict:
    """base() on RAEv2's DINOv3-L latent (which maps to real weights) at a 16x16 grid, the grid of RAEv2's REPA
    target (DINOv2-B/14 at 224 px), with this repa block."""
    src = base()
    src["stage_1"]["params"].update(encoder_name="dinov3-vit-l16", resolution=256)
    src["stage_2"]["params"].update(in_channels=1024, input_size=16)
    src["misc"].update(latent_size=[1024, 16, 16], time_dist_shift_dim=1024 * 16 * 16)
    src["training"]["image_size"] = 256
    src["repa"] = repa
    return src


def test_repa_maps_to_the_projector_and_the_repa_section(tmp_path):
    src = _with_repa({"use_repa": True, "repa_layer_depth": 2, "repa_coeff": 0.25, "target_encoder": "dinov2-vit-b",
                      "target_encoder_resolution": 256, "z_dim": None})
    r = run_import(tmp_path, src)
    cfg = r.config
    assert (cfg.dit.repa_depth, cfg.dit.repa_dim, cfg.repa.coeff) == (2, 768, 0.25)
    e = cfg.repa.encoder
    assert (e.kind, e.pretrained, e.hidden_size, e.num_layers, e.num_heads, e.patch_size, e.input_size, e.layers) == (
        "dinov2", "facebook/dinov2-with-registers-base", 768, 12, 12, 14, 224, None)
    # the targets are encoded from the step's images: online encoding of RAEv2's image folder
    assert (cfg.data.source, cfg.data.url) == ("images", src["dataset"]["data_dir"])
    assert any("REPA: data.source=images" in n for n in r.notes)
    assert "overwrites it" in r.reasons["repa.z_dim"]
    for key in ("repa.use_repa", "repa.repa_layer_depth", "repa.repa_coeff", "repa.target_encoder"):
        assert key not in r.dropped, key
    out = tmp_path / "out.yaml"
    out.write_text(C.to_yaml(cfg))
    assert C.load_config(C.Stage2Job, out) == cfg
    # the model's params win (RAEv2 fills them with setdefault); RAEv2's defaults fill the rest
    src = _with_repa({"use_repa": True, "repa_layer_depth": 2})
    src["stage_2"]["params"].update(enable_repa=True, repa_layer_depth=3, z_dim=768)
    r = run_import(tmp_path, src)
    assert (r.config.dit.repa_depth, r.config.dit.repa_dim, r.config.repa.coeff) == (3, 768, 0.5)
    assert "wins" in r.reasons["repa.repa_layer_depth"]
    assert r.config.repa.encoder.pretrained == "facebook/dinov2-with-registers-base"
    # a sampling config builds the projector (so the weights load) and drops the training settings
    src = _with_repa({"use_repa": True, "repa_layer_depth": 2, "repa_coeff": 0.25})
    src["stage_2"]["ckpt"] = "weights/ep-0000080.pt"
    r = run_import(tmp_path, src)
    assert r.job == "sample" and (r.config.dit.repa_depth, r.config.dit.repa_dim) == (2, 768)
    assert "sampling config" in r.reasons["repa.repa_coeff"]


@pytest.mark.parametrize("edit,match", [
    (lambda s: s["stage_2"]["params"].update(enable_repa=False),
     r"'stage_2.params.enable_repa': false with repa.use_repa true .* allowed: true or absent"),
    (lambda s: s["repa"].update(use_repa=False) or s["stage_2"]["params"].update(enable_repa=True),
     r"'stage_2.params.enable_repa': true with repa.use_repa false .* not supported for training"),
    (lambda s: s["repa"].update(target_encoder="dinov2-vit-b[norm]"),
     r"'repa.target_encoder': 'dinov2-vit-b\[norm\]' has no rae_scale equivalent"),
    (lambda s: s["repa"].update(target_encoder_resolution=128), r"'repa.target_encoder_resolution': 128 gives"),
    (lambda s: s["stage_2"]["params"].update(z_dim=12), r"'stage_2.params.z_dim': 12 is not the REPA target width 768"),
    (lambda s: s["repa"].update(target_encoder_resolution=512), r"the REPA target grid 32x32 .* DiT's patch grid 16x16"),
    (lambda s: s["repa"].pop("repa_layer_depth"), r"'dit.repa_depth'=8 is deeper than the body"),  # RAEv2's default
])
def test_repa_settings_rae_scale_cannot_train_are_refused(tmp_path, edit, match):
    src = _with_repa({"use_repa": True, "repa_layer_depth": 2})
    edit(src)
    refused(tmp_path, src, match)


@pytest.mark.parametrize("name, layers", [("dinov3mls-vit-l16[layers=11.13.15.17.19.21.23]", [11, 13, 15, 17, 19, 21, 23]),
                                          ("dinov3-vit-l16", None)])
def test_raev2_dinov3_encoder_maps_to_kind_dinov3(tmp_path, name, layers):
    src = base()
    src["stage_1"]["params"]["encoder_name"] = name
    src["stage_2"]["params"]["in_channels"] = 1024
    src["misc"].update(latent_size=[1024, 4, 4], time_dist_shift_dim=1024 * 4 * 4)
    r = run_import(tmp_path, src)
    e = r.config.rae.encoder
    assert (e.kind, e.pretrained, e.layers) == ("dinov3", "facebook/dinov3-vitl16-pretrain-lvd1689m", layers)
    assert C.latent_shape(r.config.rae) == (1024, 4, 4) and "stage_1.params.encoder_name" not in r.dropped
    assert not any("stand-in" in n for n in r.notes)
    # RAEv2's one-layer multi-layer encoder adds a pooled term that a one-layer list here does not
    src["stage_1"]["params"]["encoder_name"] = "dinov3mls-vit-l16[layers=23]"
    refused(tmp_path, src, "has no rae_scale equivalent")
    src["stage_1"]["params"]["encoder_name"] = name
    src["stage_2"]["params"]["in_channels"] = 32
    src["misc"].update(latent_size=[32, 4, 4], time_dist_shift_dim=32 * 4 * 4)
    refused(tmp_path, src, "gives 1024 latent channels")
