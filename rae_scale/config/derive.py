"""Derived fields and cross-field rules, applied once a job config is loaded (`resolve`).

Each fact is stated once. The latent shape follows from the encoder: [rae.encoder.hidden_size,
input_size / patch_size, input_size / patch_size] (models.encoders: DINOv2's CLS and register tokens
are dropped, every kind keeps one token per patch). From it come dit.in_channels, dit.input_size
(also of guidance.guidance_model), transport.shift_dim (C*H*W) and rae.image_size (grid * decoder
patch). A null there is filled in, so downstream code reads resolved values; an explicit value that
disagrees is a ConfigError naming both keys. Model sizes come from a named preset or explicit fields;
an explicit size that contradicts the preset is an error, not a silent override.
"""
from __future__ import annotations

from rae_scale.config.errors import ConfigError
from rae_scale.config.presets import decoder_preset_sizes, dit_preset_sizes
from rae_scale.config.schema import (DecoderConfig, DiTConfig, EvalJob, GeneratorSections, RAEConfig, Stage1Job,
                                     Stage2Job)

DECODER_SIZES = ("hidden_size", "num_layers", "num_heads", "intermediate_size")
DIT_SIZES = ("hidden_size", "depth", "num_heads")


def latent_shape(rae: RAEConfig) -> tuple[int, int, int]:
    """[C, H, W] of one latent of this RAE's encoder."""
    grid = rae.encoder.input_size // rae.encoder.patch_size
    return (rae.encoder.hidden_size, grid, grid)


def resolve(job, path: str = ""):
    """Fill the derived fields of a loaded (validated) job in place, check cross-field rules; returns it."""
    if isinstance(job, EvalJob):
        resolve(job.sample, path + "sample.")
        return job
    if isinstance(getattr(job, "rae", None), RAEConfig):  # every job that builds the encoder
        check_encoder_layers(job.rae.encoder, path + "rae.encoder.")
    # jobs that run only the encoder (cache-latents, stats) take its sizes from the weights instead
    if isinstance(job, (Stage1Job, GeneratorSections)):
        _resolve_rae(job.rae, path + "rae.")
    if isinstance(job, GeneratorSections):
        _resolve_generator(job, path)
        _resolve_repa(job, path)
    if isinstance(job, Stage2Job) and job.data.source == "images" and not (job.data.url or job.data.sources):
        raise ConfigError(f"config key '{path}data.url': stage 2 with data.source=images (online encoding) reads "
                          "prepared image shards; allowed: the folder or URL `rae-scale prepare` wrote, or a "
                          "weighted mixture of such folders in data.sources")
    if isinstance(job, Stage2Job) and job.data.source == "latents" and job.data.sources:
        raise ConfigError(f"config key '{path}data.sources': a mixture of image shard folders is encoded online "
                          "(data.source=images); a mixture of latent caches is not implemented; allowed with "
                          "data.source=latents: [] (one cache in data.latents_url)")
    if isinstance(job, Stage2Job) and job.dit.condition_type == "text" and job.eval.every_steps:
        raise ConfigError(f"config key '{path}eval.every_steps'={job.eval.every_steps}: online FID samples class "
                          "labels; a text-to-image run is evaluated from prompts with `rae-scale evaluate t2i`; "
                          "allowed with dit.condition_type=text: 0")
    if isinstance(job, Stage1Job) and job.data.source != "images":
        raise ConfigError(f"config key '{path}data.source': bad value {job.data.source!r}; stage 1 trains the "
                          "decoder on images; allowed: images")
    if isinstance(job, (Stage1Job, Stage2Job)) and job.optimizer.kind == "muon" and job.parallel.strategy == "deepspeed":
        # ZeRO hands the optimizer flat partitions, not matrices; DeepSpeed's own Muon computes another
        # update (fixed quintic coefficients, another lr scale, a name-based split) and its checkpoints
        # cannot be converted to the universal format (no N -> M resume)
        raise ConfigError(f"config key '{path}optimizer.kind'=muon cannot run under parallel.strategy=deepspeed "
                          "(any ZeRO stage): ZeRO partitions flattened parameters, and Muon orthogonalises whole "
                          "matrices; allowed with muon: parallel.strategy ddp or fsdp")
    return job


# encoder kinds with RAEv2's multi-layer latent (models.encoders.MULTI_LAYER_POOLED says how each combines)
MULTI_LAYER_KINDS = ("dinov2", "dinov3", "siglip2")


def check_encoder_layers(enc, path: str = "rae.encoder.") -> None:
    """`layers`: distinct 0-based block indices below num_layers, for a kind that has a multi-layer latent.
    The latent keeps hidden_size channels, so nothing derived depends on them."""
    if enc.layers is None:
        return
    key = f"config key '{path}layers'"
    if enc.kind not in MULTI_LAYER_KINDS:
        raise ConfigError(f"{key}: encoder kind {enc.kind} has no multi-layer latent; allowed with layers: "
                          f"kind {', '.join(MULTI_LAYER_KINDS)} (or layers null)")
    bad = [i for i in enc.layers if not 0 <= i < enc.num_layers]
    if not enc.layers or bad:
        raise ConfigError(f"{key}={list(enc.layers)}: unknown layer index {bad[0] if bad else '(empty list)'}; "
                          f"allowed: block indices 0..{enc.num_layers - 1} ('{path}num_layers'={enc.num_layers}, "
                          "0-based)")
    if len(set(enc.layers)) != len(enc.layers):
        raise ConfigError(f"{key}={list(enc.layers)} repeats an index; allowed: distinct block indices")


def _disagree(key: str, value, source: str, derived) -> ConfigError:
    return ConfigError(f"config key '{key}'={value} disagrees with {source} = {derived}; "
                       f"leave '{key}' null to derive it")


def _fill(obj, name: str, derived, key: str, source: str) -> None:
    """Set obj.name to `derived` when null; an explicit value must equal it."""
    value = getattr(obj, name)
    if value is None:
        setattr(obj, name, derived)
    elif value != derived:
        raise _disagree(key, value, source, derived)


def _resolve_rae(rae: RAEConfig, path: str) -> None:
    enc = f"{path}encoder."
    if rae.encoder.input_size % rae.encoder.patch_size:
        raise ConfigError(f"config key '{enc}input_size'={rae.encoder.input_size} is not a multiple of "
                          f"'{enc}patch_size'={rae.encoder.patch_size}; the latent grid is input_size / patch_size")
    grid = latent_shape(rae)[1]
    _fill(rae, "image_size", grid * rae.decoder.patch_size, f"{path}image_size",
          f"the decoder output '{enc}input_size'/'{enc}patch_size' * '{path}decoder.patch_size' "
          f"({rae.encoder.input_size}/{rae.encoder.patch_size} * {rae.decoder.patch_size})")
    check_decoder_sizes(rae.decoder, f"{path}decoder.")


def _resolve_generator(job: GeneratorSections, path: str) -> None:
    c, h, w = latent_shape(job.rae)
    enc = f"{path}rae.encoder."
    dits = [(job.dit, f"{path}dit.")]
    if job.guidance.guidance_model is not None:
        dits.append((job.guidance.guidance_model, f"{path}guidance.guidance_model."))
    for dit, key in dits:
        _fill(dit, "in_channels", c, f"{key}in_channels", f"the latent channels '{enc}hidden_size'")
        _fill(dit, "input_size", h, f"{key}input_size", f"the latent grid '{enc}input_size'/'{enc}patch_size' "
                                                         f"({job.rae.encoder.input_size}/{job.rae.encoder.patch_size})")
        check_dit_sizes(dit, key)
        _resolve_condition(dit, job.text_encoder, key, f"{path}text_encoder.")
    _fill(job.transport, "shift_dim", c * h * w, f"{path}transport.shift_dim",
          f"the latent's C*H*W from '{enc}hidden_size', '{enc}input_size'/'{enc}patch_size' ({c}*{h}*{w})")
    check_sampling(job, path)


def _resolve_repa(job: GeneratorSections, path: str) -> None:
    """dit.repa_depth set: a stage-2 job trains RAEv2's REPA loss against the patch tokens of repa.encoder,
    encoded inside the step from the batch's images (so only with data.source=images), one target token per
    DiT patch token; dit.repa_dim is derived from the target's width. Sample and eval jobs only build the
    projector (so the weights load), so they state repa_dim."""
    dit, key = job.dit, f"{path}dit."
    if dit.repa_depth is None:
        return
    if not isinstance(job, Stage2Job):
        if dit.repa_dim is None:
            raise ConfigError(f"config key '{key}repa_dim' is null with '{key}repa_depth'={dit.repa_depth}: this job "
                              "builds the REPA projector to load the weights; allowed: its width (the training run's "
                              "repa.encoder.hidden_size)")
        return
    enc, ekey = job.repa.encoder, f"{path}repa.encoder."
    check_encoder_layers(enc, ekey)
    _fill(dit, "repa_dim", enc.hidden_size, f"{key}repa_dim", f"the REPA target width '{ekey}hidden_size'")
    if job.data.source != "images":
        raise ConfigError(f"config key '{path}data.source'={job.data.source} with '{key}repa_depth' set: the REPA "
                          "targets are encoded from the step's images (cached REPA targets are not built); allowed "
                          "with REPA: data.source=images (or dit.repa_depth=null)")
    if enc.input_size % enc.patch_size:
        raise ConfigError(f"config key '{ekey}input_size'={enc.input_size} is not a multiple of '{ekey}patch_size'="
                          f"{enc.patch_size}; the REPA target grid is input_size / patch_size")
    grid, dit_grid = enc.input_size // enc.patch_size, dit.input_size // dit.patch_size
    if grid != dit_grid:
        raise ConfigError(f"config key '{ekey}input_size'={enc.input_size}: the REPA target grid {grid}x{grid} "
                          f"('{ekey}input_size'/'{ekey}patch_size') must be the DiT's patch grid {dit_grid}x{dit_grid} "
                          f"('{key}input_size'/'{key}patch_size'); allowed: input_size {dit_grid * enc.patch_size}")


LABEL_CONDITION_TOKENS = 8  # dit_dh_ig's condition tokens for a label (RAEv2's ImageNet cond_arch)
TEXT_MODELS = ("dit_dh_ig",)  # networks that take text conditions


def _resolve_condition(dit: DiTConfig, text, key: str, text_key: str) -> None:
    """Label: num_c_tokens defaults to 8 and context_dim stays null. Text: one condition token per text
    token (num_c_tokens = text_encoder.max_length) of the text encoder's width (context_dim)."""
    if dit.condition_type == "label":
        if dit.context_dim is not None:
            raise ConfigError(f"config key '{key}context_dim'={dit.context_dim} is for text conditions; with "
                              f"'{key}condition_type'=label allowed: null")
        if dit.num_c_tokens is None:
            dit.num_c_tokens = LABEL_CONDITION_TOKENS
        return
    if dit.model not in TEXT_MODELS:
        raise ConfigError(f"config key '{key}condition_type'=text needs '{key}model' one of {', '.join(TEXT_MODELS)} "
                          f"(in-context condition tokens), got {dit.model}")
    _fill(dit, "num_c_tokens", text.max_length, f"{key}num_c_tokens",
          f"the caption length '{text_key}max_length'")
    _fill(dit, "context_dim", text.hidden_size, f"{key}context_dim", f"the text encoder width '{text_key}hidden_size'")


# ----------------------------------------------------------------------------- prediction, sampler, guidance

IG_MODELS = ("dit_dh_ig",)  # networks with an internal-guidance (base) head, returning (full, base)


def check_sampling(job: GeneratorSections, path: str = "") -> None:
    """The combinations of transport.prediction, sampler and guidance that are implemented.

    - sampler.grid raev2 is RAEv2's Euler sampler ending at t = 0: ode/euler only (heun, dopri5 and the
      SDE's final denoising step would evaluate the network at t = 0);
    - x-prediction samples with the ODE's fixed-step methods (euler, heun): below t_eps its clamped
      velocity is not the path's velocity, which the SDE's final denoising jump and dopri5's adaptive
      end need;
    - internal guidance needs a network with a base head; guidance intervals need t_min <= t_max;
    - where RAEv2's activation rules apply (prediction x, or method ig_cfg) a CFG scale of 1 means off
      and a scale below 1 would be silently ignored, so it is refused.
    """
    t, s, g = job.transport, job.sampler, job.guidance
    if s.grid == "raev2" and (s.mode, s.method) != ("ode", "euler"):
        raise ConfigError(f"config key '{path}sampler.grid'=raev2 needs '{path}sampler.mode'=ode and "
                          f"'{path}sampler.method'=euler (got {s.mode}/{s.method}): RAEv2's grid ends at t = 0, where "
                          "the other samplers would evaluate the network; use sampler.grid=rae for them")
    if t.prediction == "x" and (s.mode == "sde" or s.method == "dopri5"):
        what = "sampler.mode=sde" if s.mode == "sde" else "sampler.method=dopri5"
        raise ConfigError(f"config key '{path}transport.prediction'=x with {path}{what} is not supported; allowed "
                          "with x-prediction: sampler.mode=ode with method euler or heun")
    for lo, hi in (("t_min", "t_max"), ("ig_t_min", "ig_t_max")):
        if getattr(g, lo) > getattr(g, hi):
            raise ConfigError(f"config key '{path}guidance.{lo}'={getattr(g, lo)} is above '{path}guidance.{hi}'="
                              f"{getattr(g, hi)}; a guidance interval needs {lo} <= {hi}")
    if g.method in ("ig", "ig_cfg") and job.dit.model not in IG_MODELS:
        raise ConfigError(f"config key '{path}guidance.method'={g.method} needs a network with an internal-guidance "
                          f"head ('{path}dit.model' one of {', '.join(IG_MODELS)}), got dit.model={job.dit.model}")
    if g.method in ("cfg", "ig_cfg") and g.scale < 1.0 and (t.prediction == "x" or g.method == "ig_cfg"):
        raise ConfigError(f"config key '{path}guidance.scale'={g.scale} is below 1, which RAEv2's rules (used with "
                          f"transport.prediction=x or guidance.method=ig_cfg) treat as CFG off; allowed: >= 1 "
                          "(1 = off)")


# ----------------------------------------------------------------------------- presets vs explicit sizes


def _preset_conflicts(preset: str, preset_sizes: dict, explicit: dict, path: str) -> None:
    for name, value in explicit.items():
        if value is not None and value != preset_sizes[name]:
            raise ConfigError(f"config key '{path}{name}'={value} conflicts with '{path}preset'={preset}, which "
                              f"gives {name}={preset_sizes[name]}; drop one of them (or set preset=null)")


def _fill_from_preset(section, preset_sizes: dict) -> None:
    """The resolved config states the model fully: sizes left null take the preset's values (so
    `config show`, the saved config.yaml and the resume architecture check see real sizes)."""
    for name, value in preset_sizes.items():
        if getattr(section, name) is None:
            setattr(section, name, value)


def _missing_without_preset(explicit: dict, path: str) -> None:
    missing = [name for name, value in explicit.items() if value is None]
    if missing:
        raise ConfigError(f"config key '{path}preset' is null, so {', '.join(repr(path + m) for m in missing)} "
                          "must be given (or choose a preset)")


def check_decoder_sizes(dec: DecoderConfig, path: str = "rae.decoder.") -> None:
    """Explicit decoder sizes agree with the preset (which fills the rest), or all are given when there
    is none."""
    explicit = {name: getattr(dec, name) for name in DECODER_SIZES}
    if dec.preset is None:
        _missing_without_preset(explicit, path)
    else:
        _preset_conflicts(dec.preset, decoder_preset_sizes(dec.preset), explicit, path)
        _fill_from_preset(dec, decoder_preset_sizes(dec.preset))


# DiTConfig switches of dit_dh / lightning_dit that dit_dh_ig's design fixes
FIXED_BY_DIT_DH_IG = ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift", "use_pos_embed")


def check_dit_sizes(dit: DiTConfig, path: str = "dit.") -> None:
    """As check_decoder_sizes, for the DiT; with preset null the size lists must be as long as the
    model has parts (dit_dh, dit_dh_ig: body and head; lightning_dit: one). For dit_dh_ig also its
    own keys: the base head's block within the body, and no switch it does not have."""
    if dit.model == "dit_dh_ig":
        defaults = DiTConfig()
        for name in FIXED_BY_DIT_DH_IG:
            if getattr(dit, name) != getattr(defaults, name):
                raise ConfigError(f"config key '{path}{name}'={getattr(dit, name)} applies to dit_dh and lightning_dit; "
                                  f"{path}model=dit_dh_ig always uses RMSNorm, q/k RMSNorm, SwiGLU and RoPE on the "
                                  f"patch tokens without a position table: leave {name} at its default")
    explicit = {name: getattr(dit, name) for name in DIT_SIZES}
    if dit.preset is None:
        _missing_without_preset(explicit, path)
        parts = 1 if dit.model == "lightning_dit" else 2
        for name, value in explicit.items():
            if len(value) != parts:
                raise ConfigError(f"config key '{path}{name}': bad value {value!r}; allowed: a list of {parts} "
                                  f"integer(s) for {path}model={dit.model}"
                                  + (" (body, head)" if parts == 2 else ""))
    else:
        _preset_conflicts(dit.preset, dit_preset_sizes(dit.model, dit.preset), explicit, path)
        _fill_from_preset(dit, dit_preset_sizes(dit.model, dit.preset))
    if dit.repa_depth is None and dit.repa_dim is not None:
        raise ConfigError(f"config key '{path}repa_dim'={dit.repa_dim} without '{path}repa_depth': the REPA projector "
                          "is off; allowed: null (or set repa_depth)")
    if dit.repa_depth is not None and dit.model != "dit_dh_ig":
        raise ConfigError(f"config key '{path}repa_depth'={dit.repa_depth}: the REPA projector is dit_dh_ig's (RAEv2); "
                          f"allowed with {path}model={dit.model}: null")
    if dit.repa_depth is not None and dit.depth is not None and not dit.repa_depth <= dit.depth[0]:
        raise ConfigError(f"config key '{path}repa_depth'={dit.repa_depth} is deeper than the body ({path}depth[0]="
                          f"{dit.depth[0]}); allowed: 1 ... {dit.depth[0]} (the body block whose patch tokens feed "
                          "the REPA projector)")
    if dit.model == "dit_dh_ig" and dit.depth is not None and not dit.base_model_depth <= dit.depth[0]:
        raise ConfigError(f"config key '{path}base_model_depth'={dit.base_model_depth} is deeper than the body "
                          f"({path}depth[0]={dit.depth[0]}); allowed: 1 ... {dit.depth[0]} (the body block whose "
                          "tokens feed the internal-guidance head)")

