"""Import the upstream RAE YAML configs (blocks stage_1, stage_2, transport, sampler, guidance, misc,
training, eval, gan with `target:` class paths) into rae_scale job configs.

Every field is either mapped or reported in `dropped`, so nothing is lost silently.
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
    notes: list[str] = field(default_factory=list)  # values corrected because upstream was inconsistent


class _Reader:
    """Walks a nested dict, remembering which leaves were consumed."""

    def __init__(self, data: dict):
        self.data = data
        self.used: set[str] = set()

    def get(self, path: str, default=None):
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        self._mark(path, node)
        return node

    def has(self, path: str) -> bool:
        sentinel = object()
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return node is not sentinel

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
    dec_path = r.get(f"{p}.decoder_config_path", "configs/decoder/ViTXL")
    preset_name = Path(str(dec_path)).name
    if preset_name not in DECODER_PRESETS:
        raise C.ConfigError(f"upstream key '{p}.decoder_config_path': unknown decoder {preset_name!r}; "
                            f"allowed: {', '.join(DECODER_PRESETS)}")
    decoder = C.DecoderConfig(preset=DECODER_PRESETS[preset_name], patch_size=int(r.get(f"{p}.decoder_patch_size", 16)))
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
