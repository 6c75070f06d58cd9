"""Typed job configs: dataclasses (OmegaConf structured configs), YAML files and `a.b.c=value` overrides.

Every job has one root dataclass (see ``JOBS``). Loading goes YAML -> overrides -> typed object ->
``validate``; any user mistake raises :class:`ConfigError` with a one-line message naming the full key
path, the bad value and what is allowed (the CLI turns it into exit code 2). Fields carry their
allowed values in ``metadata``: ``choices`` for enumerations, ``min``/``max`` for ranges.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line and says what is allowed."""


def choice(default, *choices):
    return field(default=default, metadata={"choices": tuple(choices)})


def ranged(default, lo=None, hi=None, *, above=None):
    """A number field with inclusive bounds lo/hi, or an exclusive lower bound `above` (epochs > 0)."""
    return field(default=default, metadata={"min": lo, "max": hi, "above": above})


def checked(default=dataclasses.MISSING, default_factory=dataclasses.MISSING, *, check, allowed: str):
    """A field whose value `check(value)` must accept; `allowed` says what is, for the error message."""
    return field(default=default, default_factory=default_factory, metadata={"check": check, "allowed": allowed})


def _two_betas(v) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in v))


def _resume_value(v) -> bool:
    """auto, never, or something that names a folder: a path or URL (the manager then checks it is a
    committed step folder). A bare word is a typo of auto/never, not a folder."""
    return isinstance(v, str) and (v in ("auto", "never") or "/" in v or v.startswith("step-"))


# ----------------------------------------------------------------------------- shared blocks


@dataclass
class RunConfig:
    """Where a run lives and how it is seeded."""

    dir: str = "runs/default"  # local path or fsspec URL (file://, s3://, ...)
    name: Optional[str] = None  # defaults to the last component of dir
    seed: int = ranged(42, 0)
    # fsspec options for run.dir (e.g. {"client_kwargs": {"endpoint_url": ...}}); secrets here are redacted.
    storage_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EncoderConfig:
    """Frozen representation encoder: a pretrained name/folder, or sizes for a random one (tests, demos)."""

    kind: str = choice("dinov2", "dinov2", "siglip2", "mae")
    pretrained: Optional[str] = None  # HF hub name or local folder (save_pretrained layout)
    hidden_size: int = ranged(768, 1)
    num_layers: int = ranged(12, 1)
    num_heads: int = ranged(12, 1)
    intermediate_size: Optional[int] = None
    patch_size: int = ranged(14, 1)
    input_size: int = ranged(224, 1)


@dataclass
class DecoderConfig:
    """ViT-MAE-style pixel decoder; a preset (B, L, XL) or explicit sizes when preset is null."""

    preset: Optional[str] = field(default="XL", metadata={"choices": ("B", "L", "XL", None)})
    hidden_size: int = ranged(1152, 1)
    num_layers: int = ranged(28, 1)
    num_heads: int = ranged(16, 1)
    intermediate_size: int = ranged(4096, 1)
    patch_size: int = ranged(16, 1)


@dataclass
class RAEConfig:
    """Stage-1 autoencoder: encoder + latent statistics + decoder."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    noise_tau: float = ranged(0.0, 0.0)
    stats_path: Optional[str] = None  # latent mean/var file ({"mean","var"} .pt or our stats file)
    decoder_checkpoint: Optional[str] = None  # decoder weights: rae_scale checkpoint, upstream .pt, safetensors
    image_size: int = ranged(256, 8)


@dataclass
class DataConfig:
    """Training data: image shards (stage 1, stage 2 online) or cached latents (stage 2 default)."""

    url: str = ""  # image shards (MDS folder or webdataset pattern), local path or URL
    latents_url: str = ""  # latent cache written by `rae-scale cache-latents`
    source: str = choice("latents", "latents", "images")  # stage 2: cached latents or online encoding
    format: str = choice("mds", "mds", "wds")
    hflip: bool = True
    num_workers: int = ranged(0, 0)
    cache_dir: Optional[str] = None  # local cache for remote shards
    num_canonical_nodes: Optional[int] = None  # MDS: fix it to keep the sample order across world sizes
    # Built on first use when the folder above is missing (tiny configs): a digits dataset.
    build_if_missing: bool = False


@dataclass
class OptimizerConfig:
    lr: float = ranged(2.0e-4, 0.0)
    betas: List[float] = checked(default_factory=lambda: [0.9, 0.95], check=_two_betas,
                                 allowed="two numbers in [0, 1), e.g. [0.9, 0.95]")
    weight_decay: float = ranged(0.0, 0.0)
    eps: float = ranged(1.0e-8, 0.0)


@dataclass
class ScheduleConfig:
    """LR schedule in steps: warmup then cosine/linear decay to final_lr, constant afterwards."""

    kind: str = choice("cosine", "cosine", "linear", "constant")
    warmup_steps: int = ranged(0, 0)
    warmup_from_zero: bool = True  # ramp (step+1)/warmup; false holds base lr during warmup
    decay_end_step: Optional[int] = None  # defaults to the run's last step
    final_lr: float = ranged(2.0e-5, 0.0)
    # Epoch spellings (upstream's); when set they win over the step fields above.
    warmup_epochs: Optional[float] = None
    decay_end_epoch: Optional[float] = None


@dataclass
class TrainingConfig:
    """Batch arithmetic, limits and step-level numerics shared by both stages."""

    global_batch_size: int = ranged(512, 1)
    micro_batch_size: Optional[int] = None  # per rank per micro-step; derived when null
    grad_accum_steps: int = ranged(1, 1)
    max_steps: Optional[int] = ranged(None, 1)
    epochs: Optional[float] = ranged(None, above=0.0)
    ema_decay: float = ranged(0.9995, 0.0, 1.0)
    clip_grad: float = ranged(0.0, 0.0)  # 0 disables clipping
    on_nonfinite: str = choice("stop", "stop", "skip")


@dataclass
class ParallelConfig:
    strategy: str = choice("ddp", "ddp", "fsdp", "deepspeed")
    zero_stage: int = field(default=2, metadata={"choices": (1, 2, 3)})
    precision: str = choice("fp32", "fp32", "bf16")
    tf32: bool = True
    activation_checkpointing: str = choice("none", "none", "full", "every_k")
    ac_every: int = ranged(2, 1)
    compile: bool = False
    reshard_after_forward: bool = True
    hsdp_replicas: Optional[int] = None  # FSDP: >1 replicates across this many groups (2-D mesh)
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # dotted DeepSpeed JSON overrides
    nproc: int = ranged(1, 1)  # local ranks to spawn when not started by torchrun/Slurm/Ray


@dataclass
class CheckpointConfig:
    every_steps: int = ranged(1000, 1)
    every_epochs: Optional[float] = None  # when set, wins over every_steps
    keep_last: int = ranged(3, 1)
    keep_every: Optional[int] = None  # also keep every N-th step
    async_save: bool = True
    resume: str = checked("auto", check=_resume_value,
                          allowed="auto, never, or the path/URL of a step folder (e.g. RUN/checkpoints/step-00001000)")
    # with resume=never: clear this run folder's earlier checkpoints, metrics and grids first
    overwrite: bool = False
    # a run folder holds one training at a time; a lease without heartbeat this long is taken over
    lease_timeout_s: float = ranged(120.0, 5.0)
    exit_timeout_s: float = ranged(600.0, 1.0)  # force exit if the preemption save hangs
    preemption_signal: str = choice("SIGUSR2", "SIGUSR1", "SIGUSR2", "SIGINT")


@dataclass
class LoggingConfig:
    every_steps: int = ranged(100, 1)
    wandb: str = choice("off", "off", "online", "offline")
    wandb_project: str = "rae_scale"
    wandb_entity: Optional[str] = None
    sample_every_steps: int = ranged(2500, 1)
    num_sample_images: int = ranged(16, 1)


@dataclass
class GANConfig:
    """Stage-1 adversarial and perceptual losses (upstream `gan` block); epochs as in upstream."""

    disc_weight: float = ranged(0.75, 0.0)
    perceptual_weight: float = ranged(1.0, 0.0)
    disc_start_epoch: float = ranged(8.0, 0.0)  # generator GAN loss from this epoch
    disc_update_start_epoch: float = ranged(6.0, 0.0)  # discriminator updates from this epoch
    lpips_start_epoch: float = ranged(0.0, 0.0)
    max_d_weight: float = ranged(1.0e4, 0.0)
    disc_updates: int = ranged(1, 1)
    disc_loss: str = choice("hinge", "hinge", "vanilla")
    gen_loss: str = choice("vanilla", "vanilla", "hinge")
    dino_checkpoint: Optional[str] = None  # DINO ViT-S/8 weights file; random backbone when null (tests)
    disc_depth: int = ranged(12, 1)
    disc_width: int = ranged(384, 1)
    disc_heads: int = ranged(6, 1)
    disc_patch: int = ranged(8, 1)
    kernel_size: int = ranged(9, 1)
    norm_type: str = choice("bn", "bn", "gn", "none")
    spectral_norm: bool = True
    diffaug_prob: float = ranged(1.0, 0.0, 1.0)
    diffaug_cutout: float = ranged(0.0, 0.0, 1.0)
    lpips_vgg_weights: Optional[str] = None  # VGG16 backbone file; torchvision cache when null
    lpips_random_backbone: bool = False  # tests only: random VGG (nothing can be downloaded there)
    disc_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class DiTConfig:
    """Stage-2 network: DiT-DH (`dit_dh`) or LightningDiT, upstream constructor fields."""

    model: str = choice("dit_dh", "dit_dh", "lightning_dit")
    preset: Optional[str] = field(default="XL", metadata={"choices": ("S", "B", "L", "XL", None)})
    input_size: int = ranged(16, 1)
    patch_size: int = ranged(1, 1)
    in_channels: int = ranged(768, 1)
    hidden_size: List[int] = field(default_factory=lambda: [1152, 2048])
    depth: List[int] = field(default_factory=lambda: [28, 2])
    num_heads: List[int] = field(default_factory=lambda: [16, 16])
    mlp_ratio: float = ranged(4.0, 0.0)
    class_dropout_prob: float = ranged(0.1, 0.0, 1.0)
    num_classes: int = ranged(1000, 1)
    # init std of the class-embedding table (upstream 0.02); larger makes class conditioning appear
    # within a short run (the CPU quickstart), an init-only choice that checkpoints do not record
    label_embed_std: float = ranged(0.02, 0.0)
    use_qknorm: bool = False
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    wo_shift: bool = False
    use_pos_embed: bool = True
    checkpoint: Optional[str] = None  # initial / released weights (.pt or .safetensors)


@dataclass
class TransportConfig:
    time_dist: str = choice("logit_normal", "uniform", "logit_normal")
    time_mu: float = 0.0
    time_sigma: float = ranged(1.0, 0.0)
    shift_dim: Optional[int] = None  # C*H*W of the latent when null
    shift_base: int = ranged(4096, 1)


@dataclass
class SamplerConfig:
    mode: str = choice("ode", "ode", "sde")
    method: str = choice("euler", "euler", "heun", "dopri5")
    num_steps: int = ranged(50, 2)
    atol: float = ranged(1.0e-6, 0.0)
    rtol: float = ranged(1.0e-3, 0.0)


@dataclass
class GuidanceConfig:
    method: str = choice("none", "none", "cfg", "autoguidance")
    scale: float = ranged(1.0, 0.0)
    t_min: float = ranged(0.0, 0.0, 1.0)
    t_max: float = ranged(1.0, 0.0, 1.0)
    guidance_model: Optional[DiTConfig] = None  # autoguidance: the smaller model


@dataclass
class OnlineEvalConfig:
    every_steps: int = ranged(0, 0)  # 0 disables online evaluation
    num_samples: int = ranged(1000, 1)
    reference: Optional[str] = None  # ADM npz or image folder / shards
    use_ema: bool = True


# ----------------------------------------------------------------------------- jobs


@dataclass
class PrepareJob:
    """`rae-scale prepare`: image folder -> MDS / webdataset shards with the ADM center crop."""

    input: str = ""
    output: str = ""
    resolution: int = ranged(256, 8)
    format: str = choice("mds", "mds", "wds")
    image_format: str = choice("jpeg", "jpeg", "png")
    jpeg_quality: int = ranged(95, 1, 100)
    labels_file: Optional[str] = None
    shard_size_mb: int = ranged(64, 1)
    num_workers: Optional[int] = None
    ray_address: Optional[str] = None
    overwrite: bool = False


@dataclass
class CacheLatentsJob:
    """`rae-scale cache-latents`: image shards -> encoder latents as MDS shards."""

    input: str = ""
    output: str = ""
    rae: RAEConfig = field(default_factory=RAEConfig)
    batch_size: int = ranged(64, 1)
    dtype: str = choice("fp32", "fp32", "bf16")
    both_flips: bool = True
    num_workers: Optional[int] = None
    ray_address: Optional[str] = None


@dataclass
class StatsJob:
    """`rae-scale stats`: exact per-position latent mean and variance."""

    input: str = ""
    kind: str = choice("latents", "latents", "images")
    output: str = ""
    rae: RAEConfig = field(default_factory=RAEConfig)
    num_workers: int = ranged(2, 1)
    ray_address: Optional[str] = None


@dataclass
class Stage1Job:
    """`rae-scale train stage1`: decoder training with L1 + LPIPS + GAN."""

    run: RunConfig = field(default_factory=RunConfig)
    rae: RAEConfig = field(default_factory=lambda: RAEConfig(noise_tau=0.8))
    data: DataConfig = field(default_factory=lambda: DataConfig(source="images", hflip=False))
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(ema_decay=0.9978, epochs=16))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)


@dataclass
class Stage2Job:
    """`rae-scale train stage2`: DiT-DH / LightningDiT flow matching on RAE latents."""

    run: RunConfig = field(default_factory=RunConfig)
    rae: RAEConfig = field(default_factory=RAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(global_batch_size=1024, ema_decay=0.9995, clip_grad=1.0))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="linear", warmup_from_zero=False))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)


@dataclass
class SampleJob:
    """`rae-scale sample` / `generate`: class-conditional images from a stage-2 model."""

    run: RunConfig = field(default_factory=RunConfig)
    rae: RAEConfig = field(default_factory=RAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    checkpoint: Optional[str] = None  # a rae_scale step folder, an exported file or upstream .pt
    class_ids: List[int] = field(default_factory=list)
    num_samples: int = ranged(8, 1)
    batch_size: int = ranged(16, 1)
    seed: int = ranged(0, 0)
    output: str = "samples"
    precision: str = choice("fp32", "fp32", "bf16")


@dataclass
class EvalJob:
    """`rae-scale evaluate fid|recon`: metrics over many samples spread across workers."""

    sample: SampleJob = field(default_factory=SampleJob)
    num_samples: int = ranged(50000, 1)
    batch_size: int = ranged(64, 1)
    label_sampling: str = choice("equal", "equal", "random")
    reference: Optional[str] = None
    data_url: str = ""  # recon: dataset to reconstruct
    output: str = "eval"
    save_png: bool = False
    save_npz: bool = False
    inception_weights: Optional[str] = None
    backend: str = choice("torch", "torch", "ray")


@dataclass
class LaunchJob:
    """`rae-scale launch`: where and how big."""

    nodes: int = ranged(1, 1)
    gpus_per_node: int = ranged(8, 0)
    cpus_per_task: int = ranged(8, 1)
    partition: Optional[str] = None
    time: str = "24:00:00"
    signal_seconds: int = ranged(300, 0)
    job_name: str = "rae_scale"
    log_dir: str = "logs"
    ray_address: Optional[str] = None


JOBS: dict[str, type] = {
    "prepare": PrepareJob,
    "cache_latents": CacheLatentsJob,
    "stats": StatsJob,
    "stage1": Stage1Job,
    "stage2": Stage2Job,
    "sample": SampleJob,
    "evaluate": EvalJob,
    "launch": LaunchJob,
}


# ----------------------------------------------------------------------------- loading


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _field_type(cls, name: str):
    import typing

    hints = typing.get_type_hints(cls)
    return hints[name]


def _dataclass_of(tp):
    """The dataclass inside a (possibly Optional) annotation, else None."""
    import typing

    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _unknown_key(path: str, name: str, cls) -> ConfigError:
    valid = sorted(_fields(cls))
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"did you mean '{path}{near[0]}'?" if near else f"valid keys here: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{path}{name}'; {hint}")


def _check_keys(data: Any, cls, path: str = "") -> None:
    """Reject keys that the dataclass tree does not have, suggesting the nearest one."""
    if not isinstance(data, dict):
        return
    fields = _fields(cls)
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(path, str(key), cls)
        sub = _dataclass_of(_field_type(cls, key))
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, f"{path}{key}.")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value parsed as YAML, so 3e-4, [1,2], null and true work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override key '{key}' is not a dotted name like training.max_steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 3e-4 as a string; numbers written like that are meant as floats.
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        value = float(value)
    return key, value


def _set_dotted(data: dict, key: str, value: Any, cls) -> None:
    parts = key.split(".")
    node, node_cls, path = data, cls, ""
    for i, part in enumerate(parts):
        fields = _fields(node_cls) if node_cls is not None else None
        if fields is not None and part not in fields:
            raise _unknown_key(path, part, node_cls)
        if i == len(parts) - 1:
            node[part] = value
            return
        sub_cls = _dataclass_of(_field_type(node_cls, part)) if node_cls is not None else None
        if sub_cls is None:  # a free-form dict field such as parallel.deepspeed
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{path}{part}' is not a section; cannot set '{key}'")
            node, node_cls = child, None
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            node, node_cls = child, sub_cls
        path += part + "."


def _type_name_at(cls, dotted: str) -> str:
    """Human name of the declared type of a dotted key, for error messages."""
    import typing

    node = cls
    tp = None
    for part in dotted.split("."):
        if node is None or part not in _fields(node):
            return "see the config reference"
        tp = _field_type(node, part)
        node = _dataclass_of(tp)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return names.get(args[0], str(args[0]).replace("typing.", "")) + " or null"
    if typing.get_origin(tp) in (list, typing.List):
        return f"a list of {names.get(args[0], args[0]).split(' ', 1)[-1]}s"
    return names.get(tp, str(tp).replace("typing.", ""))


def _format_validation_error(exc: Exception, cls) -> ConfigError:
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, OmegaConfBaseException):
        key = getattr(exc, "full_key", None) or "?"
        value = getattr(exc, "value", None)
        return ConfigError(f"config key '{key}': bad value {value!r}; allowed: {_type_name_at(cls, str(key))}")
    return ConfigError(str(exc))


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Build a validated `cls` instance from defaults, an optional YAML file and dotted overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(loaded).__name__}")
        loaded.pop("job", None)  # informative tag written by `config show`
        data = loaded
    _check_keys(data, cls)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value, cls)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _format_validation_error(exc, cls) from None
    validate(obj)
    return obj


def validate(obj, path: str = "") -> None:
    """Check choices and ranges declared in field metadata, recursively."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            allowed = ", ".join("null" if c is None else str(c) for c in meta["choices"])
            raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: {allowed}")
        if "check" in meta and not meta["check"](value):
            raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: {meta['allowed']}")
        lo, hi, above = meta.get("min"), meta.get("max"), meta.get("above")
        if value is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            unset = " (or null)" if _optional(type(obj), f.name) else ""
            if lo is not None and value < lo:
                raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: >= {lo}{unset}")
            if above is not None and value <= above:
                raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: > {above}{unset}")
            if hi is not None and value > hi:
                raise ConfigError(f"config key '{key}': bad value {value!r}; allowed: <= {hi}{unset}")


def _optional(cls, name: str) -> bool:
    import typing

    return type(None) in typing.get_args(_field_type(cls, name))


# ----------------------------------------------------------------------------- output

REDACTED = "***"

# A key is secret when one of these words is part of its name (split at _ - . and camelCase): key,
# account_key, aws_secret_access_key, secret, token, sas_token, password, passphrase, Authorization
# (any header, any case), credentials, signature / sig (signed URLs), cookie; or it is a connection string.
_SECRET_WORDS = frozenset({"key", "apikey", "secret", "token", "password", "passwd", "passphrase",
                           "authorization", "credential", "credentials", "signature", "sig", "cookie"})
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# user:pass@ (or a bare token@) inside any URL
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"<>]+@")
# key=value: a whole argv item, a quoted one inside a shell line, and a bare one inside text / a query string
_ARG = re.compile(r"(-*)([A-Za-z_][\w.\-]*)=(.*)", re.S)
_QUOTED_ASSIGN = re.compile(r"(['\"])([A-Za-z_][\w.\-]*)=([^'\"]*)\1")
_ASSIGN = re.compile(r"([A-Za-z_][\w.\-]*)=(\"[^\"]*\"|'[^']*'|[^\s&;,'\"]+)")
# 'key': 'value' / "key": "value" in a printed dict or JSON
_MAPPING = re.compile(r"(['\"])([^'\"\n]+)\1(\s*:\s*)('[^']*'|\"[^\"]*\"|[^\s,{}\[\]]+)")


def is_secret_key(name: str) -> bool:
    """Whether a (possibly dotted) key names a secret; the last dotted component decides."""
    last = str(name).rsplit(".", 1)[-1]
    words = {w.lower() for w in _WORDS.findall(last)}
    flat = re.sub(r"[^a-z]", "", last.lower())
    return bool(words & _SECRET_WORDS) or flat in _SECRET_WORDS or "connectionstring" in flat


def _redact_text(text: str) -> str:
    text = _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
    m = _ARG.fullmatch(text)
    if m and is_secret_key(m.group(2)):
        return f"{m.group(1)}{m.group(2)}={REDACTED}"
    text = _QUOTED_ASSIGN.sub(lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}{m.group(1)}"
                              if is_secret_key(m.group(2)) else m.group(0), text)
    text = _ASSIGN.sub(lambda m: f"{m.group(1)}={REDACTED}" if is_secret_key(m.group(1)) else m.group(0), text)
    return _MAPPING.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}'{REDACTED}'"
                        if is_secret_key(m.group(2)) else m.group(0), text)


def redact(value: Any) -> Any:
    """A copy of `value` that is safe to print, log, save or hand to wandb: the one redaction function.

    Config trees: entries under secret-looking keys (see is_secret_key) become '***'. Strings (config
    values, argv items, log lines): `user:pass@` in URLs, `secret.key=value` assignments and
    `'secret': value` pairs. Lists of strings are command lines: the value after a `--secret-flag` too.
    """
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [redact(v) for v in value]
        for i in range(1, len(out)):
            prev = value[i - 1]
            if (isinstance(prev, str) and prev.startswith("-") and "=" not in prev and isinstance(value[i], str)
                    and is_secret_key(prev.lstrip("-"))):
                out[i] = REDACTED
        return type(value)(out) if isinstance(value, tuple) else out
    if isinstance(value, str):
        return _redact_text(value)
    return value


def to_dict(obj) -> dict:
    """Plain dict of a config object, secrets redacted (safe to print, log and save)."""
    return redact(dataclasses.asdict(obj))


def to_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


def save_resolved(obj, run_dir: str, storage_options: dict | None = None, name: str = "config.yaml") -> str:
    """Write the resolved (redacted) config beside a run; returns the file URL."""
    import fsspec

    url = run_dir.rstrip("/") + "/" + name
    fs, fpath = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(fpath.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(fpath, "w") as fh:
        fh.write(to_yaml(obj))
    return url


def from_dict(cls, data: dict):
    """Inverse of to_dict for configs saved beside runs and checkpoints."""
    from omegaconf import OmegaConf

    _check_keys(data, cls)
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data)))
    validate(obj)
    return obj
