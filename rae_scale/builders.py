"""Job config -> models: the one place that reads `RAEConfig` / `DiTConfig` and calls the model builders.

Shared by the training loops, sampling, evaluation and the CLI, so a config means the same network
everywhere. Weights come from files through the interop loaders (never code-executing pickles).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from rae_scale import config as C

log = logging.getLogger(__name__)


def encoder_kwargs(enc: C.EncoderConfig) -> dict:
    """Arguments of models.encoders.build_encoder for this config (sizes only matter without weights)."""
    kw = dict(hidden_size=enc.hidden_size, num_layers=enc.num_layers, num_heads=enc.num_heads,
              patch_size=enc.patch_size, input_size=enc.input_size, intermediate_size=enc.intermediate_size,
              layers=enc.layers)
    return kw


ORIGINAL_DINOV3_SUFFIXES = (".pth", ".pt")  # Meta's original DINOv3 checkpoints (interop.dinov3_original)


def _is_original_dinov3(enc: C.EncoderConfig) -> bool:
    """`pretrained` is one of Meta's original DINOv3 checkpoint files (not a save_pretrained folder or hub name)."""
    return bool(enc.pretrained) and enc.pretrained.endswith(ORIGINAL_DINOV3_SUFFIXES)


def build_frozen_encoder(enc: C.EncoderConfig, key: str = "rae.encoder"):
    """The frozen encoder: from `pretrained` (hub name, folder, or for dinov3 Meta's original .pth)
    when set, else random weights. key: the config section, for the errors (e.g. repa.encoder)."""
    from rae_scale.models.encoders import build_encoder

    if _is_original_dinov3(enc):
        if enc.kind != "dinov3":
            raise C.ConfigError(f"{key}.pretrained={enc.pretrained!r} is a .pth file, which only kind dinov3 "
                                f"reads (Meta's original checkpoints); for kind {enc.kind} give a hub name or a "
                                "save_pretrained folder")
        from rae_scale.interop.dinov3_original import load_dinov3_original

        return build_encoder("dinov3", model=load_dinov3_original(enc.pretrained), input_size=enc.input_size,
                             layers=enc.layers)

    if enc.pretrained:
        local = Path(enc.pretrained)
        if not local.exists() and (enc.pretrained.startswith((".", "/")) or local.parent.exists()
                                   and str(local.parent) not in ("", ".")):
            raise FileNotFoundError(
                f"{key}.pretrained={enc.pretrained!r} is neither an existing folder nor reachable here; "
                "give a local save_pretrained folder, a hub name with network access, or null for random weights")
        return build_encoder(enc.kind, pretrained=enc.pretrained, input_size=enc.input_size, layers=enc.layers)
    return build_encoder(enc.kind, image_size=enc.input_size, **encoder_kwargs(enc))


def save_random_encoder(enc: C.EncoderConfig, folder: str, seed: int = 0) -> str:
    """Write a seeded random encoder of the configured size as a save_pretrained folder (tiny runs)."""
    from rae_scale.models.encoders import build_encoder

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = build_encoder(enc.kind, image_size=enc.input_size, **encoder_kwargs(enc))
    os.makedirs(folder, exist_ok=True)
    encoder.model.save_pretrained(folder)
    return folder


def decoder_sizes(dec: C.DecoderConfig) -> dict:
    """build_decoder's size arguments: the explicit ones (checked against the preset, which fills the rest)."""
    C.check_decoder_sizes(dec)
    names = {"hidden_size": "decoder_hidden_size", "num_layers": "num_layers", "num_heads": "num_heads",
             "intermediate_size": "intermediate_size"}
    return {arg: getattr(dec, name) for name, arg in names.items() if getattr(dec, name) is not None}


def build_rae(cfg: C.RAEConfig, *, load_decoder_weights: bool = True, load_stats: bool = True,
              storage_options: dict | None = None, with_encoder: bool = True):
    """RAE = frozen encoder + decoder (+ latent statistics and decoder weights when configured).

    ``with_encoder=False`` builds one that only decodes (stage 2 on a latent cache, sampling): the
    encoder's weights are neither read nor held, its latent shape is the config's, and its pixel
    statistics are read as the encoder would (rae_scale.models.encoders.image_stats).
    """
    from rae_scale.models.decoder import build_decoder
    from rae_scale.models.encoders import image_stats
    from rae_scale.models.rae import RAE

    if with_encoder:
        encoder = build_frozen_encoder(cfg.encoder)
        c, h, w = encoder.latent_shape
        if (c, h, w) != C.latent_shape(cfg):  # the config's sizes are what the DiT's shape was derived from
            raise C.ConfigError(f"rae.encoder states a latent of {list(C.latent_shape(cfg))} (hidden_size, input_size "
                                f"/ patch_size) but the encoder {cfg.encoder.pretrained!r} gives {[c, h, w]}; "
                                "state its real hidden_size and patch_size")
        stats = None
    else:
        encoder, (c, h, w) = None, C.latent_shape(cfg)
        stats = image_stats(cfg.encoder.kind, None if _is_original_dinov3(cfg.encoder) else cfg.encoder.pretrained)
    decoder = build_decoder(cfg.decoder.preset, latent_dim=c, num_patches=h * w, patch_size=cfg.decoder.patch_size,
                            **decoder_sizes(cfg.decoder))
    rae = RAE(encoder, decoder, noise_tau=cfg.noise_tau, image_stats=stats)
    if load_stats and cfg.stats_path:
        mean, var = load_latent_stats(cfg.stats_path)
        rae.set_latent_stats(mean, var)
    if load_decoder_weights and cfg.decoder_checkpoint:
        load_decoder_weights_into(rae, cfg.decoder_checkpoint, storage_options)
    return rae


def load_latent_stats(path: str):
    from rae_scale.data.latents import load_stats
    from rae_scale.storage import filesystem

    fs, local = filesystem(path)  # a local path or any fsspec URL (s3://..., gs://...)
    if not fs.exists(local):
        raise FileNotFoundError(f"rae.stats_path={path!r} does not exist; compute it with `rae-scale stats`")
    mean, var = load_stats(path)  # our .safetensors or upstream's {"mean", "var"} .pt
    return (None if mean is None else mean.float()), (None if var is None else var.float())


def latent_normalizer(cfg: C.RAEConfig, device="cpu"):
    """z -> (z - mean) / sqrt(var + eps) with rae.stats_path's statistics, as RAE.encode applies them.

    Cached latents are stored raw (so one cache serves any statistics); stage 2 must see them in the
    normalised space that sampling decodes from. Identity when rae.stats_path is empty.
    """
    from rae_scale.models.rae import normalize_latent

    if not cfg.stats_path:
        return lambda z: z
    mean, var = load_latent_stats(cfg.stats_path)
    mean = None if mean is None else mean.to(device)
    var = None if var is None else var.to(device)
    return lambda z: normalize_latent(z, mean, var)


def load_decoder_weights_into(rae, path: str, storage_options: dict | None = None) -> None:
    """Decoder weights from a stage-1 run/step folder (EMA), an upstream .pt (model/ema), a safetensors
    export or a raw state dict."""
    from rae_scale.interop.upstream import load_checked, load_upstream_decoder

    if is_run_or_step(path, storage_options):
        sd = ema_weights(path, storage_options)
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
        sd = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")} or sd
    else:
        sd = load_upstream_decoder(path)
    load_checked(rae.decoder, sd, config=f"decoder weights {path}", allow_missing=("trainable_cls_token",))
    log.info("loaded decoder weights from %s", path)


def is_run_or_step(path: str, storage_options: dict | None = None) -> bool:
    """A rae_scale run or step folder (checkpoint/layout.py knows the layout)."""
    from rae_scale.checkpoint.layout import is_run_or_step as is_checkpoint_folder

    return is_checkpoint_folder(path, storage_options)


def resolve_step_folder(path: str, storage_options: dict | None = None) -> str:
    """A run folder -> its newest committed step folder; a step folder stays as it is (read-only and
    collective-free: any rank may call it)."""
    from rae_scale.checkpoint.layout import resolve_step_folder as newest_step_folder

    return newest_step_folder(path, storage_options)


def ema_weights(path: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """EMA weights of a rae_scale run / step folder, consolidated in this process."""
    from rae_scale.checkpoint import consolidate, extract_ema

    step = resolve_step_folder(path, storage_options)
    state = consolidate(step, storage_options=storage_options)
    return {k: v for k, v in extract_ema(state).items() if isinstance(v, torch.Tensor)}


def dit_kwargs(cfg: C.DiTConfig) -> dict:
    """build_dit's arguments: the latent shape (derived when the job was loaded) and the explicit sizes
    (checked against the preset, which fills the rest)."""
    if cfg.in_channels is None or cfg.input_size is None:
        raise C.ConfigError("dit.in_channels / dit.input_size are null: they are derived from rae.encoder when "
                            "a job config is loaded (config.load_config or config.resolve)")
    C.check_dit_sizes(cfg)
    kw = dict(input_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
              mlp_ratio=cfg.mlp_ratio, num_classes=cfg.num_classes, label_embed_std=cfg.label_embed_std)
    if cfg.model == "dit_dh_ig":
        # label dropout is the loop's seeded draw (the null row is always there)
        kw.update(num_t_tokens=cfg.num_t_tokens, num_c_tokens=cfg.num_c_tokens,
                  base_model_depth=cfg.base_model_depth, learn_time_frequencies=cfg.learn_time_frequencies,
                  condition_type=cfg.condition_type, context_dim=cfg.context_dim)
        if cfg.repa_depth is not None:  # RAEv2's REPA projector (its parameter names: repa_projector.*)
            if cfg.repa_dim is None:
                raise C.ConfigError("dit.repa_dim is null: it is derived from repa.encoder.hidden_size when a stage-2 "
                                    "config is loaded; other jobs state it")
            kw.update(enable_repa=True, repa_layer_depth=cfg.repa_depth, z_dim=cfg.repa_dim)
    else:
        kw.update(class_dropout_prob=cfg.class_dropout_prob, use_qknorm=cfg.use_qknorm, use_swiglu=cfg.use_swiglu,
                  use_rope=cfg.use_rope, use_rmsnorm=cfg.use_rmsnorm, wo_shift=cfg.wo_shift,
                  use_pos_embed=cfg.use_pos_embed)
    for name in ("hidden_size", "depth", "num_heads"):
        sizes = getattr(cfg, name)
        if sizes is not None:  # dit_dh and dit_dh_ig take [body, head]; lightning_dit one number
            kw[name] = sizes[0] if cfg.model == "lightning_dit" else list(sizes)
    return kw


def build_dit_model(cfg: C.DiTConfig, *, load_weights: bool = True, device="cpu"):
    """DiT-DH / LightningDiT from the config; `dit.checkpoint` weights loaded (EMA preferred) if set."""
    from rae_scale.models.dit import build_dit

    model = build_dit(cfg.model, cfg.preset, **dit_kwargs(cfg))
    if load_weights and cfg.checkpoint:
        load_dit_weights_into(model, cfg.checkpoint)
    return model.to(device)


def load_dit_weights_into(model, path: str) -> None:
    from rae_scale.interop.upstream import load_checked, load_stage2_checkpoint

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = load_stage2_checkpoint(path)
    load_checked(model, sd, config=f"stage-2 weights {path}")
    log.info("loaded stage-2 weights from %s", path)


def build_text_encoder(te: C.TextEncoderConfig, device="cpu"):
    """The frozen text encoder of a text-to-image generator (models.text), on `device`; its width must be
    text_encoder.hidden_size, which the DiT's context_dim was derived from."""
    from rae_scale.models.text import load_text_encoder

    encoder = load_text_encoder(te.pretrained, te.max_length, device=device)
    if encoder.width != te.hidden_size:
        raise C.ConfigError(f"text encoder {te.pretrained!r} has width {encoder.width}, but config key "
                            f"'text_encoder.hidden_size' is {te.hidden_size} (the DiT's context_dim comes from it); "
                            f"set text_encoder.hidden_size={encoder.width}")
    log.info("text encoder %s: width %d, %d tokens per caption", te.pretrained, encoder.width, te.max_length)
    return encoder


def build_discriminator(g: C.GANConfig, seed: int = 0):
    """DINO discriminator from gan.dino_checkpoint; a seeded random backbone when it is null (tests)."""
    from rae_scale.models.discriminator import DinoBackbone, DinoDiscriminator

    recipe = dict(depth=g.disc_depth, embed_dim=g.disc_width, num_heads=g.disc_heads, patch_size=g.disc_patch)
    checkpoint = g.dino_checkpoint
    if checkpoint is None:
        log.warning("gan.dino_checkpoint is null: the discriminator backbone has random weights "
                    "(fine for tests and demos; real training needs dino_vit_small_patch8_224.pth)")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            checkpoint = DinoBackbone(**recipe).state_dict()
    elif not Path(checkpoint).exists():
        raise FileNotFoundError(f"gan.dino_checkpoint={checkpoint!r} does not exist")
    return DinoDiscriminator(checkpoint, recipe=recipe, ks=g.kernel_size, norm_type=g.norm_type,
                             using_spec_norm=g.spectral_norm)
