"""Typed job configs: one tree of dataclasses per job (OmegaConf structured configs).

Fields carry their allowed values (see `fields`). A null in a field documented as "derived" is
filled when the job is loaded (`derive.resolve`); an explicit value there must agree with what it
is derived from. Stage-2, sample and eval jobs share one generator section (`GeneratorSections`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from rae_scale.config.fields import checked, choice, ranged, resume_value, two_betas

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
    """Frozen representation encoder: a pretrained name/folder, or sizes for a random one (tests, demos).

    The sizes also define the latent: [hidden_size, input_size / patch_size, input_size / patch_size]
    (DINOv2's CLS and register tokens are dropped), so state them for pretrained encoders too.
    `layers` selects RAEv2's multi-layer latent (0-based blocks, models.encoders); the latent keeps
    hidden_size channels.
    """

    kind: str = choice("dinov2", "siglip2", "mae", "dinov3")
    # HF hub name or local folder (save_pretrained layout); for dinov3 also Meta's original .pth file
    pretrained: Optional[str] = None
    layers: Optional[List[int]] = None  # dinov2 | dinov3 | siglip2: blocks of the multi-layer latent
    hidden_size: int = ranged(768, 1)
    num_layers: int = ranged(12, 1)
    num_heads: int = ranged(12, 1)
    intermediate_size: Optional[int] = None
    patch_size: int = ranged(14, 1)
    input_size: int = ranged(224, 1)


@dataclass
class DecoderConfig:
    """ViT-MAE-style pixel decoder: a preset (B, L, XL), or preset null and all four sizes.

    A size left null comes from the preset; one given beside a preset must equal the preset's.
    """

    preset: Optional[str] = choice("B", "L", "XL", None, default="XL")
    hidden_size: Optional[int] = ranged(None, 1)
    num_layers: Optional[int] = ranged(None, 1)
    num_heads: Optional[int] = ranged(None, 1)
    intermediate_size: Optional[int] = ranged(None, 1)
    patch_size: int = ranged(16, 1)


@dataclass
class RAEConfig:
    """Stage-1 autoencoder: encoder + latent statistics + decoder."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    noise_tau: float = ranged(0.0, 0.0)
    stats_path: Optional[str] = None  # latent mean/var file ({"mean","var"} .pt or our stats file)
    decoder_checkpoint: Optional[str] = None  # decoder weights: rae_scale checkpoint, upstream .pt, safetensors
    image_size: Optional[int] = ranged(None, 8)  # derived: encoder grid * decoder.patch_size


def _sources_ok(sources) -> bool:
    """Each entry of data.sources: a url, a weight > 0, format mds|wds, kind images, unique names."""
    from rae_scale.config.errors import ConfigError

    names = set()
    for i, s in enumerate(sources or []):
        key = f"config key 'data.sources[{i}]"
        if not s.url:
            raise ConfigError(f"{key}.url': empty; give the folder or URL of prepared shards")
        if not isinstance(s.weight, (int, float)) or not s.weight > 0:
            raise ConfigError(f"{key}.weight': bad value {s.weight!r}; allowed: a number > 0")
        if s.format not in ("mds", "wds"):
            raise ConfigError(f"{key}.format': bad value {s.format!r}; allowed: mds, wds")
        if s.kind not in ("images",):
            raise ConfigError(f"{key}.kind': bad value {s.kind!r}; allowed: images (mixtures of latent caches "
                              "are not implemented)")
        name = s.name or s.url.rstrip("/").rsplit("/", 1)[-1]
        if name in names:
            raise ConfigError(f"{key}.name': {name!r} names two sources; give each source a distinct name")
        names.add(name)
    return True


@dataclass
class SourceConfig:
    """One source of a weighted mixture (data.sources): prepared shards and their share of the samples."""

    url: str = ""
    weight: float = 1.0  # relative: shares are weight / sum of weights
    format: str = "mds"  # mds (elastic, through streaming's Stream proportions) or wds (exact on one world size)
    kind: str = "images"
    name: Optional[str] = None  # metrics key data_share/<name>; defaults to the url's last component


@dataclass
class DataConfig:
    """Training data: image shards (stage 1) or cached latents (stage 2)."""

    url: str = ""  # image shards (MDS folder or webdataset pattern), local path or URL
    # weighted mixture of prepared shard folders, instead of url (url is the one-source shorthand)
    sources: List[SourceConfig] = checked(default_factory=list, check=_sources_ok,
                                          allowed="a list of {url, weight > 0, format mds|wds, kind images, name}")
    latents_url: str = ""  # latent cache written by `rae-scale cache-latents`
    # stage 1 reads images, stage 2 cached latents (online encoding in stage 2 is not implemented yet)
    source: str = choice("latents", "images")
    format: str = choice("mds", "wds")
    hflip: bool = True
    num_workers: int = ranged(0, 0)
    cache_dir: Optional[str] = None  # local cache for remote shards
    num_canonical_nodes: Optional[int] = None  # MDS: fix it to keep the sample order across world sizes
    # Built on first use when the folder above is missing (tiny configs): a digits dataset.
    build_if_missing: bool = False


@dataclass
class OptimizerConfig:
    """AdamW, or RAEv2's gmuon (`muon`): Muon on 2-D parameters (momentum, Nesterov, Newton-Schulz with
    the Polar-Express coefficients) and AdamW (betas, eps) on the others; lr, weight_decay shared."""

    kind: str = choice("adamw", "muon")
    lr: float = ranged(2.0e-4, 0.0)
    betas: List[float] = checked(default_factory=lambda: [0.9, 0.95], check=two_betas,
                                 allowed="two numbers in [0, 1), e.g. [0.9, 0.95]")
    weight_decay: float = ranged(0.0, 0.0)
    eps: float = ranged(1.0e-8, 0.0)
    momentum: float = ranged(0.95, 0.0, 1.0)  # muon
    nesterov: bool = True  # muon
    ns_safety_factor: float = ranged(1.05, 1.0)  # muon: Polar-Express coefficients' safety factor
    ns_restart_iterations: List[int] = checked(  # muon: Gram Newton-Schulz restarts
        default_factory=lambda: [2], check=lambda v: isinstance(v, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= 4 for i in v),
        allowed="a list of iteration numbers in 1..4, e.g. [2]")
    ns_max_batch: Optional[int] = ranged(None, 1)  # muon: matrices per batched Newton-Schulz call
    # AdamW kernel (also gmuon's AdamW part): auto = fused on an accelerator (CUDA) where torch has one for
    # the parameters' dtype, foreach otherwise (the CPU included: see optim.adamw.kernel_kwargs)
    implementation: str = choice("auto", "fused", "foreach", "loop")


@dataclass
class ScheduleConfig:
    """LR schedule: warmup (ramped, or held at the base lr), cosine/linear decay from the decay start
    to final_lr at the decay end, constant afterwards (rae_scale.optim.schedules.lr_factor_fn). Each
    point in steps or in epochs (upstream's spelling, int(epochs x steps per epoch)), not both."""

    kind: str = choice("cosine", "linear", "constant")
    warmup_steps: int = ranged(0, 0)
    warmup_from_zero: bool = True  # ramp (step+1)/warmup; false holds base lr during warmup
    decay_start_step: Optional[int] = ranged(None, 0)  # defaults to the end of warmup
    decay_end_step: Optional[int] = ranged(None, 0)  # defaults to the run's last step
    final_lr: float = ranged(2.0e-5, 0.0)
    warmup_epochs: Optional[float] = ranged(None, 0.0)
    decay_start_epoch: Optional[float] = ranged(None, 0.0)
    decay_end_epoch: Optional[float] = ranged(None, 0.0)


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
    on_nonfinite: str = choice("stop", "skip")
    # stage 2's tripwires (section `tripwire`): warn logs a failed check, stop also saves and ends the run
    on_tripwire: str = choice("warn", "stop", "off")
    # an "epoch" of this many optimizer steps (schedules, checkpoints), for unbounded or mixed data
    virtual_epoch_steps: Optional[int] = ranged(None, 1)


@dataclass
class ParallelConfig:
    strategy: str = choice("ddp", "fsdp", "deepspeed")
    zero_stage: int = choice(1, 2, 3, default=2)
    precision: str = choice("fp32", "bf16")
    tf32: bool = True
    activation_checkpointing: str = choice("none", "full", "every_k")
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
    resume: str = checked("auto", check=resume_value,
                          allowed="auto, never, or the path/URL of a step folder (e.g. RUN/checkpoints/step-00001000)")
    # with resume=never: clear this run folder's earlier checkpoints, metrics and grids first
    overwrite: bool = False
    # a run folder holds one training at a time; a lease without heartbeat this long is taken over
    lease_timeout_s: float = ranged(120.0, 5.0)
    exit_timeout_s: float = ranged(600.0, 1.0)  # force exit if the preemption save hangs
    preemption_signal: str = choice("SIGUSR1", "SIGUSR2", "SIGINT", default="SIGUSR2")


@dataclass
class LoggingConfig:
    every_steps: int = ranged(100, 1)
    wandb: str = choice("off", "online", "offline")
    wandb_project: str = "rae_scale"
    wandb_entity: Optional[str] = None
    sample_every_steps: int = ranged(2500, 1)
    num_sample_images: int = ranged(16, 1)


@dataclass
class GANConfig:
    """Stage-1 adversarial and perceptual losses (upstream `gan` block); epochs as in upstream.

    The loop makes one discriminator update per step (upstream's `disc_updates` is always 1).
    """

    disc_weight: float = ranged(0.75, 0.0)
    perceptual_weight: float = ranged(1.0, 0.0)
    disc_start_epoch: float = ranged(8.0, 0.0)  # generator GAN loss from this epoch
    disc_update_start_epoch: float = ranged(6.0, 0.0)  # discriminator updates from this epoch
    lpips_start_epoch: float = ranged(0.0, 0.0)
    max_d_weight: float = ranged(1.0e4, 0.0)
    disc_loss: str = choice("hinge", "vanilla")
    gen_loss: str = choice("vanilla", "hinge")
    dino_checkpoint: Optional[str] = None  # DINO ViT-S/8 weights file; random backbone when null (tests)
    disc_depth: int = ranged(12, 1)
    disc_width: int = ranged(384, 1)
    disc_heads: int = ranged(6, 1)
    disc_patch: int = ranged(8, 1)
    kernel_size: int = ranged(9, 1)
    norm_type: str = choice("bn", "gn")  # the conv heads' norm (models.discriminator)
    spectral_norm: bool = True
    diffaug_prob: float = ranged(1.0, 0.0, 1.0)
    diffaug_cutout: float = ranged(0.0, 0.0, 1.0)
    lpips_vgg_weights: Optional[str] = None  # VGG16 backbone file; torchvision cache when null
    lpips_random_backbone: bool = False  # tests only: random VGG (nothing can be downloaded there)
    disc_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class DiTConfig:
    """Stage-2 network: DiT-DH (`dit_dh`), LightningDiT, or RAEv2's in-context DiT-DH with an
    internal-guidance head (`dit_dh_ig`, an x-prediction network: use transport.prediction=x).

    Sizes: a preset (S, B, L, XL), or preset null and hidden_size/depth/num_heads (lists: body, then
    the head for dit_dh and dit_dh_ig). A size left null comes from the preset; one given beside a
    preset must equal the preset's. in_channels and input_size are derived from the latent (rae.encoder).
    use_qknorm ... use_pos_embed shape dit_dh / lightning_dit; dit_dh_ig's design fixes them (RMSNorm,
    q/k norm, SwiGLU, RoPE on patch tokens, no position table). num_t_tokens ... learn_time_frequencies
    are dit_dh_ig's. class_dropout_prob is the per-sample seeded label dropout of every model (with
    condition_type text: caption dropout, the empty caption being the null condition).
    condition_type text (dit_dh_ig only) conditions on the tokens of the job's `text_encoder`: context_dim
    is derived from text_encoder.hidden_size and num_c_tokens from text_encoder.max_length.
    repa_depth / repa_dim (dit_dh_ig only) add RAEv2's REPA projector, trained by the stage-2 job's `repa` loss.
    """

    model: str = choice("dit_dh", "lightning_dit", "dit_dh_ig")
    preset: Optional[str] = choice("S", "B", "L", "XL", None, default="XL")
    input_size: Optional[int] = ranged(None, 1)  # derived: rae.encoder.input_size / patch_size
    patch_size: int = ranged(1, 1)
    in_channels: Optional[int] = ranged(None, 1)  # derived: rae.encoder.hidden_size
    hidden_size: Optional[List[int]] = None
    depth: Optional[List[int]] = None
    num_heads: Optional[List[int]] = None
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
    # dit_dh_ig (RAEv2 cond_arch): in-context time and condition tokens after the patch tokens, the
    # body block (1-based) whose tokens feed the internal-guidance base head, trainable Fourier W
    num_t_tokens: int = ranged(4, 1)
    num_c_tokens: Optional[int] = ranged(None, 1)  # label: 8 when null; text: derived (text_encoder.max_length)
    base_model_depth: int = ranged(8, 1)
    learn_time_frequencies: bool = True
    condition_type: str = choice("label", "text")
    context_dim: Optional[int] = ranged(None, 1)  # text: derived (text_encoder.hidden_size)
    # dit_dh_ig, RAEv2's explicit REPA: a Linear projector on the body's patch tokens after block repa_depth
    # (1-based) to repa_dim channels; null = no projector (the stage-2 job then trains no REPA loss)
    repa_depth: Optional[int] = ranged(None, 1)
    repa_dim: Optional[int] = ranged(None, 1)  # stage 2: derived (repa.encoder.hidden_size)
    checkpoint: Optional[str] = None  # initial / released weights (.pt or .safetensors)


@dataclass
class TransportConfig:
    """Training times, the time shift and what the network predicts (velocity: RAE; x: RAEv2)."""

    time_dist: str = choice("logit_normal", "uniform")
    time_mu: float = 0.0
    time_sigma: float = ranged(1.0, above=0.0)
    # upper end of the training times before the shift: upstream RAE 0.999, RAEv2 1.0 (no truncation)
    time_max: float = ranged(0.999, hi=1.0, above=0.0)
    shift_dim: Optional[int] = ranged(None, 1)  # derived: C*H*W of the latent
    shift_base: int = ranged(4096, 1)
    prediction: str = choice("velocity", "x")
    t_eps: float = ranged(0.05, hi=1.0, above=0.0)  # x: the loss and sampler use 1 / max(t, t_eps)
    base_model_coeff: float = ranged(1.0, 0.0)  # weight of an internal-guidance base head's loss


@dataclass
class RepaConfig:
    """RAEv2's explicit REPA loss (stage 2; on when dit.repa_depth is set): coeff * mean((projector output -
    target)^2), the target being this frozen encoder's patch tokens of the same images, encoded inside the
    step (data.source=images). RAEv2's: coeff 0.5, DINOv2-B/14 with registers at 224 px (256 x 768 tokens).
    The encoder's token grid must be the DiT's patch grid."""

    coeff: float = ranged(0.5, 0.0)
    encoder: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(kind="dinov2", pretrained="facebook/dinov2-with-registers-base"))


@dataclass
class SamplerConfig:
    """The sampler. grid rae: num_steps points from 1 to 0.001 before the shift (num_steps - 1 Euler
    steps); grid raev2: num_steps Euler steps from 1 exactly to 0 (ode euler only)."""

    mode: str = choice("ode", "sde")
    method: str = choice("euler", "heun", "dopri5")
    num_steps: int = ranged(50, 2)
    grid: str = choice("rae", "raev2")
    atol: float = ranged(1.0e-6, 0.0)
    rtol: float = ranged(1.0e-3, 0.0)


def _guidance_scale_on(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1.0


@dataclass
class GuidanceConfig:
    """Sampling-time guidance. scale/t_min/t_max are CFG's (and autoguidance's); the ig_* keys are internal
    guidance's (a model with a base head); ig_cfg runs both (IG on the conditional and the unconditional
    half, then CFG between them). With transport.prediction=x, a scale of 1 turns its guidance off
    (RAEv2's rules) and scales below 1 are refused."""

    method: str = choice("none", "cfg", "autoguidance", "ig", "ig_cfg")
    scale: float = ranged(1.0, 0.0)
    t_min: float = ranged(0.0, 0.0, 1.0)
    t_max: float = ranged(1.0, 0.0, 1.0)
    ig_scale: float = checked(1.0, check=_guidance_scale_on,
                              allowed="a number >= 1 (RAEv2 treats internal-guidance scales <= 1 as off; "
                                      "turn IG off with guidance.method none or cfg)")
    ig_t_min: float = ranged(0.0, 0.0, 1.0)
    ig_t_max: float = ranged(1.0, 0.0, 1.0)
    ig_unconditional_scale: Optional[float] = ranged(None, 0.0)  # ig_cfg: IG scale of the null half; null = ig_scale
    guidance_model: Optional[DiTConfig] = None  # autoguidance: the smaller model (same latent)


@dataclass
class TextEncoderConfig:
    """Frozen text encoder (models.text): a save_pretrained folder or a hub name in the local cache
    (nothing is downloaded). hidden_size is its width, the DiT's context_dim (loading checks it against
    the weights); the other sizes only shape the seeded random Qwen3 that tiny configs build when
    `pretrained` is missing (build_if_missing). Defaults: Qwen3-0.6B, RAEv2's text encoder."""

    pretrained: str = "Qwen/Qwen3-0.6B"
    max_length: int = ranged(256, 1)  # tokens per caption = condition tokens of the DiT (RAEv2: 256)
    hidden_size: int = ranged(1024, 2)
    num_layers: int = ranged(28, 1)
    num_heads: int = ranged(16, 1)
    num_kv_heads: int = ranged(8, 1)


@dataclass
class OnlineEvalConfig:
    every_steps: int = ranged(0, 0)  # 0 disables online evaluation
    num_samples: int = ranged(1000, 1)
    reference: Optional[str] = None  # ADM npz or image folder / shards
    use_ema: bool = True
    # stage 2, E@FID-k: the first step and epoch at which the online unguided FID reached each k
    fid_k: List[float] = checked(
        default_factory=list, check=lambda v: isinstance(v, list) and all(
            isinstance(k, (int, float)) and not isinstance(k, bool) and k > 0 for k in v),
        allowed="a list of FID values > 0, e.g. [10, 5, 2]")


@dataclass
class TripwireConfig:
    """Stage 2's early checks that a run is not silently failing (rae_scale/train/tripwires.py); what a
    failure does is training.on_tripwire's."""

    # steps at which the window-mean loss must be below max_loss_ratio x the loss of predicting zero
    loss_steps: List[int] = checked(
        default_factory=lambda: [1000, 5000], check=lambda v: isinstance(v, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in v),
        allowed="a list of optimizer steps >= 1, e.g. [1000, 5000] ([] turns the loss check off)")
    max_loss_ratio: float = ranged(0.9, above=0.0)
    # at the first online evaluation: (FID of the samples - floor) / (FID of decoded Gaussian noise - floor)
    # must be below this; floor = FID of the data's own first latents decoded (train/tripwires.py)
    max_fid_ratio: float = ranged(0.8, above=0.0)
    # ... and the samples' between-class / within-class feature variance must reach this (0 = off)
    min_class_separation: float = ranged(1.5, 0.0)


# ----------------------------------------------------------------------------- jobs


@dataclass
class GeneratorSections:
    """What a class-conditional generator is: stated once, shared by training, sampling and eval.

    Stage2Job and SampleJob inherit these fields (their YAML keys stay top-level: `dit.*`, ...);
    EvalJob holds a SampleJob under `sample`. `from_generator` moves them from one job to another.
    """

    run: RunConfig = field(default_factory=RunConfig)
    rae: RAEConfig = field(default_factory=RAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # dit.condition_type text only


@dataclass
class PrepareJob:
    """`rae-scale prepare`: image folder -> MDS / webdataset shards with the ADM center crop."""

    input: str = ""
    output: str = ""
    resolution: int = ranged(256, 8)
    format: str = choice("mds", "wds")
    image_format: str = choice("jpeg", "png")
    jpeg_quality: int = ranged(95, 1, 100)
    labels_file: Optional[str] = None
    # folder input: {file: caption} as JSON, JSON lines {"file", "caption"} or <file><TAB><caption> lines
    captions_file: Optional[str] = None
    shard_size_mb: int = ranged(64, 1)
    num_workers: Optional[int] = None
    ray_address: Optional[str] = None
    overwrite: bool = False
    # folder: class folders or a flat folder + labels_file; wds: webdataset tars (BLIP3o layout); auto: wds
    # when the input holds .tar files and no images
    input_format: str = choice("auto", "folder", "wds")
    source_name: Optional[str] = None  # the `source` column; default: the input folder's name (tars: their folder)
    keep_uncaptioned: bool = False  # wds input: keep a sample without a caption (caption "") instead of skipping it


@dataclass
class CacheLatentsJob:
    """`rae-scale cache-latents`: image shards -> encoder latents as MDS shards."""

    input: str = ""
    output: str = ""
    rae: RAEConfig = field(default_factory=RAEConfig)
    batch_size: int = ranged(64, 1)
    # bf16 halves the cache (the statistics and the normalisation still run in float32/float64); fp32 caches
    # stay readable
    dtype: str = choice("bf16", "fp32")
    both_flips: bool = True
    num_workers: Optional[int] = None
    ray_address: Optional[str] = None


@dataclass
class CacheTextJob:
    """`rae-scale cache-text`: the captions of prepared shards -> text embeddings + masks as MDS shards."""

    input: str = ""
    output: str = ""
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    batch_size: int = ranged(64, 1)
    dtype: str = choice("bf16", "fp32")
    num_workers: Optional[int] = None
    ray_address: Optional[str] = None
    # tiny configs: build the captioned digits shards and the random text encoder when missing
    build_if_missing: bool = False


@dataclass
class StatsJob:
    """`rae-scale stats`: exact per-position latent mean and variance."""

    input: str = ""
    kind: str = choice("latents", "images")
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
class Stage2Job(GeneratorSections):
    """`rae-scale train stage2`: DiT-DH / LightningDiT flow matching on RAE latents."""

    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(global_batch_size=1024, ema_decay=0.9995, clip_grad=1.0))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="linear", warmup_from_zero=False))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)
    tripwire: TripwireConfig = field(default_factory=TripwireConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)  # used only with dit.repa_depth set


@dataclass
class SampleJob(GeneratorSections):
    """`rae-scale sample` / `generate`: class-conditional (or prompt-conditioned) images from a stage-2 model."""

    checkpoint: Optional[str] = None  # a rae_scale step folder, an exported file or upstream .pt
    class_ids: List[int] = field(default_factory=list)
    # text-to-image (dit.condition_type text): the prompts, and/or a file of prompts (one per line)
    prompts: List[str] = field(default_factory=list)
    prompts_file: Optional[str] = None
    num_samples: int = ranged(8, 1)
    batch_size: int = ranged(16, 1)
    seed: int = ranged(0, 0)
    output: str = "samples"
    precision: str = choice("fp32", "bf16")


# eval.spaces.SPACES, spelled here so that loading a config imports no torch
EVAL_SPACES = ("inception", "convnext", "dinov2", "mae", "siglip", "clip")


def _spaces_ok(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(s in EVAL_SPACES for s in v)


@dataclass
class EvalJob:
    """`rae-scale evaluate fid|recon|t2i`: metrics over many samples spread over the job's ranks."""

    sample: SampleJob = field(default_factory=SampleJob)
    num_samples: int = ranged(50000, 1)
    batch_size: int = ranged(64, 1)
    label_sampling: str = choice("equal", "random")
    reference: Optional[str] = None
    data_url: str = ""  # recon: dataset to reconstruct
    output: str = "eval"
    save_png: bool = False
    save_npz: bool = False
    inception_weights: Optional[str] = None
    # feature spaces scored (FD, FD_r, MIND): eval.spaces.SPACES; all six give RAEv2's FD_r^6
    spaces: List[str] = checked(default_factory=lambda: ["inception"], check=_spaces_ok,
                                allowed=f"a non-empty list of {', '.join(EVAL_SPACES)}")
    extractors: Dict[str, str] = field(default_factory=dict)  # space -> transformers folder / cached release
    extractor_dir: Optional[str] = None  # a folder with one transformers folder per space name
    mind: bool = False  # MIND per space (needs reference images, not only statistics)
    mind_seed: int = ranged(2020, 0)
    # evaluate t2i: the CLIP model of the CLIP score (a save_pretrained folder or a hub name in the local cache)
    clip_model: Optional[str] = None


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
    # Ray Train: elastic bounds of the worker group (null: a fixed nodes x gpus_per_node group), and two
    # restart budgets: node preemptions apart from every other failure (-1: forever)
    min_workers: Optional[int] = ranged(None, 1)
    max_workers: Optional[int] = ranged(None, 1)
    max_failures: int = ranged(3, -1)
    max_preemptions: int = ranged(-1, -1)


JOBS: dict[str, type] = {
    "prepare": PrepareJob,
    "cache_latents": CacheLatentsJob,
    "cache_text": CacheTextJob,
    "stats": StatsJob,
    "stage1": Stage1Job,
    "stage2": Stage2Job,
    "sample": SampleJob,
    "evaluate": EvalJob,
    "launch": LaunchJob,
}


def from_generator(cls, source: GeneratorSections, **changes):
    """A `cls` job (e.g. SampleJob) with the generator sections of `source` (e.g. a Stage2Job), copied,
    and `changes` on top: the one conversion between stage-2, sample and eval jobs."""
    shared = {f.name: copy.deepcopy(getattr(source, f.name)) for f in dataclasses.fields(GeneratorSections)}
    return cls(**{**shared, **changes})
