"""Config system: overrides, type/range errors, typo suggestions, round trip, secret redaction, derived
fields (latent shape, presets), removed keys and the shared generator section."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rae_scale import config as C

REPO = Path(__file__).resolve().parents[2]
TINY2 = REPO / "configs/stage2/tiny_cpu.yaml"


def test_yaml_then_overrides_win():
    cfg = C.load_config(C.Stage2Job, TINY2, ["training.max_steps=7", "optimizer.lr=3e-4",
                                             "dit.hidden_size=[32,64]", "rae.stats_path=null"])
    assert cfg.training.max_steps == 7
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.dit.hidden_size == [32, 64]
    assert cfg.rae.stats_path is None
    # untouched YAML values survive
    assert cfg.dit.in_channels == 32 and cfg.data.latents_url == "data/tiny/latents"


def test_free_form_dict_override():
    cfg = C.load_config(C.Stage2Job, None, ["parallel.deepspeed.zero_optimization.overlap_comm=true"])
    assert cfg.parallel.deepspeed == {"zero_optimization": {"overlap_comm": True}}


@pytest.mark.parametrize("override, fragment", [
    ("training.max_stesp=3", "unknown config key 'training.max_stesp'; did you mean 'training.max_steps'?"),
    ("trainin.max_steps=3", "unknown config key 'trainin'; did you mean 'training'?"),
    ("parallel.strategy=zero", "config key 'parallel.strategy': bad value 'zero'; allowed: ddp, fsdp, deepspeed"),
    ("training.max_steps=abc", "config key 'training.max_steps': bad value 'abc'; allowed: an integer or null"),
    ("training.ema_decay=1.5", "config key 'training.ema_decay': bad value 1.5; allowed: <= 1.0"),
    ("optimizer.lr=-1", "config key 'optimizer.lr': bad value -1"),
    ("parallel.zero_stage=4", "config key 'parallel.zero_stage': bad value 4; allowed: 1, 2, 3"),
    ("parallel.tf32=maybe", "config key 'parallel.tf32': bad value 'maybe'; allowed: true or false"),
])
def test_bad_values_name_key_value_and_allowed(override, fragment):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(C.Stage2Job, TINY2, [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("training:\n  global_bach_size: 8\n")
    with pytest.raises(C.ConfigError, match="did you mean 'training.global_batch_size'"):
        C.load_config(C.Stage2Job, f)


def test_cli_error_is_one_line_exit_2_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "rae_scale.commands.cli", "config", "show", "stage2", str(TINY2),
                           "training.max_stesp=3"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["rae-scale: error: unknown config key 'training.max_stesp'; did you mean 'training.max_steps'?"]
    assert "Traceback" not in proc.stderr


def test_resolved_config_round_trip(tmp_path):
    cfg = C.load_config(C.Stage1Job, REPO / "configs/stage1/tiny_cpu.yaml", ["gan.disc_weight=0.5"])
    url = C.save_resolved(cfg, str(tmp_path / "run"))
    data = yaml.safe_load(Path(url).read_text())
    back = C.from_dict(C.Stage1Job, data)
    assert back == cfg
    # and the saved file loads as a config file again
    assert C.load_config(C.Stage1Job, url) == cfg


def test_secrets_are_redacted_everywhere(tmp_path):
    cfg = C.load_config(C.Stage2Job, TINY2, ["run.storage_options.secret=S3CR3T",
                                             "run.storage_options.key=AKIAXXX",
                                             "run.storage_options.client_kwargs.endpoint_url=http://127.0.0.1:9"])
    text = C.to_yaml(cfg)
    assert "S3CR3T" not in text and "AKIAXXX" not in text
    assert "http://127.0.0.1:9" in text  # not a secret
    url = C.save_resolved(cfg, str(tmp_path))
    assert "S3CR3T" not in Path(url).read_text()
    proc = subprocess.run([sys.executable, "-m", "rae_scale.commands.cli", "config", "show", "stage2", str(TINY2),
                           "run.storage_options.secret=S3CR3T"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "S3CR3T" not in proc.stdout + proc.stderr and "***" in proc.stdout


def test_every_shipped_config_loads():
    jobs = {"stage1": C.Stage1Job, "stage2": C.Stage2Job, "eval": C.EvalJob, "data": C.PrepareJob}
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        if f.parent.name == "sweeps":
            continue  # sweep files (a base config and its grid) are checked by tests/unit/test_sweep_grid.py
        cls = C.CacheTextJob if f.name.startswith("cache_text") else jobs[f.parent.name]
        C.load_config(cls, f)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["prepare", "--help"], ["evaluate", "fid", "--help"],
                                  ["launch", "--help"], ["config", "import-upstream", "--help"], ["quickstart", "--help"],
                                  ["generate", "--help"], ["reconstruct", "--help"], ["convert", "--help"],
                                  ["cache-latents", "--help"], ["stats", "--help"], ["sample", "--help"],
                                  ["cache-text", "--help"], ["plan", "--help"], ["sweep", "--help"]])
def test_every_subcommand_has_help(argv):
    from rae_scale.commands.cli import main

    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 0


# ----------------------------------------------------------------------------- derived fields (issue 15.4)


def test_latent_shape_is_derived_from_the_encoder():
    cfg = C.load_config(C.Stage2Job, TINY2)
    # tiny encoder: hidden 32, input 32, patch 4 -> latent [32, 8, 8]
    assert C.latent_shape(cfg.rae) == (32, 8, 8)
    assert (cfg.dit.in_channels, cfg.dit.input_size, cfg.transport.shift_dim) == (32, 8, 32 * 8 * 8)
    assert cfg.rae.image_size == 8 * cfg.rae.decoder.patch_size == 32
    bigger = C.load_config(C.Stage2Job, TINY2, ["rae.encoder.input_size=64", "rae.encoder.hidden_size=48"])
    assert (bigger.dit.in_channels, bigger.dit.input_size, bigger.transport.shift_dim) == (48, 16, 48 * 16 * 16)
    assert bigger.rae.image_size == 64


def test_derived_values_given_explicitly_must_agree():
    same = C.load_config(C.Stage2Job, TINY2, ["dit.in_channels=32", "dit.input_size=8", "transport.shift_dim=2048",
                                              "rae.image_size=32"])
    assert same == C.load_config(C.Stage2Job, TINY2)


@pytest.mark.parametrize("override, fragments", [
    ("dit.in_channels=768", ["'dit.in_channels'=768", "'rae.encoder.hidden_size'", "= 32"]),
    ("dit.input_size=16", ["'dit.input_size'=16", "'rae.encoder.input_size'/'rae.encoder.patch_size' (32/4) = 8"]),
    ("transport.shift_dim=196608", ["'transport.shift_dim'=196608", "'rae.encoder.hidden_size'", "= 2048"]),
    ("rae.image_size=256", ["'rae.image_size'=256", "'rae.decoder.patch_size'", "= 32"]),
])
def test_disagreeing_derived_value_names_both_keys(override, fragments):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(C.Stage2Job, TINY2, [override])
    msg = str(err.value)
    assert all(f in msg for f in fragments), msg
    assert "leave" in msg and "null" in msg and "\n" not in msg


def test_guidance_model_and_eval_job_are_derived_and_checked_too(tmp_path):
    ag = C.load_config(C.Stage2Job, TINY2, ["guidance.method=autoguidance", "guidance.guidance_model.preset=null",
                                            "guidance.guidance_model.hidden_size=[32,64]",
                                            "guidance.guidance_model.depth=[1,1]",
                                            "guidance.guidance_model.num_heads=[2,2]"])
    assert (ag.guidance.guidance_model.in_channels, ag.guidance.guidance_model.input_size) == (32, 8)
    with pytest.raises(C.ConfigError, match="'guidance.guidance_model.input_size'=16 disagrees"):
        C.load_config(C.Stage2Job, TINY2, ["guidance.guidance_model.input_size=16"])
    ev = C.load_config(C.EvalJob, REPO / "configs/eval/fid50k_256.yaml")
    assert (ev.sample.dit.in_channels, ev.sample.dit.input_size, ev.sample.transport.shift_dim) == (768, 16, 196608)
    with pytest.raises(C.ConfigError, match="'sample.dit.in_channels'=32 disagrees"):
        C.load_config(C.EvalJob, REPO / "configs/eval/fid50k_256.yaml", ["sample.dit.in_channels=32"])


def test_encoder_input_must_split_into_patches():
    with pytest.raises(C.ConfigError, match="'rae.encoder.input_size'=30 is not a multiple of 'rae.encoder.patch_size'=4"):
        C.load_config(C.Stage2Job, TINY2, ["rae.encoder.input_size=30"])


def test_shipped_configs_state_no_derived_field():
    """Each fact once: the latent shape lives in rae.encoder only."""
    for f in sorted((REPO / "configs").rglob("*.yaml")):
        data = yaml.safe_load(f.read_text())
        data = data.get("sample", data)
        assert not {"in_channels", "input_size"} & set(data.get("dit") or {}), f
        assert "shift_dim" not in (data.get("transport") or {}), f
        assert "image_size" not in (data.get("rae") or {}), f


# ----------------------------------------------------------------------------- presets vs explicit sizes


def test_preset_with_conflicting_size_is_an_error():
    stage1 = REPO / "configs/stage1/dinov2_b_decxl_256.yaml"
    with pytest.raises(C.ConfigError) as err:
        C.load_config(C.Stage1Job, stage1, ["rae.decoder.num_layers=12"])
    assert "'rae.decoder.num_layers'=12 conflicts with 'rae.decoder.preset'=XL" in str(err.value)
    assert "num_layers=28" in str(err.value)
    with pytest.raises(C.ConfigError, match=r"'dit.hidden_size'=\[64, 128\] conflicts with 'dit.preset'=S"):
        C.load_config(C.Stage2Job, TINY2, ["dit.preset=S"])


def test_preset_with_equal_or_null_sizes_is_fine():
    stage1 = REPO / "configs/stage1/dinov2_b_decxl_256.yaml"
    equal = C.load_config(C.Stage1Job, stage1, ["rae.decoder.hidden_size=1152", "rae.decoder.num_layers=28"])
    # the resolved config states the model fully: what the preset gives fills the sizes left null
    assert equal.rae.decoder.preset == "XL" and equal.rae.decoder.num_heads == 16
    s = C.load_config(C.Stage2Job, REPO / "configs/stage2/dit_dh_s_256.yaml", ["dit.hidden_size=[384,2048]"])
    assert s.dit.preset == "S" and s.dit.depth == [12, 2] and s.dit.num_heads == [6, 16]
    # a saved resolved config (preset and the sizes it gives) loads again unchanged
    again = C.from_dict(C.Stage2Job, C.to_dict(s))
    assert again.dit == s.dit


def test_no_preset_needs_every_size():
    with pytest.raises(C.ConfigError, match="'dit.preset' is null, so 'dit.hidden_size', 'dit.depth', 'dit.num_heads'"):
        C.load_config(C.Stage2Job, None, ["dit.preset=null"])
    with pytest.raises(C.ConfigError, match="'rae.decoder.preset' is null, so 'rae.decoder.intermediate_size'"):
        C.load_config(C.Stage2Job, TINY2, ["rae.decoder.intermediate_size=null"])
    with pytest.raises(C.ConfigError, match=r"'dit.depth': bad value \[2\]; allowed: a list of 2"):
        C.load_config(C.Stage2Job, TINY2, ["dit.depth=[2]"])


def test_preset_built_model_matches_explicit_sizes():
    from rae_scale.builders import dit_kwargs

    cfg = C.load_config(C.Stage2Job, REPO / "configs/stage2/dit_dh_s_256.yaml")
    explicit = C.load_config(C.Stage2Job, REPO / "configs/stage2/dit_dh_s_256.yaml",
                             ["dit.hidden_size=[384,2048]", "dit.depth=[12,2]", "dit.num_heads=[6,16]"])
    assert dit_kwargs(cfg.dit) == dit_kwargs(explicit.dit) and dit_kwargs(cfg.dit)["hidden_size"] == [384, 2048]


# ----------------------------------------------------------------------------- keys that did nothing


def test_removed_keys_are_clear_errors(tmp_path):
    data = yaml.safe_load((REPO / "configs/stage1/tiny_cpu.yaml").read_text())
    data["gan"]["disc_updates"] = 1  # even at the value the loop has always used
    stage1 = tmp_path / "s1.yaml"
    stage1.write_text(yaml.safe_dump(data))
    for args in ((stage1, []), (REPO / "configs/stage1/tiny_cpu.yaml", ["gan.disc_updates=2"])):
        with pytest.raises(C.ConfigError, match="config key 'gan.disc_updates' was removed: .*one discriminator update"):
            C.load_config(C.Stage1Job, *args)
    with pytest.raises(C.ConfigError, match="config key 'backend' was removed"):
        C.load_config(C.EvalJob, REPO / "configs/eval/fid50k_256.yaml", ["backend=ray"])


def test_configs_saved_by_older_versions_still_load_when_removed_keys_were_inert():
    cfg = C.load_config(C.Stage1Job, REPO / "configs/stage1/tiny_cpu.yaml")
    old = C.to_dict(cfg)
    old["gan"]["disc_updates"] = 1  # what every saved stage-1 config held
    assert C.from_dict(C.Stage1Job, old) == cfg
    old["gan"]["disc_updates"] = 3
    with pytest.raises(C.ConfigError, match="'gan.disc_updates' was removed"):
        C.from_dict(C.Stage1Job, old)
    ev = C.to_dict(C.load_config(C.EvalJob, REPO / "configs/eval/fid50k_256.yaml"))
    assert C.from_dict(C.EvalJob, {**ev, "backend": "torch"}) == C.from_dict(C.EvalJob, ev)


def test_data_source_rules_at_load():
    # stage 2 encodes online from image shards (data.url or a mixture in data.sources), or reads one latent
    # cache (in epochs of the cache or virtual ones)
    assert C.load_config(C.Stage2Job, TINY2, ["data.source=images"]).data.source == "images"
    assert C.load_config(C.Stage2Job, TINY2, ["training.virtual_epoch_steps=10"]).training.virtual_epoch_steps == 10
    with pytest.raises(C.ConfigError) as err:
        C.load_config(C.Stage2Job, TINY2, ["data.source=images", "data.url="])
    msg = str(err.value)
    assert "'data.url': stage 2 with data.source=images (online encoding) reads prepared image shards" in msg
    assert "\n" not in msg
    mix = ["data.url=", "data.sources=[{url: a, weight: 1}, {url: b, weight: 3}]"]
    assert [s.weight for s in C.load_config(C.Stage2Job, TINY2, ["data.source=images", *mix]).data.sources] == [1, 3]
    with pytest.raises(C.ConfigError, match="'data.sources': a mixture of image shard folders is encoded online"):
        C.load_config(C.Stage2Job, TINY2, mix)
    with pytest.raises(C.ConfigError, match="'data.source': bad value 'latents'; stage 1 trains the decoder on images"):
        C.load_config(C.Stage1Job, REPO / "configs/stage1/tiny_cpu.yaml", ["data.source=latents"])


# ----------------------------------------------------------------------------- one generator section


def test_stage2_sample_and_eval_share_one_generator_section():
    shared = [f.name for f in dataclasses.fields(C.GeneratorSections)]
    assert shared == ["run", "rae", "dit", "transport", "sampler", "guidance", "text_encoder"]
    for job in (C.Stage2Job, C.SampleJob):
        assert issubclass(job, C.GeneratorSections) and [f.name for f in dataclasses.fields(job)][:len(shared)] == shared
    assert C.EvalJob().sample == C.SampleJob()


def test_from_generator_copies_the_generator_sections():
    s2 = C.load_config(C.Stage2Job, TINY2)
    job = C.from_generator(C.SampleJob, s2, seed=s2.run.seed, num_samples=3)
    for name in ("run", "rae", "dit", "transport", "sampler", "guidance", "text_encoder"):
        assert getattr(job, name) == getattr(s2, name) and getattr(job, name) is not getattr(s2, name)
    assert (job.seed, job.num_samples, job.checkpoint) == (0, 3, None)
    back = C.from_generator(C.Stage2Job, job)
    assert back.dit == s2.dit and back.training == C.Stage2Job().training


def test_choice_default_is_the_first_unless_named():
    assert C.ParallelConfig().strategy == "ddp" and C.ParallelConfig().zero_stage == 2
    assert C.CheckpointConfig().preemption_signal == "SIGUSR2"
    with pytest.raises(C.ConfigError, match="allowed: SIGUSR1, SIGUSR2, SIGINT"):
        C.load_config(C.Stage2Job, None, ["checkpoint.preemption_signal=SIGTERM"])


def test_resume_value_takes_a_bare_step_folder_name():
    """config.fields spells the step-folder prefix itself (no torch at config load): it must match the layout's."""
    from rae_scale.checkpoint.layout import step_dir_name
    from rae_scale.config.fields import resume_value

    assert resume_value(step_dir_name(1200)) and not resume_value("latest")
