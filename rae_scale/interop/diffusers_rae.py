"""Convert between our RAE and a diffusers ``AutoencoderRAE`` folder (config.json + safetensors).

Format facts (rae_method.md section 13): encoder weights are embedded under ``encoder.*``
(final LayerNorm affine removed), decoder weights under ``decoder.*`` with diffusers'
attention names, buffers ``encoder_mean``/``encoder_std``/``_latents_mean``/``_latents_std``.
diffusers normalises latents as (z - mean) / (std + 1e-5) * scaling_factor, we as
(z - mean) / sqrt(var + 1e-5); the conversion picks var so both give the same numbers.
diffusers itself is not needed here; only the file format is.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rae_scale.interop.upstream import load_checked
from rae_scale.models.decoder import ViTDecoder
from rae_scale.models.encoders import ENCODER_DEFAULTS, FrozenEncoder, build_encoder
from rae_scale.models.layers import sincos_2d
from rae_scale.models.rae import RAE

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "AutoencoderRAE"
_DIFFUSERS_STD_EPS = 1e-5  # the constant diffusers adds to latents_std
# diffusers recomputes the decoder position table with positions scaled by 16 / grid.
DIFFUSERS_POS_BASE_SIZE = 16

# Our (= upstream) decoder attention names <-> diffusers' Attention module names.
_DECODER_RENAMES = [
    (".attention.attention.query.", ".attention.to_q."),
    (".attention.attention.key.", ".attention.to_k."),
    (".attention.attention.value.", ".attention.to_v."),
    (".attention.output.dense.", ".attention.to_out.0."),
]
# transformers 4.x ViT-style attention names <-> 5.x names (files written by either load).
_ENCODER_RENAMES = [
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
]


def _rename(key: str, pairs: list[tuple[str, str]], reverse: bool = False) -> str:
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if src in key:
            return key.replace(src, dst)
    return key


def _align_keys(state: dict[str, torch.Tensor], target_keys, pairs) -> dict[str, torch.Tensor]:
    """Rename keys that the target lacks when a known alternative spelling is in the target."""
    target_keys = set(target_keys)
    out = {}
    for key, value in state.items():
        if key not in target_keys:
            for reverse in (False, True):
                alt = _rename(key, pairs, reverse)
                if alt in target_keys:
                    key = alt
                    break
        out[key] = value
    return out


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / WEIGHTS_NAME
    if single.exists():
        return load_file(str(single))
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(str(folder / shard)))
        return out
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} (or sharded index); only safetensors are read")


def _infer_encoder_sizes(kind: str, enc: dict[str, torch.Tensor], patch: int) -> tuple[int, int]:
    """(intermediate_size, image_size of the position grid) from the embedded encoder weights."""
    mlp = next(
        (v for k, v in enc.items() if re.search(r"layers?\.0\.(mlp\.fc1|intermediate\.dense)\.weight$", k)), None
    )
    if kind == "siglip2":
        pos = enc.get("vision_model.embeddings.position_embedding.weight")
        n_pos = None if pos is None else pos.shape[0]
    else:
        pos = enc.get("embeddings.position_embeddings")
        n_pos = None if pos is None else pos.shape[1] - 1  # minus the CLS position
    if mlp is None or n_pos is None:
        raise ValueError(f"encoder weights for {kind!r} lack the MLP or position-embedding tensors")
    return mlp.shape[0], int(round(n_pos**0.5)) * patch


def load_diffusers_autoencoder(folder: str | os.PathLike) -> RAE:
    """Build our RAE from a diffusers ``AutoencoderRAE`` folder."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") != CLASS_NAME:
        raise ValueError(f"{folder}: config _class_name is {config.get('_class_name')!r}, expected {CLASS_NAME!r}")
    if not config.get("reshape_to_2d", True):
        raise ValueError(f"{folder}: reshape_to_2d=false (token latents) is not supported; 2-D latents only")
    kind = config.get("encoder_type", "dinov2")
    if kind not in ENCODER_DEFAULTS:
        raise ValueError(f"{folder}: unknown encoder_type {kind!r}; allowed: {sorted(ENCODER_DEFAULTS)}")
    weights = _read_weights(folder)

    hidden = int(config.get("encoder_hidden_size", 768))
    patch = int(config.get("encoder_patch_size", 14))
    input_size = int(config.get("encoder_input_size", 224))
    enc_state = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    intermediate, image_size = _infer_encoder_sizes(kind, enc_state, patch)
    mean = weights.get("encoder_mean", torch.tensor(config.get("encoder_norm_mean") or [0.485, 0.456, 0.406]))
    std = weights.get("encoder_std", torch.tensor(config.get("encoder_norm_std") or [0.229, 0.224, 0.225]))
    encoder = build_encoder(
        kind, hidden_size=hidden, num_layers=int(config.get("encoder_num_hidden_layers", 12)),
        num_heads=hidden // 64,  # diffusers derives heads from a head dim of 64
        patch_size=patch, input_size=input_size, intermediate_size=intermediate, image_size=image_size,
        image_mean=tuple(mean.flatten().tolist()), image_std=tuple(std.flatten().tolist()),
    )
    enc_state = _align_keys(enc_state, encoder.model.state_dict().keys(), _ENCODER_RENAMES)
    load_checked(encoder.model, enc_state, config={k: config.get(k) for k in ("encoder_type", "encoder_hidden_size",
                 "encoder_patch_size", "encoder_num_hidden_layers")})

    num_patches = (input_size // patch) ** 2
    decoder = ViTDecoder(
        latent_dim=hidden,
        decoder_hidden_size=int(config["decoder_hidden_size"]),
        num_layers=int(config["decoder_num_hidden_layers"]),
        num_heads=int(config["decoder_num_attention_heads"]),
        intermediate_size=int(config["decoder_intermediate_size"]),
        num_patches=num_patches,
        patch_size=int(config.get("patch_size", 16)),
        num_channels=int(config.get("num_channels", 3)),
        pos_base_size=DIFFUSERS_POS_BASE_SIZE,
    )
    dec_state = {
        _rename(k[len("decoder."):], _DECODER_RENAMES, reverse=True): v
        for k, v in weights.items() if k.startswith("decoder.") and not k.endswith("decoder_pos_embed")
    }
    # diffusers recomputes the position table at init and may lack the CLS token (zero init).
    load_checked(decoder, dec_state, config={k: v for k, v in config.items() if k.startswith("decoder_")},
                 allow_missing=("decoder_pos_embed", "trainable_cls_token"))

    scaling = float(config.get("scaling_factor", 1.0))
    lat_mean = weights.get("_latents_mean") if config.get("latents_mean") is not None else None
    lat_std = weights.get("_latents_std", torch.ones(1)).double()
    # sqrt(var + eps) must equal (std + 1e-5) / scaling_factor, the diffusers divisor.
    var = (((lat_std + _DIFFUSERS_STD_EPS) / scaling) ** 2 - 1e-5).float()
    return RAE(encoder, decoder, noise_tau=float(config.get("noise_tau", 0.0)),
               latent_mean=lat_mean, latent_var=var, eps=1e-5)


def _diffusers_encoder_config(kind: str, hidden: int, patch: int, layers: int):
    """The HF config diffusers builds for an embedded encoder (its only supported shapes)."""
    import transformers as tf

    common = dict(hidden_size=hidden, patch_size=patch, num_attention_heads=hidden // 64, num_hidden_layers=layers)
    if kind == "dinov2":
        return tf.Dinov2WithRegistersConfig(image_size=518, **common)
    if kind == "siglip2":
        return tf.SiglipVisionConfig(image_size=256, **common)
    return tf.ViTMAEConfig(image_size=224, mask_ratio=0.0, **common)


# image_size is compared as a grid (image_size // patch_size): only the grid shapes weights.
_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                  "intermediate_size", "mlp_ratio", "layer_norm_eps", "num_register_tokens", "hidden_act",
                  "layerscale_value", "qkv_bias", "use_swiglu_ffn", "num_channels")


def _check_diffusers_representable(encoder: FrozenEncoder, decoder: ViTDecoder) -> None:
    cfg = encoder.model.config
    ref = _diffusers_encoder_config(encoder.kind, cfg.hidden_size, cfg.patch_size, cfg.num_hidden_layers)
    diffs = [
        f"{f}={getattr(cfg, f)} (diffusers builds {getattr(ref, f)})"
        for f in _CONFIG_FIELDS if hasattr(ref, f) and getattr(cfg, f, None) != getattr(ref, f)
    ]
    if cfg.image_size // cfg.patch_size != ref.image_size // ref.patch_size:
        diffs.append(f"position grid {cfg.image_size // cfg.patch_size} (diffusers builds "
                     f"{ref.image_size // ref.patch_size})")
    if diffs:
        raise ValueError("encoder cannot be expressed as a diffusers AutoencoderRAE: " + "; ".join(diffs))
    if (encoder.input_size // encoder.patch_size) ** 2 != decoder.num_patches:
        raise ValueError(
            f"encoder grid {encoder.grid_size}^2 != decoder num_patches {decoder.num_patches}; "
            "diffusers derives the decoder grid from the encoder"
        )
    table = sincos_2d(decoder.decoder_pos_embed.shape[-1], decoder.grid_size, cls_token=True,
                      base_size=DIFFUSERS_POS_BASE_SIZE)
    if not torch.allclose(decoder.decoder_pos_embed.detach().cpu()[0], table, atol=1e-6):
        raise ValueError(
            f"the decoder's position table differs from the one diffusers recomputes for a "
            f"{decoder.grid_size}x{decoder.grid_size} grid (diffusers scales positions by "
            f"{DIFFUSERS_POS_BASE_SIZE}/grid), so diffusers would give different outputs"
        )
    if decoder.decoder_norm.eps != 1e-12:
        raise ValueError(f"decoder LayerNorm eps {decoder.decoder_norm.eps} != 1e-12 (fixed in diffusers)")


def save_diffusers_autoencoder(rae: RAE, folder: str | os.PathLike) -> None:
    """Write ``rae`` as a diffusers AutoencoderRAE folder that diffusers loads with the same outputs."""
    encoder, decoder = rae.encoder, rae.decoder
    _check_diffusers_representable(encoder, decoder)
    if rae.eps != 1e-5:
        raise ValueError(f"rae.eps={rae.eps}: the diffusers format assumes 1e-5")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    mean = rae.latent_mean
    if rae.latent_var is None:
        std = torch.full((1,), 1.0 - _DIFFUSERS_STD_EPS)  # divisor (std + 1e-5) == 1
    else:
        std = (torch.sqrt(rae.latent_var.double() + rae.eps) - _DIFFUSERS_STD_EPS).float()

    tensors = {f"encoder.{k}": v for k, v in encoder.model.state_dict().items()}
    tensors["encoder_mean"] = encoder.image_mean
    tensors["encoder_std"] = encoder.image_std
    tensors["_latents_mean"] = mean if mean is not None else torch.zeros(1)
    tensors["_latents_std"] = std
    for key, value in decoder.state_dict().items():
        if key != "decoder_pos_embed":  # a non-persistent buffer in diffusers
            tensors["decoder." + _rename(key, _DECODER_RENAMES)] = value
    tensors = {k: v.detach().cpu().float().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    try:
        from diffusers import __version__ as diffusers_version
    except ImportError:  # the format does not depend on it; record what we target
        diffusers_version = "0.38.0"
    cfg = encoder.model.config
    config = {
        "_class_name": CLASS_NAME,
        "_diffusers_version": diffusers_version,
        "encoder_type": encoder.kind,
        "encoder_hidden_size": cfg.hidden_size,
        "encoder_patch_size": cfg.patch_size,
        "encoder_num_hidden_layers": cfg.num_hidden_layers,
        "decoder_hidden_size": decoder.decoder_embed.out_features,
        "decoder_num_hidden_layers": len(decoder.decoder_layers),
        "decoder_num_attention_heads": decoder.decoder_layers[0].attention.attention.num_heads,
        "decoder_intermediate_size": decoder.decoder_layers[0].intermediate.dense.out_features,
        "patch_size": decoder.patch_size,
        "encoder_input_size": encoder.input_size,
        "image_size": None,
        "num_channels": decoder.num_channels,
        "encoder_norm_mean": encoder.image_mean.flatten().tolist(),
        "encoder_norm_std": encoder.image_std.flatten().tolist(),
        "latents_mean": None if mean is None else mean.detach().cpu().tolist(),
        "latents_std": std.tolist(),
        "noise_tau": rae.noise_tau,
        "reshape_to_2d": True,
        "use_encoder_loss": False,
        "scaling_factor": 1.0,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    logger.info("wrote diffusers AutoencoderRAE to %s", folder)
