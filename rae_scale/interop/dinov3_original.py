"""Meta's original DINOv3 backbone checkpoints (`dinov3_vit*_pretrain_*.pth`) as transformers models.

RAEv2 loads these files through torch.hub, i.e. by running the dinov3 repository's code fetched at
run time (raev2_method.md 1.2). Here the state dict is read with ``torch.load(weights_only=True)`` and
its keys are mapped onto ``transformers.DINOv3ViTModel``, so no foreign code runs. The architecture is
read from the tensors themselves (width, depth, MLP width, patch, registers; the head size from the
RoPE periods, whose length is head_dim / 4); a ``config.json`` beside the file (the kwargs of dinov3's
``_make_dinov3_vit``, optionally under "arch") is checked against it.

The qkv bias is multiplied by ``bias_mask`` as dinov3's ``LinearKMaskedBias`` does (the released
weights mask the key bias to zero); a mask that is still NaN marks a checkpoint saved before its
weights were loaded and is refused.
"""
from __future__ import annotations

import io
import json
import os
import re

import torch

BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma")
TOP_KEYS = ("cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "rope_embed.periods", "norm.weight",
            "norm.bias")
OPTIONAL_KEYS = ("storage_tokens", "mask_token")  # optional per block: attn.qkv.bias_mask
LAYER_NORM_EPS = 1e-5  # dinov3's "layernormbf16" (raev2_method.md 1.2)


class DINOv3CheckpointError(ValueError):
    """The file is not a DINOv3 backbone state dict this mapping supports (one line, names what is wrong)."""


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _depth(sd: dict) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def infer_arch(sd: dict, where: str = "checkpoint") -> dict:
    """Architecture of an original DINOv3 state dict, checked for the keys the mapping needs."""
    depth = _depth(sd)
    required = list(TOP_KEYS) + [f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS]
    missing = [k for k in required if k not in sd]
    if depth == 0 or missing:
        raise DINOv3CheckpointError(
            f"{where}: not a complete DINOv3 ViT backbone state dict: missing "
            f"{_names(missing) if depth else 'blocks.0.* (no transformer blocks)'}; expected Meta's original "
            "dinov3_vit*_pretrain_*.pth (ViT-S/B/L with the plain MLP)")
    width = sd["cls_token"].shape[-1]
    periods = sd["rope_embed.periods"].float()
    head_dim = 4 * periods.numel()
    if width % head_dim:
        raise DINOv3CheckpointError(f"{where}: rope_embed.periods has {periods.numel()} entries (head_dim "
                                    f"{head_dim}), which does not divide the width {width}")
    theta = float(periods[1]) ** (head_dim / 4) if periods.numel() > 1 else 100.0
    theta = float(f"{theta:.6g}")
    expected = theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float64)
    if not torch.allclose(periods.double(), expected, rtol=1e-4, atol=0):
        raise DINOv3CheckpointError(f"{where}: rope_embed.periods are not base ** (4 i / head_dim) for any base "
                                    "(only DINOv3's plain RoPE periods map onto transformers' rope_theta)")
    return {
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": width // head_dim,
        "intermediate_size": sd["blocks.0.mlp.fc1.weight"].shape[0],
        "patch_size": sd["patch_embed.proj.weight"].shape[-1],
        "num_channels": sd["patch_embed.proj.weight"].shape[1],
        "num_register_tokens": sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0,
        "rope_theta": theta,
    }


def _check_against_json(arch: dict, spec: dict, where: str) -> dict:
    """Sizes in a `_make_dinov3_vit` kwargs file must agree with the tensors; returns extra HF settings."""
    spec = spec.get("arch", spec)
    pairs = {"embed_dim": "hidden_size", "depth": "num_hidden_layers", "num_heads": "num_attention_heads",
             "patch_size": "patch_size", "n_storage_tokens": "num_register_tokens",
             "pos_embed_rope_base": "rope_theta", "in_chans": "num_channels"}
    for src, dst in pairs.items():
        if src in spec and float(spec[src]) != float(arch[dst]):
            raise DINOv3CheckpointError(f"{where}: config.json says {src}={spec[src]} but the weights give "
                                        f"{dst}={arch[dst]}")
    if spec.get("ffn_layer", "mlp") != "mlp":
        raise DINOv3CheckpointError(f"{where}: ffn_layer={spec['ffn_layer']!r} is not supported; allowed: mlp "
                                    "(ViT-S/B/L)")
    extra = {}
    if spec.get("pos_embed_rope_rescale_coords") is not None:  # train-mode jitter only; kept for fidelity
        extra["pos_embed_rescale"] = float(spec["pos_embed_rope_rescale_coords"])
    return extra


def convert_state_dict(sd: dict, where: str = "checkpoint", spec: dict | None = None):
    """(DINOv3ViTConfig, transformers state dict) for an original DINOv3 state dict."""
    from transformers import DINOv3ViTConfig

    arch = infer_arch(sd, where)
    extra = _check_against_json(arch, spec, where) if spec else {}
    c = arch["hidden_size"]
    out = {"embeddings.cls_token": sd["cls_token"].reshape(1, 1, c),
           "embeddings.mask_token": sd.get("mask_token", torch.zeros(1, c)).reshape(1, 1, c),
           "embeddings.register_tokens": sd.get("storage_tokens", torch.zeros(1, 0, c)),
           "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    used = set(TOP_KEYS) | {k for k in OPTIONAL_KEYS if k in sd}
    key_bias = False
    for i in range(arch["num_hidden_layers"]):
        p, q = f"blocks.{i}.", f"layer.{i}."
        bias = sd[p + "attn.qkv.bias"]
        if p + "attn.qkv.bias_mask" in sd:
            mask = sd[p + "attn.qkv.bias_mask"]
            if torch.isnan(mask).any():
                raise DINOv3CheckpointError(f"{where}: {p}attn.qkv.bias_mask holds NaN (dinov3 creates it as NaN "
                                            "until weights are loaded): this file was saved from an unloaded model")
            bias = bias * mask
            used.add(p + "attn.qkv.bias_mask")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{q}attention.{name}.weight"] = sd[p + "attn.qkv.weight"][j * c:(j + 1) * c]
            out[f"{q}attention.{name}.bias"] = bias[j * c:(j + 1) * c]
        key_bias = key_bias or bool(bias[c:2 * c].abs().max() > 0)
        for src, dst in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.o_proj"),
                         ("mlp.fc1", "mlp.up_proj"), ("mlp.fc2", "mlp.down_proj")):
            out[f"{q}{dst}.weight"], out[f"{q}{dst}.bias"] = sd[f"{p}{src}.weight"], sd[f"{p}{src}.bias"]
        out[f"{q}layer_scale1.lambda1"], out[f"{q}layer_scale2.lambda1"] = sd[p + "ls1.gamma"], sd[p + "ls2.gamma"]
        used.update(p + k for k in BLOCK_KEYS)
    unexpected = set(sd) - used
    if unexpected:
        raise DINOv3CheckpointError(f"{where}: keys this mapping does not know: {_names(unexpected)}; supported: "
                                    "the ViT-S/B/L backbones with the plain MLP (no SwiGLU, no untied CLS norms)")
    if not key_bias:
        out = {k: v for k, v in out.items() if not re.search(r"attention\.k_proj\.bias$", k)}
    config = DINOv3ViTConfig(layer_norm_eps=LAYER_NORM_EPS, layerscale_value=1.0, key_bias=key_bias,
                             query_bias=True, value_bias=True, proj_bias=True, mlp_bias=True, **arch, **extra)
    return config, out


def read_state_dict(path: str) -> dict:
    """A plain tensor dict from a .pth file (local path or fsspec URL), never unpickling objects."""
    from rae_scale import storage

    fs, local = storage.filesystem(path)
    if not fs.exists(local):
        raise FileNotFoundError(f"DINOv3 checkpoint {path!r} does not exist")
    with fs.open(local, "rb") as f:
        data = f.read()
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise DINOv3CheckpointError(f"{path}: not a tensor state dict ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DINOv3CheckpointError(f"{path}: expected a flat dict of tensors (Meta's backbone .pth), "
                                    f"got {type(sd).__name__}")
    return sd


def load_dinov3_original(path: str):
    """transformers ``DINOv3ViTModel`` (eval mode) with the weights of Meta's original ``.pth`` at ``path``."""
    from transformers import DINOv3ViTModel

    sd = read_state_dict(path)
    spec = None
    spec_path = os.path.join(os.path.dirname(path), "config.json")
    if os.path.isfile(spec_path):  # local files only: a remote checkpoint is read from its tensors alone
        with open(spec_path) as f:
            spec = json.load(f)
        if not isinstance(spec, dict) or not any(k in spec.get("arch", spec) for k in ("embed_dim", "depth")):
            spec = None  # a config.json of something else (e.g. a transformers folder): ignore it
    config, hf_sd = convert_state_dict(sd, where=path, spec=spec)
    model = DINOv3ViTModel(config)
    model.load_state_dict(hf_sd, strict=True)
    return model.eval()
