"""Import the upstream RAE YAML configs (blocks stage_1, stage_2, transport, sampler, guidance, misc,
training, eval, gan with `target:` class paths) into rae_scale job configs, and RAEv2's stage-2
configs (nanovisionx/RAEv2: DiTwDDTHeadIG, `conditioning`, x-prediction, guidance cfg/ig, gmuon).

Every field is either mapped or reported in `dropped` (for RAEv2 with the reason in `reasons`), so
nothing is lost silently; values rae_scale cannot honour are a ConfigError naming the upstream key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rae_scale import config as C

ENCODER_KINDS = {"Dinov2withNorm": "dinov2", "SigLIP2wNorm": "siglip2", "MAEwNorm": "mae"}
ENCODER_PATCH = {"dinov2": 14, "siglip2": 16, "mae": 16}
DIT_TARGETS = {"stage2.models.DDT.DiTwDDTHead": "dit_dh", "stage2.models.lightningDiT.LightningDiT": "lightning_dit"}
DECODER_PRESETS = {"ViTB": "B", "ViTL": "L", "ViTXL": "XL"}
DIT_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
              "class_dropout_prob", "num_classes", "use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm",
              "wo_shift", "use_pos_embed")
# Upstream trains on ImageNet-1k train; its epoch counts become steps with this size.
IMAGENET_TRAIN_SIZE = 1_281_167


@dataclass
class ImportResult:
    job: str
    config: Any
    dropped: list[str] = field(default_factory=list)
    # values corrected because upstream was inconsistent, or set from outside the YAML (RAEv2's precision)
    notes: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # dropped key -> why (RAEv2 imports)

    def dropped_with_reasons(self) -> list[str]:
        """One line per dropped key: `key: reason` where a reason is known."""
        return [f"{k}: {self.reasons[k]}" if k in self.reasons else k for k in self.dropped]


_MISSING = object()


class _Reader:
    """Walks a nested dict, remembering which leaves were consumed."""

    def __init__(self, data: dict):
        self.data = data
        self.used: set[str] = set()

    def _walk(self, path: str) -> Any:
        """The value at a dotted path, or _MISSING."""
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def get(self, path: str, default=None):
        node = self._walk(path)
        if node is _MISSING:
            return default
        self._mark(path, node)
        return node

    def peek(self, path: str, default=None):
        """The value at path without consuming it."""
        node = self._walk(path)
        return default if node is _MISSING else node

    def has(self, path: str) -> bool:
        return self._walk(path) is not _MISSING

    def _mark(self, path: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                self._mark(f"{path}.{k}", v)
        else:
            self.used.add(path)

    def leaves(self, node=None, prefix="") -> list[str]:
        node = self.data if node is None else node
        out = []
        for k, v in node.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.extend(self.leaves(v, path + "."))
            else:
                out.append(path)
        return out

    def dropped(self) -> list[str]:
        return [p for p in self.leaves() if p not in self.used]


def _dit_from(r: _Reader, prefix: str) -> C.DiTConfig:
    target = r.get(f"{prefix}.target")
    if target not in DIT_TARGETS:
        raise C.ConfigError(f"upstream key '{prefix}.target': unsupported class {target!r}; "
                            f"allowed: {', '.join(DIT_TARGETS)}")
    kw = {"model": DIT_TARGETS[target], "preset": None}
    for name in DIT_FIELDS:
        value = r.get(f"{prefix}.params.{name}")
        if value is None:
            continue
        if name in ("hidden_size", "depth", "num_heads") and not isinstance(value, list):
            value = [value]
        kw[name] = value
    ckpt = r.get(f"{prefix}.ckpt")
    if ckpt:
        kw["checkpoint"] = ckpt
    return C.DiTConfig(**kw)



def _decoder_section(r: "_Reader", p: str) -> C.DecoderConfig:
    """rae.decoder from the stage-1 params at p (decoder_config_path's preset, decoder_patch_size);
    the same keys in RAE's and RAEv2's configs."""
    dec_path = r.get(f"{p}.decoder_config_path", "configs/decoder/ViTXL")
    preset = Path(str(dec_path)).name
    if preset not in DECODER_PRESETS:
        raise C.ConfigError(f"upstream key '{p}.decoder_config_path': unknown decoder {preset!r}; "
                            f"allowed: {', '.join(DECODER_PRESETS)}")
    return C.DecoderConfig(preset=DECODER_PRESETS[preset], patch_size=int(r.get(f"{p}.decoder_patch_size", 16)))

def _rae_from(r: _Reader) -> C.RAEConfig:
    p = "stage_1.params"
    r.get("stage_1.target")
    cls = r.get(f"{p}.encoder_cls", "Dinov2withNorm")
    if cls not in ENCODER_KINDS:
        raise C.ConfigError(f"upstream key '{p}.encoder_cls': unsupported encoder {cls!r}; "
                            f"allowed: {', '.join(ENCODER_KINDS)}")
    kind = ENCODER_KINDS[cls]
    input_size = int(r.get(f"{p}.encoder_input_size", 224))
    pretrained = r.get(f"{p}.encoder_config_path")
    # encoder_params repeat the model path and `normalize: true` (always on in rae_scale).
    for key in ("dinov2_path", "model_name"):
        pretrained = r.get(f"{p}.encoder_params.{key}") or pretrained
    if r.get(f"{p}.encoder_params.normalize", True) is False:
        raise C.ConfigError(f"upstream key '{p}.encoder_params.normalize': false is not supported; allowed: true")
    patch = ENCODER_PATCH[kind]
    encoder = C.EncoderConfig(kind=kind, pretrained=pretrained, patch_size=patch, input_size=input_size)
    decoder = _decoder_section(r, p)
    r.get(f"{p}.reshape_to_2d")  # rae_scale latents are always [C, H, W]
    # image_size, like the DiT's latent shape, is derived from the encoder when the job is resolved
    return C.RAEConfig(encoder=encoder, decoder=decoder, noise_tau=float(r.get(f"{p}.noise_tau", 0.0)),
                       stats_path=r.get(f"{p}.normalization_stat_path"),
                       decoder_checkpoint=r.get(f"{p}.pretrained_decoder_path"))


def _transport_from(r: _Reader, shift_dim) -> C.TransportConfig:
    path_type = r.get("transport.params.path_type", "Linear")
    if path_type != "Linear":
        raise C.ConfigError(f"upstream key 'transport.params.path_type': {path_type!r} is not supported; allowed: Linear")
    pred = r.get("transport.params.prediction", "velocity")
    if pred != "velocity":
        raise C.ConfigError(f"upstream key 'transport.params.prediction': {pred!r} is not supported; allowed: velocity")
    if r.get("transport.params.loss_weight") not in (None, "none"):
        raise C.ConfigError("upstream key 'transport.params.loss_weight': only null is supported")
    dist = str(r.get("transport.params.time_dist_type", "uniform"))
    kw: dict = {"shift_dim": shift_dim, "shift_base": int(r.get("misc.time_dist_shift_base", 4096))}
    if dist == "uniform":
        kw["time_dist"] = "uniform"
    elif dist.startswith("logit-normal"):
        parts = dist.split("_")
        kw.update(time_dist="logit_normal", time_mu=float(parts[1]) if len(parts) > 1 else 0.0,
                  time_sigma=float(parts[2]) if len(parts) > 2 else 1.0)
    else:
        raise C.ConfigError(f"upstream key 'transport.params.time_dist_type': {dist!r}; "
                            "allowed: uniform, logit-normal_<mu>_<sigma>")
    return C.TransportConfig(**kw)


def _sampler_from(r: _Reader) -> C.SamplerConfig:
    mode = str(r.get("sampler.mode", "ODE")).lower()
    p = "sampler.params"
    r.get(f"{p}.reverse")  # upstream's reverse flag is always false in released configs
    return C.SamplerConfig(mode=mode, method=str(r.get(f"{p}.sampling_method", "euler")).lower(),
                           num_steps=int(r.get(f"{p}.num_steps", 50)), atol=float(r.get(f"{p}.atol", 1e-6)),
                           rtol=float(r.get(f"{p}.rtol", 1e-3)))


def _guidance_from(r: _Reader) -> C.GuidanceConfig:
    if not r.has("guidance"):
        return C.GuidanceConfig()
    method = str(r.get("guidance.method", "cfg")).lower()
    scale = float(r.get("guidance.scale", 1.0))
    t_min = r.get("guidance.t_min", r.get("guidance.t-min", 0.0))
    t_max = r.get("guidance.t_max", r.get("guidance.t-max", 1.0))
    model = _dit_from(r, "guidance.guidance_model") if r.has("guidance.guidance_model") else None
    if method == "cfg" and scale == 1.0:
        method = "none"  # scale 1 is no guidance; one forward pass
    return C.GuidanceConfig(method=method, scale=scale, t_min=float(t_min), t_max=float(t_max), guidance_model=model)


def _schedule_from(r: _Reader) -> tuple[C.OptimizerConfig, C.ScheduleConfig]:
    t = "training"
    lr = r.get(f"{t}.optimizer.lr", r.get(f"{t}.base_lr", r.get(f"{t}.scheduler.base_lr", 2e-4)))
    betas = r.get(f"{t}.optimizer.betas", r.get(f"{t}.beta", [0.9, 0.95]))
    wd = r.get(f"{t}.optimizer.weight_decay", r.get(f"{t}.wd", 0.0))
    opt = C.OptimizerConfig(lr=float(lr), betas=[float(b) for b in betas], weight_decay=float(wd))
    kind = r.get(f"{t}.scheduler.type", r.get(f"{t}.schedule_type", "constant"))
    if r.has(f"{t}.scheduler.base_lr"):
        r.get(f"{t}.scheduler.base_lr")
    final = r.get(f"{t}.scheduler.final_lr", r.get(f"{t}.final_lr", lr))
    warm = r.get(f"{t}.scheduler.warmup_epochs")
    from_zero = r.get(f"{t}.scheduler.warmup_from_zero", True)
    if warm is None and r.has(f"{t}.decay_start_epoch"):
        # Old-style keys: constant LR until decay_start_epoch, then decay.
        warm, from_zero = r.get(f"{t}.decay_start_epoch"), False
    sched = C.ScheduleConfig(kind=str(kind), warmup_from_zero=bool(from_zero), final_lr=float(final),
                             warmup_epochs=float(warm) if warm is not None else None,
                             decay_end_epoch=float(r.get(f"{t}.scheduler.decay_end_epoch",
                                                         r.get(f"{t}.decay_end_epoch")) or 0) or None)
    return opt, sched


def _training_from(r: _Reader, defaults: C.TrainingConfig) -> C.TrainingConfig:
    t = "training"
    kw = dataclasses.asdict(defaults)
    for src, dst in (("epochs", "epochs"), ("global_batch_size", "global_batch_size"),
                     ("grad_accum_steps", "grad_accum_steps"), ("ema_decay", "ema_decay"), ("clip_grad", "clip_grad")):
        if r.has(f"{t}.{src}"):
            kw[dst] = r.get(f"{t}.{src}")
    return C.TrainingConfig(**kw)


def _apply_common_training(r: _Reader, job) -> None:
    t = "training"
    if r.has(f"{t}.global_seed"):
        job.run.seed = int(r.get(f"{t}.global_seed"))
    if r.has(f"{t}.num_workers"):
        job.data.num_workers = int(r.get(f"{t}.num_workers"))
    for key in ("log_interval", "log_every"):
        if r.has(f"{t}.{key}"):
            job.logging.every_steps = int(r.get(f"{t}.{key}"))
    if r.has(f"{t}.sample_every"):
        job.logging.sample_every_steps = int(r.get(f"{t}.sample_every"))
    if r.has(f"{t}.checkpoint_interval"):
        job.checkpoint.every_epochs = float(r.get(f"{t}.checkpoint_interval"))
    if r.has(f"{t}.ckpt_every"):
        job.checkpoint.every_steps = int(r.get(f"{t}.ckpt_every"))
    if r.has("eval.eval_interval"):
        job.eval.every_steps = int(r.get("eval.eval_interval"))
    if r.has("eval.reference_npz_path"):
        job.eval.reference = r.get("eval.reference_npz_path")


def _gan_from(r: _Reader) -> C.GANConfig:
    g = "gan"
    arch = f"{g}.disc.arch"
    recipe = str(r.get(f"{arch}.recipe", "S_8"))
    size, _, patch = recipe.partition("_")
    sizes = {"S": (384, 12, 6), "B": (768, 12, 12)}
    if size not in sizes:
        raise C.ConfigError(f"upstream key '{arch}.recipe': {recipe!r}; allowed: S_<patch>, B_<patch>")
    width, depth, heads = sizes[size]
    dopt = C.OptimizerConfig(lr=float(r.get(f"{g}.disc.optimizer.lr", 2e-4)),
                             betas=[float(b) for b in r.get(f"{g}.disc.optimizer.betas", [0.9, 0.95])],
                             weight_decay=float(r.get(f"{g}.disc.optimizer.weight_decay", 0.0)))
    # The discriminator's schedule block repeats the generator's; rae_scale uses one schedule for both.
    for key in ("type", "warmup_epochs", "decay_end_epoch", "base_lr", "final_lr", "warmup_from_zero"):
        r.get(f"{g}.disc.scheduler.{key}")
    loss = f"{g}.loss"
    updates = r.get(f"{loss}.disc_updates", 1)
    if updates != 1:
        raise C.ConfigError(f"upstream key '{loss}.disc_updates': {updates!r} is not supported; allowed: 1 "
                            "(rae_scale makes one discriminator update per step)")
    return C.GANConfig(
        disc_weight=float(r.get(f"{loss}.disc_weight", 0.75)),
        perceptual_weight=float(r.get(f"{loss}.perceptual_weight", 1.0)),
        disc_start_epoch=float(r.get(f"{loss}.disc_start", 8)),
        disc_update_start_epoch=float(r.get(f"{loss}.disc_upd_start", 6)),
        lpips_start_epoch=float(r.get(f"{loss}.lpips_start", 0)),
        max_d_weight=float(r.get(f"{loss}.max_d_weight", 1e4)),
        disc_loss=str(r.get(f"{loss}.disc_loss", "hinge")), gen_loss=str(r.get(f"{loss}.gen_loss", "vanilla")),
        dino_checkpoint=r.get(f"{arch}.dino_ckpt_path"), disc_width=width, disc_depth=depth, disc_heads=heads,
        disc_patch=int(patch or 8), kernel_size=int(r.get(f"{arch}.ks", 9)),
        norm_type=str(r.get(f"{arch}.norm_type", "bn")), spectral_norm=bool(r.get(f"{arch}.using_spec_norm", True)),
        diffaug_prob=float(r.get(f"{g}.disc.augment.prob", 1.0)),
        diffaug_cutout=float(r.get(f"{g}.disc.augment.cutout", 0.0)), disc_optimizer=dopt)


def import_upstream_config(path: str | Path) -> ImportResult:
    """Convert one upstream YAML file; raises ConfigError for values rae_scale cannot honour."""
    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict) or not ({"stage_1", "stage_2"} & set(data)):
        raise C.ConfigError(f"'{path}' is not an upstream RAE config (no stage_1 / stage_2 block)")
    if is_raev2_config(data):
        return _import_raev2(data)
    r = _Reader(data)
    rae = _rae_from(r) if "stage_1" in data else C.RAEConfig()
    training = "training" in data
    notes: list[str] = []

    if "stage_2" in data:
        dit = _dit_from(r, "stage_2")
        latent = r.get("misc.latent_size")
        shift_dim = r.get("misc.time_dist_shift_dim")
        grid = rae.encoder.input_size // rae.encoder.patch_size
        if "stage_1" in data and dit.patch_size == 1 and dit.input_size != grid:
            # Upstream's ImageNet512 training config keeps the 256-px sizes beside a 448-px encoder.
            c = dit.in_channels
            notes.append(f"stage_2.params.input_size {dit.input_size} disagrees with the encoder grid {grid} "
                         f"({rae.encoder.input_size}/{rae.encoder.patch_size}); using input_size {grid}, "
                         f"latent [{c}, {grid}, {grid}], shift dim {c * grid * grid}")
            dit.input_size = grid
            latent, shift_dim = [c, grid, grid], c * grid * grid
        if latent is not None:
            c, h, w = (int(v) for v in latent)
            if (c, h) != (dit.in_channels, dit.input_size):
                raise C.ConfigError(f"upstream key 'misc.latent_size' {latent} disagrees with stage_2 params "
                                    f"(in_channels {dit.in_channels}, input_size {dit.input_size})")
            if shift_dim is None:
                shift_dim = c * h * w
        num_classes = r.get("misc.num_classes")
        if num_classes is not None and int(num_classes) != dit.num_classes:
            raise C.ConfigError(f"upstream key 'misc.num_classes' {num_classes} disagrees with stage_2 num_classes")
        transport = _transport_from(r, int(shift_dim) if shift_dim is not None else None)
        sampler = _sampler_from(r) if "sampler" in data else C.SamplerConfig()
        guidance = _guidance_from(r)
        if training:
            job = C.Stage2Job(rae=rae, dit=dit, transport=transport, sampler=sampler, guidance=guidance)
            job.training = _training_from(r, job.training)
            job.optimizer, job.schedule = _schedule_from(r)
            _apply_common_training(r, job)
            name = "stage2"
        else:
            job = C.SampleJob(rae=rae, dit=dit, transport=transport, sampler=sampler, guidance=guidance,
                              checkpoint=dit.checkpoint)
            name = "sample"
    else:
        if training:
            job = C.Stage1Job(rae=rae)
            job.training = _training_from(r, job.training)
            job.optimizer, job.schedule = _schedule_from(r)
            if "gan" in data:
                job.gan = _gan_from(r)
            _apply_common_training(r, job)
            name = "stage1"
        else:
            job = C.SampleJob(rae=rae)
            name = "sample"
    C.validate(job)
    C.resolve(job)  # fills the derived fields; stage_2 sizes that disagree with the encoder are an error
    return ImportResult(job=name, config=job, dropped=r.dropped(), notes=notes)


def steps_per_epoch(global_batch_size: int, dataset_size: int = IMAGENET_TRAIN_SIZE) -> int:
    """Optimizer steps per epoch with drop_last, as upstream counts them."""
    return max(1, math.floor(dataset_size / global_batch_size))


# ----------------------------------------------------------------------------- RAEv2 (nanovisionx/RAEv2)
# RAEv2 merges its YAML into typed dataclasses (src/configs/stage2.py, shared.py), so a key left out
# means that dataclass's default: the defaults below are part of what a RAEv2 config says.

RAEV2_IG_TARGET = "stage2.models.DDT.DiTwDDTHeadIG"
RAEV2_PLAIN_TARGET = "stage2.models.DDT.DiTwDDTHead"
_RAEV2_BLOCKS = frozenset(("conditioning", "repa", "internal_guidance", "dataset"))  # only RAEv2 has them
_RAEV2_DIT_DEFAULTS: dict[str, Any] = dict(  # DiTwDDTHead(IG).__init__ (DDT.py:63-80, 208)
    input_size=16, in_channels=768, patch_size=[1, 1], hidden_size=[1152, 2048], depth=[28, 2],
    num_heads=[16, 16], mlp_ratio=4.0, base_model_depth=8)
_RAEV2_DIT_PARAMS = frozenset((*_RAEV2_DIT_DEFAULTS, "enable_repa", "repa_layer_depth", "z_dim", "num_classes",
                               "condition_type", "context_dim", "cond_arch", "use_cfg_conds"))
_RAEV2_ONLY_PARAMS = frozenset(("cond_arch", "condition_type", "context_dim", "enable_repa", "use_cfg_conds",
                                "base_model_depth"))
_RAEV2_COND_ARCH = frozenset(("num_t_tokens", "num_c_tokens", "num_cfg_omega_tokens", "n_action_tokens"))
_RAEV2_NS_PRESETS = {"POLAR_EXPRESS_COEFFICIENTS": 1.05}  # Newton-Schulz preset -> Polar-Express safety factor
_RAEV2_DEFAULT_LATENT = [768, 16, 16]  # MiscConfig defaults, used when the YAML leaves misc out
_RAEV2_DEFAULT_SHIFT_DIM = 196608
_RAEV2_RAE_PATCH = 16  # RAEv2's RAE decodes (resolution / 16)^2 latent tokens (rae.py:49)
_NO_EQUIVALENT = "no rae_scale equivalent"


def is_raev2_config(data: dict) -> bool:
    """A RAEv2 config: its IG class, a block only RAEv2 has, its flat transport keys, its
    `encoder_name`, or a model parameter only RAEv2's classes take."""
    def block(node, key) -> dict:
        value = node.get(key) if isinstance(node, dict) else None
        return value if isinstance(value, dict) else {}

    stage2 = block(data, "stage_2")
    target = str(stage2.get("target", "")).removeprefix("src.")
    return (target == RAEV2_IG_TARGET or bool(_RAEV2_BLOCKS & set(data))
            or bool({"prediction", "time_dist_type", "t_eps"} & set(block(data, "transport")))
            or "encoder_name" in block(block(data, "stage_1"), "params")
            or bool(_RAEV2_ONLY_PARAMS & set(block(stage2, "params"))))


class _RAEv2Reader(_Reader):
    """A _Reader that also keeps why each key it leaves out is left out."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.reasons: dict[str, str] = {}


    def drop(self, path: str, reason: str) -> None:
        """Leave path (a leaf or a block) out, for this reason; the first reason given stands."""
        self.reasons.setdefault(path, reason)

    def reason_for(self, leaf: str) -> str:
        parts = leaf.split(".")
        for n in range(len(parts), 0, -1):
            reason = self.reasons.get(".".join(parts[:n]))
            if reason:
                return reason
        return _NO_EQUIVALENT


def _import_raev2(data: dict) -> ImportResult:
    """A RAEv2 stage-2 config -> a Stage2Job (a SampleJob when stage_2.ckpt names weights to sample from)."""
    r = _RAEv2Reader(data)
    notes: list[str] = []
    _raev2_check_conditioning(r)
    dit = _raev2_dit(r)
    repa = _raev2_repa(r, dit)
    sections = dict(rae=_raev2_rae(r, dit, notes), dit=dit, transport=_raev2_transport(r, dit),
                    sampler=C.SamplerConfig(mode="ode", method="euler", grid="raev2",
                                            num_steps=int(r.get("sampler.num_steps", 50))),
                    guidance=_raev2_guidance(r))
    if repa and not dit.checkpoint and sections["rae"].encoder.pretrained is None:
        raise C.ConfigError("upstream key 'repa.use_repa': true needs online encoding (the REPA targets come from the "
                            "step's images), but rae.encoder is a weightless stand-in for RAEv2's encoder "
                            f"{r.peek('stage_1.params.encoder_name')!r}; allowed with REPA: encoder_name "
                            f"{', '.join(_RAEV2_DINOV3_NAMES)} or dinov3mls-vit-l16[layers=...]")
    if dit.checkpoint:
        job, name = C.SampleJob(**sections, checkpoint=dit.checkpoint), "sample"
        for block in ("training", "dataset", "eval", *(["repa"] if repa else [])):
            r.drop(block, "a sampling config (stage_2.ckpt names the weights): training, data and online-eval "
                          "settings do not apply to a sample job")
    else:
        job, name = C.Stage2Job(**sections), "stage2"
        _raev2_training(r, job, notes)
        if repa:
            _raev2_repa_training(r, job, repa, notes)
        _raev2_data_and_eval(r, job)
    C.validate(job)
    C.resolve(job)
    dropped = r.dropped()
    return ImportResult(job=name, config=job, dropped=dropped, notes=notes,
                        reasons={key: r.reason_for(key) for key in dropped})


def _raev2_check_conditioning(r: _RAEv2Reader) -> None:
    """Only label conditioning is importable. RAEv2's effective type: conditioning.type, replaced by
    dataset.condition_type when it is 'label' (post_process), and the model's own condition_type
    param when given (prepare_model_params fills params with setdefault)."""
    sources = [("conditioning.type", r.get("conditioning.type", "label"))]
    if sources[0][1] == "label" and r.peek("dataset.condition_type") is not None:
        sources.append(("dataset.condition_type", r.get("dataset.condition_type")))
    if r.has("stage_2.params.condition_type"):
        sources.append(("stage_2.params.condition_type", r.get("stage_2.params.condition_type")))
    for key, value in sources:
        if value == "text":
            raise C.ConfigError(f"upstream key '{key}': 'text' (text-to-image) is not supported yet: rae_scale's "
                                "stage-2 models, data and sampling are class-conditional until text-to-image support "
                                "lands (text encoder, caption data, text condition tokens); allowed: label")
        if value != "label":
            what = " (navigation-world-model conditioning has no rae_scale equivalent)" if value == "nwm" else ""
            raise C.ConfigError(f"upstream key '{key}': {value!r} is not supported{what}; allowed: label")
    unused = "text-conditioning setting; unused with label conditioning"
    for key in ("conditioning.text_encoder", "conditioning.context_dim", "stage_2.params.context_dim"):
        r.drop(key, unused)
    r.get("dataset.condition_type")  # label (or absent): agrees with the above


# RAEv2's REPA target encoders (vision_encoder.py DINOv2Encoder: hub dinov2_vit<size>14_reg, final norm without
# affine) -> the transformers release of the same weights and its sizes
_RAEV2_REPA_ENCODERS = {
    "dinov2-vit-s": ("facebook/dinov2-with-registers-small", 384, 12, 6),
    "dinov2-vit-b": ("facebook/dinov2-with-registers-base", 768, 12, 12),
    "dinov2-vit-l": ("facebook/dinov2-with-registers-large", 1024, 24, 16),
}


def _raev2_repa(r: _RAEv2Reader, dit: C.DiTConfig) -> C.RepaConfig | None:
    """RAEv2's explicit REPA loss (repa.use_repa; off in every released config) -> dit.repa_depth / repa_dim
    and the stage-2 `repa` section (coeff, target encoder), or None when it is off. RAEv2 fills the model's
    params with setdefault: stage_2.params.enable_repa / repa_layer_depth / z_dim win over the repa block,
    and z_dim defaults to the target encoder's width."""
    p = "stage_2.params"
    use = bool(r.peek("repa.use_repa", False))
    enable = bool(r.peek(f"{p}.enable_repa", use))
    if not use and not enable:
        off = "the REPA loss is off (repa.use_repa / stage_2.params.enable_repa false)"
        for key in ("repa", f"{p}.enable_repa", f"{p}.repa_layer_depth", f"{p}.z_dim"):
            r.drop(key, off)
        return None
    training = not dit.checkpoint  # a sample job only builds the projector, so that the weights load
    for key in ("repa.use_repa", f"{p}.enable_repa"):
        r.get(key)  # consumed: they switch REPA on
    if use and not enable:
        raise C.ConfigError(f"upstream key '{p}.enable_repa': false with repa.use_repa true (a model without the "
                            "REPA projector, which RAEv2's loss calls) is not supported; allowed: true or absent")
    if not use and training:
        raise C.ConfigError(f"upstream key '{p}.enable_repa': true with repa.use_repa false (a REPA projector that "
                            "never trains) is not supported for training; allowed: false, or repa.use_repa true")
    depth_key = f"{p}.repa_layer_depth"
    if r.has(depth_key) and r.has("repa.repa_layer_depth"):
        r.drop("repa.repa_layer_depth", f"{depth_key} wins (RAEv2 fills params with setdefault)")
    elif not r.has(depth_key):
        depth_key = "repa.repa_layer_depth"
    name = r.get("repa.target_encoder", "dinov2-vit-b")
    if name not in _RAEV2_REPA_ENCODERS:
        raise C.ConfigError(f"upstream key 'repa.target_encoder': {name!r} has no rae_scale equivalent (rae_scale's "
                            "dinov2 is the registers model with a non-affine final norm); allowed: "
                            f"{', '.join(_RAEV2_REPA_ENCODERS)}")
    pretrained, width, layers, heads = _RAEV2_REPA_ENCODERS[name]
    resolution = int((r.get if training else r.peek)("repa.target_encoder_resolution", 256))
    if resolution < 256:
        raise C.ConfigError(f"upstream key 'repa.target_encoder_resolution': {resolution} gives RAEv2's DINOv2 "
                            "224 * (resolution // 256) = 0 px; allowed: >= 256")
    r.drop("repa.z_dim", "RAEv2 overwrites it with the target encoder's width when repa.use_repa is true")
    z_dim = int(r.get(f"{p}.z_dim", width))
    if z_dim != width:
        raise C.ConfigError(f"upstream key '{p}.z_dim': {z_dim} is not the REPA target width {width} ({name}); "
                            f"allowed: {width} or absent")
    dit.repa_depth, dit.repa_dim = int(r.get(depth_key, 8)), z_dim
    encoder = C.EncoderConfig(kind="dinov2", pretrained=pretrained, hidden_size=width, num_layers=layers,
                              num_heads=heads, patch_size=14, input_size=224 * (resolution // 256))
    return C.RepaConfig(coeff=float((r.get if training else r.peek)("repa.repa_coeff", 0.5)), encoder=encoder)


def _raev2_repa_training(r: _RAEv2Reader, job: C.Stage2Job, repa: C.RepaConfig, notes: list[str]) -> None:
    """A REPA run encodes its images online (rae_scale builds no cached REPA targets): data.source=images
    with data.url = RAEv2's dataset.data_dir, which must hold shards from `rae-scale prepare`."""
    job.repa = repa
    job.data.source = "images"
    job.data.url = str(r.get("dataset.data_dir", ""))
    r.drop("dataset", "RAEv2 reads images and encodes them online; with REPA rae_scale does too (data.source="
                      "images, data.url = dataset.data_dir): the other dataset keys do not map")
    notes.append(f"REPA: data.source=images (its targets are encoded from the step's images); data.url "
                 f"{job.data.url!r} is RAEv2's dataset.data_dir: point it at shards from `rae-scale prepare`")


def _raev2_sizes(r: _RAEv2Reader, key: str) -> list[int]:
    value = r.get(key, _RAEV2_DIT_DEFAULTS[key.rsplit(".", 1)[1]])
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _raev2_dit(r: _RAEv2Reader) -> C.DiTConfig:
    """stage_2 DiTwDDTHeadIG (params, cond_arch) + conditioning + misc.num_classes -> dit (dit_dh_ig)."""
    p = "stage_2.params"
    target = str(r.get("stage_2.target", "")).removeprefix("src.")
    if target != RAEV2_IG_TARGET:
        hint = (" (RAEv2's DiTwDDTHead has no internal-guidance head and no rae_scale model setting; "
                "interop.build_stage2_from_upstream still loads its weights)" if target == RAEV2_PLAIN_TARGET else "")
        raise C.ConfigError(f"upstream key 'stage_2.target': unsupported class {target!r} in a RAEv2 config{hint}; "
                            f"allowed: {RAEV2_IG_TARGET}")
    unknown = sorted(set(r.peek(p) or {}) - _RAEV2_DIT_PARAMS)
    if unknown:
        raise C.ConfigError(f"upstream key '{p}.{unknown[0]}': not a DiTwDDTHeadIG parameter; allowed: "
                            f"{', '.join(sorted(_RAEV2_DIT_PARAMS))}")
    if r.peek(f"{p}.use_cfg_conds"):
        raise C.ConfigError(f"upstream key '{p}.use_cfg_conds': true (CFG-scale tokens) is not supported; "
                            "allowed: false (as in every RAEv2 config)")
    r.drop(f"{p}.use_cfg_conds", "false: no CFG-scale tokens, as rae_scale's dit_dh_ig always builds it")

    patch = _raev2_sizes(r, f"{p}.patch_size")
    if len(set(patch)) != 1:
        raise C.ConfigError(f"upstream key '{p}.patch_size': {patch} is not supported: dit_dh_ig conditions the "
                            "head token by token on the body's patch tokens, so both grids must match; allowed: "
                            "[p, p]")
    arch = f"{p}.cond_arch" if r.has(f"{p}.cond_arch") else "conditioning.arch"
    if arch != "conditioning.arch":
        r.drop("conditioning.arch", f"{p}.cond_arch wins (RAEv2 fills the model's params with setdefault)")
    unknown = sorted(set(r.peek(arch) or {}) - _RAEV2_COND_ARCH)
    if unknown:
        raise C.ConfigError(f"upstream key '{arch}.{unknown[0]}': unknown; allowed: "
                            f"{', '.join(sorted(_RAEV2_COND_ARCH))}")
    r.drop(f"{arch}.num_cfg_omega_tokens", "read only with CFG-scale tokens (use_cfg_conds), which are off")
    r.drop(f"{arch}.n_action_tokens", "read only by navigation-world-model conditioning")

    num_classes = r.get("misc.num_classes", 1000)
    if r.has(f"{p}.num_classes") and r.get(f"{p}.num_classes") != num_classes:
        # the model's table would have one size and the null label (misc.num_classes) another
        absent = "" if r.has("misc.num_classes") else ", RAEv2's default when absent"
        raise C.ConfigError(f"upstream key '{p}.num_classes' {r.get(f'{p}.num_classes')} disagrees with "
                            f"'misc.num_classes' ({num_classes}{absent}), RAEv2's null label; allowed: equal values")
    depth_key = f"{p}.base_model_depth"
    if r.has(depth_key) and r.has("internal_guidance.base_model_depth"):
        r.drop("internal_guidance.base_model_depth", f"{depth_key} wins (RAEv2 fills params with setdefault)")
    elif r.peek("internal_guidance.base_model_depth") is not None:
        depth_key = "internal_guidance.base_model_depth"

    def param(name: str):
        return r.get(f"{p}.{name}", _RAEV2_DIT_DEFAULTS[name])

    return C.DiTConfig(
        model="dit_dh_ig", preset=None, input_size=int(param("input_size")), patch_size=patch[0],
        in_channels=int(param("in_channels")), hidden_size=_raev2_sizes(r, f"{p}.hidden_size"),
        depth=_raev2_sizes(r, f"{p}.depth"), num_heads=_raev2_sizes(r, f"{p}.num_heads"),
        mlp_ratio=float(param("mlp_ratio")),
        class_dropout_prob=float(r.get("conditioning.cfg_dropout_prob", 0.1)), num_classes=int(num_classes),
        num_t_tokens=int(r.get(f"{arch}.num_t_tokens", 4)), num_c_tokens=int(r.get(f"{arch}.num_c_tokens", 8)),
        base_model_depth=int(r.get(depth_key, _RAEV2_DIT_DEFAULTS["base_model_depth"])),
        learn_time_frequencies=True,  # RAEv2 calls model.requires_grad_(True): the Fourier W trains
        checkpoint=r.get("stage_2.ckpt"))


# RAEv2's DINOv3 encoder names (vision_encoder.py) -> the transformers hub model of the same weights
_RAEV2_DINOV3_NAMES = {"dinov3-vit-l16": "facebook/dinov3-vitl16-pretrain-lvd1689m"}
_RAEV2_DINOV3_SIZES = {"dinov3-vit-l16": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)}


def _raev2_dinov3(name: str, channels: int, resolution: int) -> C.EncoderConfig | None:
    """rae.encoder for RAEv2's `dinov3-vit-l16` (last block) or `dinov3mls-vit-l16[layers=a.b...]` (the
    multi-layer latent, 0-based blocks); None for any other encoder name."""
    layers = None
    base = name
    if name.startswith("dinov3mls-") and name.endswith("]") and "[layers=" in name:
        base, spec = name[len("dinov3mls-"):].split("[layers=", 1)
        base = "dinov3-" + base
        try:
            layers = [int(v) for v in spec[:-1].split(".")]
        except ValueError:
            raise C.ConfigError(f"upstream key 'stage_1.params.encoder_name': {name!r} has a malformed layer "
                                "list; allowed: dinov3mls-vit-l16[layers=11.13.15] (block numbers joined by '.')")
        if len(layers) == 1:  # RAEv2 adds the pooled term even for one layer; rae_scale's one-layer list does not
            raise C.ConfigError(f"upstream key 'stage_1.params.encoder_name': {name!r} (one layer plus RAEv2's "
                                "pooled term) has no rae_scale equivalent; allowed: two or more layers, or "
                                "dinov3-vit-l16")
    if base not in _RAEV2_DINOV3_NAMES:
        return None
    sizes = _RAEV2_DINOV3_SIZES[base]
    if sizes["hidden_size"] != channels:
        raise C.ConfigError(f"upstream key 'stage_1.params.encoder_name': {name!r} gives {sizes['hidden_size']} "
                            f"latent channels, but stage_2 params in_channels is {channels}; allowed: "
                            f"in_channels {sizes['hidden_size']}")
    return C.EncoderConfig(kind="dinov3", pretrained=_RAEV2_DINOV3_NAMES[base], layers=layers,
                           patch_size=_RAEV2_RAE_PATCH, input_size=resolution, **sizes)


def _raev2_rae(r: _RAEv2Reader, dit: C.DiTConfig, notes: list[str]) -> C.RAEConfig:
    """stage_1 (RAEv2's RAE) -> rae: its DINOv3 encoders (last block or multi-layer) map to kind dinov3 with
    the hub model of the same weights; any other encoder becomes a weightless stand-in with the latent's
    sizes, which keeps the DiT and the time shift consistent. The decoder, its weights and the latent
    statistics map."""
    p = "stage_1.params"
    target = str(r.get("stage_1.target", "")).removeprefix("src.")
    if target != "stage1.RAE":  # RAEv2 itself refuses a config without stage_1.target
        raise C.ConfigError(f"upstream key 'stage_1.target': unsupported class {target!r}; allowed: stage1.RAE")
    grid, channels = dit.input_size, dit.in_channels
    resolution = int(r.get(f"{p}.resolution", 256))
    if resolution != grid * _RAEV2_RAE_PATCH:
        raise C.ConfigError(f"upstream key '{p}.resolution': {resolution} does not give the DiT's {grid}x{grid} "
                            f"latent grid (RAEv2's RAE decodes (resolution / {_RAEV2_RAE_PATCH})^2 tokens); "
                            f"allowed: {grid * _RAEV2_RAE_PATCH}")
    name = r.peek(f"{p}.encoder_name")
    encoder = _raev2_dinov3(str(name), channels, resolution) if name is not None else None
    if encoder is not None:
        r.get(f"{p}.encoder_name")  # mapped
    else:
        heads = next(h for h in (16, 12, 8, 4, 2, 1) if channels % h == 0)  # any valid split: it has no weights
        encoder = C.EncoderConfig(hidden_size=channels, num_heads=heads, patch_size=_RAEV2_RAE_PATCH,
                                  input_size=resolution)
        r.drop(f"{p}.encoder_name", f"RAEv2's encoder {name!r} has no rae_scale encoder kind (rae.encoder.kind "
                                    f"maps {', '.join(_RAEV2_DINOV3_NAMES)} and dinov3mls-vit-l16[layers=...]): "
                                    "rae.encoder states only the latent's sizes")
        notes.append(f"rae.encoder is a weightless stand-in with the latent's sizes ([{channels}, {grid}, {grid}]) "
                     f"for RAEv2's encoder {name!r}: train on latents cached with RAEv2's encoder, not with this one")
    eps = r.get(f"{p}.eps", 1e-5)
    if float(eps) != 1e-5:
        raise C.ConfigError(f"upstream key '{p}.eps': {eps} is not supported; allowed: 1e-5 (rae_scale's latent "
                            "normalisation eps)")
    decoder = _decoder_section(r, p)
    return C.RAEConfig(encoder=encoder, decoder=decoder, noise_tau=float(r.get(f"{p}.noise_tau", 0.8)),
                       stats_path=r.get(f"{p}.normalization_stat_path"),
                       decoder_checkpoint=r.get(f"{p}.pretrained_decoder_path"))


def _raev2_transport(r: _RAEv2Reader, dit: C.DiTConfig) -> C.TransportConfig:
    """transport + misc (latent, shift) + internal_guidance.base_model_coeff -> transport."""
    pred = r.get("transport.prediction", "velocity")
    if pred != "x":
        raise C.ConfigError(f"upstream key 'transport.prediction': {pred!r} is not supported in a RAEv2 config "
                            "(RAEv2's default when the key is absent is 'velocity'); allowed: x")
    dist = str(r.get("transport.time_dist_type", "logit-normal_0_1"))
    parts = dist.split("_")
    try:
        if len(parts) != 3 or parts[0] != "logit-normal":
            raise ValueError
        mu, sigma = float(parts[1]), float(parts[2])
    except ValueError:
        raise C.ConfigError(f"upstream key 'transport.time_dist_type': {dist!r} is not supported; allowed: "
                            "logit-normal_<mu>_<sigma> (the only kind RAEv2 samples)") from None
    shape = [dit.in_channels, dit.input_size, dit.input_size]
    latent = r.get("misc.latent_size")
    if latent is not None and [int(v) for v in latent] != shape:
        raise C.ConfigError(f"upstream key 'misc.latent_size' {latent} disagrees with stage_2 params (in_channels "
                            f"{dit.in_channels}, input_size {dit.input_size}); allowed: {shape}")
    size = math.prod(shape)
    shift_dim = r.get("misc.time_dist_shift_dim", _RAEV2_DEFAULT_SHIFT_DIM)
    if shift_dim is None:  # RAEv2: `time_dist_shift_dim or prod(misc.latent_size)`
        shift_dim = math.prod(latent if latent is not None else _RAEV2_DEFAULT_LATENT)
    if int(shift_dim) != size:
        default = "" if r.has("misc.time_dist_shift_dim") else " (RAEv2's default when the key is absent)"
        raise C.ConfigError(f"upstream key 'misc.time_dist_shift_dim': {shift_dim}{default} is not the latent's "
                            f"C*H*W = {size} ({shape}); rae_scale derives the time shift from the latent; "
                            f"allowed: {size}")
    return C.TransportConfig(time_dist="logit_normal", time_mu=mu, time_sigma=sigma, time_max=1.0,
                             shift_dim=size, shift_base=int(r.get("misc.time_dist_shift_base", 4096)),
                             prediction="x", t_eps=float(r.get("transport.t_eps", 0.05)),
                             base_model_coeff=float(r.get("internal_guidance.base_model_coeff", 1.0)))


def _raev2_guidance(r: _RAEv2Reader) -> C.GuidanceConfig:
    """guidance.cfg / guidance.ig -> guidance, the method chosen by RAEv2's activation rules
    (configs/stage2.py): CFG on iff scale > 1; IG on iff scale > 1 or unconditional_scale not in
    {null, 1}; both on -> ig_cfg. A block absent means its defaults (off); a null block is off."""
    def block(name):
        key = f"guidance.{name}"
        if r.has(key) and r.peek(key) is None:
            r.get(key)
            return None
        return r.peek(key) or {}

    cfg, ig = block("cfg"), block("ig")
    kw: dict[str, Any] = {}
    cfg_on = False
    if cfg is not None:
        kw.update(scale=float(r.get("guidance.cfg.scale", 1.0)), t_min=float(r.get("guidance.cfg.t_min", 0.0)),
                  t_max=float(r.get("guidance.cfg.t_max", 1.0)))
        cfg_on = kw["scale"] > 1.0
    ig_on = False
    if ig is not None:
        scale, uncond = float(ig.get("scale", 1.0)), ig.get("unconditional_scale")
        ig_on = scale > 1.0 or (uncond is not None and float(uncond) != 1.0)
        if ig_on and scale < 1.0:
            raise C.ConfigError(f"upstream key 'guidance.ig.scale': {scale} with internal guidance on "
                                f"(unconditional_scale {uncond}) is not supported; allowed: >= 1")
        if scale >= 1.0:
            kw["ig_scale"] = float(r.get("guidance.ig.scale", 1.0))
        else:
            r.drop("guidance.ig.scale", "internal guidance is off (RAEv2: on iff scale > 1 or unconditional_scale "
                                        "not in {null, 1}); guidance.ig_scale stores only scales >= 1")
        kw.update(ig_t_min=float(r.get("guidance.ig.t_min", 0.0)), ig_t_max=float(r.get("guidance.ig.t_max", 1.0)))
        if r.has("guidance.ig.unconditional_scale"):
            value = r.get("guidance.ig.unconditional_scale")
            kw["ig_unconditional_scale"] = None if value is None else float(value)
    kw["method"] = {(False, False): "none", (True, False): "cfg", (False, True): "ig",
                    (True, True): "ig_cfg"}[(cfg_on, ig_on)]
    return C.GuidanceConfig(**kw)


def _raev2_training(r: _RAEv2Reader, job: C.Stage2Job, notes: list[str]) -> None:
    """training (batch, epochs, EMA, clip, gmuon, linear/cosine scheduler, logging, checkpoints) -> the
    job. With virtual_epoch_steps an epoch is that many batches, so epoch points become steps."""
    t = "training"
    accum = int(r.get(f"{t}.grad_accum_steps", 1))
    virtual = r.get(f"{t}.virtual_epoch_steps")
    steps_per_epoch = int(virtual) // accum if virtual else None
    if virtual and not steps_per_epoch:
        raise C.ConfigError(f"upstream key '{t}.virtual_epoch_steps': {virtual} is fewer batches than one optimizer "
                            f"step ({t}.grad_accum_steps {accum}); allowed: >= {accum}")
    if r.peek(f"{t}.global_batch_size") is None:
        raise C.ConfigError(f"upstream key '{t}.global_batch_size' is not set: RAEv2 then trains with "
                            f"{t}.batch_size x world size x grad_accum_steps, which depends on the launch; "
                            "set it (rae_scale states the global batch)")
    r.drop(f"{t}.batch_size", f"ignored by RAEv2 when {t}.global_batch_size is set")
    epochs = float(r.get(f"{t}.epochs", 16))
    length = {"max_steps": int(epochs * steps_per_epoch)} if steps_per_epoch else {"epochs": epochs}
    clip = r.get(f"{t}.clip_grad")
    job.training = C.TrainingConfig(global_batch_size=int(r.get(f"{t}.global_batch_size")), grad_accum_steps=accum,
                                    ema_decay=float(r.get(f"{t}.ema_decay", 0.9995)),
                                    clip_grad=float(clip) if clip is not None else 0.0, **length)
    job.optimizer, job.schedule = _raev2_optimizer(r, notes, steps_per_epoch)
    job.parallel.precision = "bf16"
    notes.append("parallel.precision=bf16: RAEv2 takes precision on the command line (--precision), not from its "
                 "YAML; its README trains stage 2 with --precision bf16")
    image = r.get(f"{t}.image_size", 256)
    grid = job.rae.encoder.input_size // job.rae.encoder.patch_size
    if int(image) != grid * job.rae.decoder.patch_size:
        raise C.ConfigError(f"upstream key '{t}.image_size': {image} is not the decoder's output size "
                            f"{grid * job.rae.decoder.patch_size} (latent grid {grid} x decoder patch "
                            f"{job.rae.decoder.patch_size}); allowed: {grid * job.rae.decoder.patch_size}")
    _apply_common_training(r, job)
    if steps_per_epoch and job.checkpoint.every_epochs is not None:
        job.checkpoint.every_steps = max(1, int(job.checkpoint.every_epochs * steps_per_epoch))
        job.checkpoint.every_epochs = None


def _raev2_optimizer(r: _RAEv2Reader, notes: list[str], steps_per_epoch: int | None):
    """training.optimizer (gmuon | adamw) and training.scheduler -> optimizer, schedule. RAEv2's
    scheduler sets every parameter group's lr to scheduler.base_lr (optim_utils.py:129-132)."""
    o, s = "training.optimizer", "training.scheduler"
    kind = r.get(f"{o}.type", "adamw")
    if kind not in ("gmuon", "adamw"):
        raise C.ConfigError(f"upstream key '{o}.type': {kind!r} is not supported; allowed: gmuon, adamw")
    lr = float(r.get(f"{o}.lr", 2.0e-4))
    kw: dict[str, Any] = dict(kind="muon" if kind == "gmuon" else "adamw",
                              weight_decay=float(r.get(f"{o}.weight_decay", 0.0)), eps=float(r.get(f"{o}.eps", 1e-8)),
                              betas=[float(b) for b in r.get(f"{o}.betas", [0.9, 0.95])])
    if kind == "gmuon":
        preset = r.get(f"{o}.ns_coefficients_preset", "POLAR_EXPRESS_COEFFICIENTS")
        if preset not in _RAEV2_NS_PRESETS:
            raise C.ConfigError(f"upstream key '{o}.ns_coefficients_preset': {preset!r} is not supported; allowed: "
                                f"{', '.join(_RAEV2_NS_PRESETS)}")
        kw.update(momentum=float(r.get(f"{o}.momentum", 0.95)), nesterov=bool(r.get(f"{o}.nesterov", True)),
                  ns_safety_factor=_RAEV2_NS_PRESETS[preset])
        r.drop(f"{o}.ns_use_kernels", "a kernel choice (same maths); rae_scale runs Newton-Schulz as batched "
                                      "torch matmuls")
    else:
        for key in ("momentum", "nesterov", "ns_coefficients_preset", "ns_use_kernels", "adamw_lr"):
            r.drop(f"{o}.{key}", f"a gmuon setting; {o}.type is adamw")
    scheduled = r.peek(s) is not None
    adamw_lr = r.peek(f"{o}.adamw_lr")
    if scheduled:
        r.drop(f"{o}.adamw_lr", "ignored by RAEv2 when a scheduler is set: every group's lr becomes scheduler.base_lr")
        base = float(r.get(f"{s}.base_lr", 2.0e-4))
        if base != lr:
            notes.append(f"optimizer.lr={base}: RAEv2's scheduler sets every group's lr to {s}.base_lr, not "
                         f"{o}.lr ({lr})")
        return C.OptimizerConfig(lr=base, **kw), _raev2_schedule(r, notes, steps_per_epoch)
    if kind == "gmuon" and adamw_lr is not None and float(adamw_lr) != lr:
        raise C.ConfigError(f"upstream key '{o}.adamw_lr': {adamw_lr} without a scheduler (a separate lr for the "
                            f"AdamW part) is not supported; allowed: null or {o}.lr ({lr})")
    r.get(f"{o}.adamw_lr")
    return C.OptimizerConfig(lr=lr, **kw), C.ScheduleConfig(kind="constant", warmup_steps=0)


def _raev2_schedule(r: _RAEv2Reader, notes: list[str], steps_per_epoch: int | None) -> C.ScheduleConfig:
    """training.scheduler (linear | cosine; points in epochs or steps, steps winning) -> schedule."""
    s = "training.scheduler"
    kind = r.get(f"{s}.type", "cosine")
    if kind not in ("linear", "cosine"):
        raise C.ConfigError(f"upstream key '{s}.type': {kind!r} is not supported; allowed: linear, cosine")
    points: dict[str, Any] = {}
    for epochs_key, steps_key, default, ours in (("warmup_epochs", "warmup_steps", 1.0, "warmup"),
                                                 ("decay_end_epoch", "decay_end_steps", 16.0, "decay_end")):
        steps = r.get(f"{s}.{steps_key}")
        if steps is not None:
            r.drop(f"{s}.{epochs_key}", f"ignored by RAEv2 when {s}.{steps_key} is set")
            points[ours] = ("step", int(steps))
        elif steps_per_epoch:  # an epoch is virtual_epoch_steps batches: the point is a step count
            points[ours] = ("step", int(float(r.get(f"{s}.{epochs_key}", default)) * steps_per_epoch))
        else:
            points[ours] = ("epoch", float(r.get(f"{s}.{epochs_key}", default)))
    (warm_unit, warm), (end_unit, end) = points["warmup"], points["decay_end"]
    if warm_unit == end_unit and end < warm:  # RAEv2 clamps the decay end to the warmup's
        notes.append(f"schedule decay end {end} before warmup end {warm}: RAEv2 clamps it to the warmup end")
        end = warm
    kw = {("warmup_steps" if warm_unit == "step" else "warmup_epochs"): warm,
          ("decay_end_step" if end_unit == "step" else "decay_end_epoch"): end}
    return C.ScheduleConfig(kind=kind, warmup_from_zero=bool(r.get(f"{s}.warmup_from_zero", True)),
                            final_lr=float(r.get(f"{s}.final_lr", 2.0e-5)), **kw)


def _raev2_data_and_eval(r: _RAEv2Reader, job: C.Stage2Job) -> None:
    """dataset: only the flip maps (RAEv2 flips only datasets it transforms itself, not hf / wds);
    eval: only the interval of the online evaluation."""
    job.data.hflip = r.get("dataset.type", "hf") not in ("hf", "wds")
    r.drop("dataset", f"RAEv2 reads images ({r.peek('dataset.target', 'imagenet')}, {r.peek('dataset.type', 'hf')}) "
                      "and encodes them online; rae_scale stage 2 trains on cached latents: make them with "
                      "`rae-scale prepare` and `rae-scale cache-latents` (RAEv2's encoder), then set data.latents_url")
    if r.peek("eval") is not None:
        job.eval.every_steps = int(r.get("eval.eval_interval", 5000))
    r.drop("eval", "rae_scale's online eval computes FID of eval.num_samples samples against eval.reference; "
                   "RAEv2's eval datasets, metrics and folders do not map (set eval.reference)")
