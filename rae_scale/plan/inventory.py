"""What a job trains and keeps: exact parameter shapes (models built on the meta device, no memory, no
weights) and the measured per-sample activations of its networks (rae_scale.plan.probe).

Stage 2: the DiT (trained, EMA). Stage 1: the decoder (trained, EMA), the frozen encoder, LPIPS and
the DINO discriminator (frozen backbone, trained heads); the generator step of the GAN phase keeps
the activations of the decoder, LPIPS and the discriminator at once, the peak of a stage-1 run.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import yaml

from rae_scale import config as C
from rae_scale.plan.probe import Probe, compute_context, extrapolate, input_dtype, per_sample, saved_bytes

PROBE_HEAD_DIMS = (8, 16)  # the two tiny head widths the activation model is measured at
PROBE_IMAGE = 32  # LPIPS is measured at this side and scaled by the pixel count (its activations are conv maps)


@dataclass
class Params:
    """Parameter shapes of one network, enough for exact per-rank byte counts under any sharding."""

    trainable: list[tuple[int, ...]]
    frozen: list[tuple[int, ...]]  # non-trainable parameters (sharded with the model under FSDP)
    buffers: list[tuple[int, ...]]  # buffers (RoPE tables: never sharded)
    blocks: list[list[tuple[int, ...]]]  # trainable shapes of each FSDP unit (transformer block)

    @property
    def n_trainable(self) -> int:
        return sum(math.prod(s) for s in self.trainable)

    @property
    def n_frozen(self) -> int:
        return sum(math.prod(s) for s in self.frozen)

    @property
    def n_buffers(self) -> int:
        return sum(math.prod(s) for s in self.buffers)

    @property
    def largest_block(self) -> int:
        """Elements of the largest FSDP unit (what is gathered, or has its gradients whole, at once)."""
        return max((sum(math.prod(x) for x in b) for b in self.blocks), default=0)

    @property
    def n_2d(self) -> int:  # Muon's share (rae_scale.optim.muon.split_muon_params: ndim == 2)
        return sum(math.prod(s) for s in self.trainable if len(s) == 2)


def params_of(model: nn.Module, blocks: list[nn.Module] | None = None) -> Params:
    trainable = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    frozen = [tuple(p.shape) for p in model.parameters() if not p.requires_grad]
    buffers = [tuple(b.shape) for b in model.buffers()]
    units = [[tuple(p.shape) for p in b.parameters()] for b in (blocks or [])]
    return Params(trainable, frozen, buffers, units)


@dataclass
class Job:
    """Everything the memory and time model needs to know about one job."""

    kind: str  # stage1 | stage2
    name: str  # e.g. "dit_dh XL"
    trained: Params
    tokens: int  # tokens per sample of the trained model (the MFU's 6 N per token)
    global_batch: int
    total_steps: int
    optimizer: str
    ema: bool
    frozen_params: dict[str, int] = field(default_factory=dict)  # frozen networks, fp32, replicated
    side_trained: Params | None = None  # stage 1: discriminator heads (plain DDP, AdamW)
    extra_flops_per_sample: float = 0.0  # frozen networks' forward (and LPIPS/disc backward to the input)
    # activation probe per compute mode (fp32 | autocast | bf16), filled lazily
    probe: Callable[[str], Probe] | None = None
    side_activations: Callable[[str], float] | None = None  # stage 1: LPIPS + discriminator bytes per sample
    lpips_flops: Callable[[str], float] | None = None  # stage 1: LPIPS forward + backward-to-input per sample
    deepspeed: dict = field(default_factory=dict)  # parallel.deepspeed overrides (ZeRO's buffer sizes)
    optimizer_implementation: str = "auto"  # optimizer.implementation (AdamW's step temporary)

    def activations(self, mode: str) -> Probe:
        return self.probe(mode)


# ----------------------------------------------------------------------------- stage 2


def _dit_at_width(dit: C.DiTConfig, head_dim: int | None, device: str):
    from rae_scale.builders import build_dit_model

    d = copy.deepcopy(dit)
    d.checkpoint = None
    if head_dim is not None:  # the probe: tiny widths, one block per kind (body, head); blocks of a kind are equal
        d.preset = None
        d.hidden_size = [h * head_dim for h in dit.num_heads]
        d.depth = [1 for _ in dit.depth]
        d.base_model_depth = 1
    with torch.device(device):
        return build_dit_model(d, load_weights=False, device=device)


def _real_block_widths(model) -> list[int]:
    return [_block_width(b) for b in model.transformer_blocks()]


def _block_width(block: nn.Module) -> int:
    for p in block.parameters():  # every block's first norm / linear is as wide as the block
        if p.ndim == 1:
            return p.shape[0]
    return next(block.parameters()).shape[-1]


def _loss(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().square().mean()
    return sum(_loss(o) for o in (out.values() if isinstance(out, dict) else out) if o is not None)


@functools.lru_cache(maxsize=32)
def _dit_probe(dit_yaml: str, mode: str) -> Probe:
    """Per-sample activation bytes of the real-size DiT, from two tiny-width runs (lru-cached per config)."""
    dit = C.from_dict(C.DiTConfig, yaml.safe_load(dit_yaml))
    real = _dit_at_width(dit, None, "meta")
    real_widths = _real_block_widths(real)
    real_other = real_widths[0]
    probes, widths = [], []
    for hd in PROBE_HEAD_DIMS:
        torch.manual_seed(0)
        model = _dit_at_width(dit, hd, "cpu").train()
        if mode == "bf16":
            model = model.to(torch.bfloat16)
        blocks = model.transformer_blocks()
        widths.append((_real_block_widths(model), _block_width(blocks[0])))
        c, s = dit.in_channels, dit.input_size

        def measure(batch, model=model, blocks=blocks):
            x = torch.randn(batch, c, s, s, dtype=input_dtype(mode))
            t = torch.rand(batch, dtype=input_dtype(mode))
            y = torch.randint(0, dit.num_classes, (batch,))
            with compute_context(mode):
                return saved_bytes(model, blocks, lambda: _loss(model(x, t, y)))

        probes.append(per_sample(measure))
    return _expand(probes, widths, dit.depth, real_widths, real_other)


def _expand(probes, widths, depths, real_widths, real_other) -> Probe:
    """Probes of one block per kind -> every real block (body blocks first, then head blocks)."""
    kind = [k for k, n in enumerate(depths) for _ in range(n)]
    full = [Probe([p.blocks[k] for k in kind], p.other, [p.block_inputs[k] for k in kind]) for p in probes]
    block_w = [(widths[0][0][k], widths[1][0][k], r) for k, r in zip(kind, real_widths)]
    return extrapolate(0, full[0], 1, full[1], block_w, (widths[0][1], widths[1][1], real_other))


def stage2_job(cfg: C.Stage2Job, dataset_size: int) -> Job:
    model = _dit_at_width(cfg.dit, None, "meta")
    params = params_of(model, model.transformer_blocks())
    tokens = (cfg.dit.input_size // cfg.dit.patch_size) ** 2
    dit_yaml = yaml.safe_dump(C.to_dict(cfg.dit))
    return Job(kind="stage2", name=f"{cfg.dit.model} {cfg.dit.preset or 'custom'}", trained=params, tokens=tokens,
               global_batch=cfg.training.global_batch_size,
               total_steps=total_steps(cfg.training, dataset_size), optimizer=cfg.optimizer.kind,
               ema=True, probe=lambda mode: _dit_probe(dit_yaml, mode), deepspeed=dict(cfg.parallel.deepspeed),
               optimizer_implementation=cfg.optimizer.implementation)


def total_steps(training: C.TrainingConfig, dataset_size: int) -> int:
    """training.max_steps, else epochs x (dataset / global batch) as the harness counts them."""
    if training.max_steps:
        return int(training.max_steps)
    per_epoch = max(1, dataset_size // training.global_batch_size)
    return int(round((training.epochs or 1) * per_epoch))


# ----------------------------------------------------------------------------- stage 1


@contextlib.contextmanager
def _quiet():
    """The probes build random-weight LPIPS / discriminators on purpose: no warnings about it."""
    loggers = [logging.getLogger(n) for n in ("rae_scale.builders", "rae_scale.losses.perceptual")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _decoder_at_width(rae: C.RAEConfig, head_dim: int | None, device: str):
    from rae_scale.config.presets import decoder_preset_sizes
    from rae_scale.models.decoder import build_decoder

    c, h, w = C.latent_shape(rae)
    dec = rae.decoder
    full = decoder_preset_sizes(dec.preset) if dec.preset else {}
    full.update({k: getattr(dec, k) for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size")
                 if getattr(dec, k) is not None})
    if head_dim is not None:  # the probe: tiny width, one layer standing for all (they are equal)
        width = full["num_heads"] * head_dim
        full["intermediate_size"] = max(1, round(full["intermediate_size"] * width / full["hidden_size"]))
        full["hidden_size"] = width
        full["num_layers"] = 1
    with torch.device(device):
        return build_decoder(None, latent_dim=c, num_patches=h * w, patch_size=dec.patch_size,
                             decoder_hidden_size=full["hidden_size"], num_layers=full["num_layers"],
                             num_heads=full["num_heads"], intermediate_size=full["intermediate_size"])


@functools.lru_cache(maxsize=8)
def _decoder_probe(rae_yaml: str, mode: str) -> Probe:
    rae = C.from_dict(C.RAEConfig, yaml.safe_load(rae_yaml))
    c, h, w = C.latent_shape(rae)
    real = _decoder_at_width(rae, None, "meta")
    real_w = [_block_width(b) for b in real.transformer_blocks()]
    probes, widths = [], []
    for hd in PROBE_HEAD_DIMS:
        torch.manual_seed(0)
        model = _decoder_at_width(rae, hd, "cpu").train()
        if mode == "bf16":
            model = model.to(torch.bfloat16)
        blocks = model.transformer_blocks()
        widths.append(([_block_width(b) for b in blocks], _block_width(blocks[0])))

        def measure(batch, model=model, blocks=blocks):
            z = torch.randn(batch, h * w, c, dtype=input_dtype(mode))
            with compute_context(mode):
                return saved_bytes(model, blocks, lambda: _loss(model(z)))

        probes.append(per_sample(measure))
    return _expand(probes, widths, [len(real_w)], real_w, real_w[0])


@functools.lru_cache(maxsize=8)
def _gan_side_probe(job_yaml: str, mode: str) -> tuple[float, float, float]:
    """(LPIPS bytes per sample, discriminator bytes per sample, LPIPS FLOPs per sample) at the real image
    size: what the generator's backward through LPIPS and the frozen DINO backbone keeps. LPIPS is
    measured at PROBE_IMAGE px and scaled by the pixel count; the discriminator resizes every input to
    224 px, so it is measured at its real token count and two tiny widths (as the transformers)."""
    with _quiet():
        return _gan_side_measure(C.from_dict(C.Stage1Job, yaml.safe_load(job_yaml)), mode)


def _gan_side_measure(cfg, mode: str) -> tuple[float, float, float]:
    from torch.utils.flop_counter import FlopCounterMode

    from rae_scale.builders import build_discriminator
    from rae_scale.losses.perceptual import build_lpips

    side = cfg.rae.image_size
    torch.manual_seed(0)
    lpips = build_lpips(pretrained_backbone=False)
    lpips.requires_grad_(False)
    scale = (side / PROBE_IMAGE) ** 2

    def lpips_measure(batch):
        x = torch.rand(batch, 3, PROBE_IMAGE, PROBE_IMAGE, requires_grad=True)
        y = torch.rand(batch, 3, PROBE_IMAGE, PROBE_IMAGE)
        with compute_context("autocast" if mode != "fp32" else "fp32"):
            return saved_bytes(lpips, [], lambda: _loss(lpips(x * 2 - 1, y * 2 - 1)))

    lp = per_sample(lpips_measure).total * scale
    with FlopCounterMode(display=False) as counter:
        lpips(torch.rand(1, 3, PROBE_IMAGE, PROBE_IMAGE), torch.rand(1, 3, PROBE_IMAGE, PROBE_IMAGE))
    lpips_flops = counter.get_total_flops() * scale
    g = cfg.gan
    vals = []
    for hd in PROBE_HEAD_DIMS:
        gg = copy.deepcopy(g)
        gg.disc_width = g.disc_heads * hd
        gg.dino_checkpoint = None
        disc = build_discriminator(gg, seed=0)
        disc.backbone.requires_grad_(False)
        disc.train()

        def disc_measure(batch, disc=disc):
            x = torch.rand(batch, 3, side, side, requires_grad=True)
            with compute_context("autocast" if mode != "fp32" else "fp32"):
                return saved_bytes(disc, [], lambda: _loss(disc(x * 2 - 1)))

        vals.append((gg.disc_width, per_sample(disc_measure).total))
    (w1, b1), (w2, b2) = vals
    disc_bytes = b1 + (b2 - b1) * (g.disc_width - w1) / (w2 - w1)
    return lp, disc_bytes, lpips_flops


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def stage1_job(cfg: C.Stage1Job, dataset_size: int) -> Job:
    from rae_scale.builders import build_discriminator, build_frozen_encoder
    from rae_scale.models.discriminator import DinoBackbone

    decoder = _decoder_at_width(cfg.rae, None, "meta")
    params = params_of(decoder, decoder.transformer_blocks())
    enc_cfg = copy.deepcopy(cfg.rae.encoder)
    enc_cfg.pretrained = None  # sizes only: the weights never matter to a byte count
    with torch.device("meta"):
        encoder = build_frozen_encoder(enc_cfg)
        g = cfg.gan
        backbone = DinoBackbone(depth=g.disc_depth, embed_dim=g.disc_width, num_heads=g.disc_heads,
                                patch_size=g.disc_patch)
    gg = copy.deepcopy(g)
    gg.disc_depth, gg.dino_checkpoint = 1, None  # the heads do not depend on the backbone's depth
    with _quiet():
        heads_model = build_discriminator(gg, seed=0)
    heads = params_of(heads_model.heads)
    lpips_params = 14_714_688 + 1_472  # torchvision VGG16 features + LPIPS's 1x1 heads (64+128+256+512+512)
    enc_n, disc_n = _count(encoder), _count(backbone)
    c, h, w = C.latent_shape(cfg.rae)
    enc_tokens = h * w
    disc_tokens = (224 // g.disc_patch) ** 2
    job_yaml = yaml.safe_dump(C.to_dict(cfg))
    rae_yaml = yaml.safe_dump(C.to_dict(cfg.rae))

    def side(mode: str) -> float:
        # the frozen networks stay fp32 under every strategy: bf16 autocast is all that changes them
        lp, disc, _ = _gan_side_probe(job_yaml, "fp32" if mode == "fp32" else "autocast")
        return lp + disc

    job = Job(kind="stage1", name=f"decoder {cfg.rae.decoder.preset or 'custom'} on {cfg.rae.encoder.kind}",
              trained=params, tokens=h * w + 1, global_batch=cfg.training.global_batch_size,
              total_steps=total_steps(cfg.training, dataset_size), optimizer=cfg.optimizer.kind, ema=True,
              frozen_params={"encoder": enc_n, "lpips": lpips_params, "discriminator backbone": disc_n},
              side_trained=heads,
              probe=lambda mode: _decoder_probe(rae_yaml, mode), side_activations=side,
              deepspeed=dict(cfg.parallel.deepspeed), optimizer_implementation=cfg.optimizer.implementation)
    # frozen forwards: encoder 2 N per token; discriminator on fake and real (2 x 2 N) plus the backward
    # to its input in the generator step (2 x 2 N); LPIPS forward + backward to its input
    job.extra_flops_per_sample = (2 * enc_n * enc_tokens + 8 * disc_n * disc_tokens)
    job.lpips_flops = lambda mode: 2 * _gan_side_probe(job_yaml, "fp32" if mode == "fp32" else "autocast")[2]
    return job


def build_job(job: str, cfg, dataset_size: int) -> Job:
    if job == "stage2":
        return stage2_job(cfg, dataset_size)
    if job == "stage1":
        return stage1_job(cfg, dataset_size)
    raise ValueError(f"unknown job {job!r}; allowed: stage1, stage2")
