"""The six feature spaces of RAEv2's FD_r^6 / MIND (fd_evaluator's catalogue), loaded with transformers.

Each space is a frozen image network, an input size, a normalisation and a feature (see
raev2_method.md section 8). fd_evaluator builds them with timm; timm is not a dependency here, so
the same checkpoints are loaded from their transformers releases and run the way timm runs them:
uint8 -> float [0, 255] -> bicubic antialiased resize (skipped at the native size) -> (x - 255 mean)
/ (255 std) -> zero padding right/bottom to a multiple of the patch (timm's dynamic_img_pad) ->
position embeddings resampled once to the new grid with bicubic + antialias (timm's
resample_abs_pos_embed) -> the feature; ViTs under bf16 autocast on CUDA only. "inception" is the
TF-2015 Inception of inception.py (FID's pool3), not built here.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
EXTRACTORS_ENV = "RAE_SCALE_EXTRACTORS"  # a folder with one transformers folder per space name


@dataclass(frozen=True)
class Space:
    """One feature space: where its network comes from, how images enter it, what comes out."""

    name: str
    hf_name: str  # the transformers release of the timm checkpoint fd_evaluator uses
    timm_name: str
    family: str  # convnextv2 | dinov2 | vit_mae | siglip | clip | inception
    input_size: int
    feature: str  # spatial_mean | cls | pooler | pool3
    dim: int
    norm_const: float  # FD_r = FD / norm_const (fd_evaluator catalogue.yaml)
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    bf16_on_cuda: bool = True


SPACE_TABLE: dict[str, Space] = {s.name: s for s in (
    Space("inception", "", "inception-v3-compat (torch-fidelity)", "inception", 299, "pool3", 2048, 1.68,
          bf16_on_cuda=False),
    Space("convnext", "facebook/convnextv2-base-22k-224", "convnextv2_base.fcmae_ft_in22k_in1k", "convnextv2",
          224, "spatial_mean", 1024, 56.87, bf16_on_cuda=False),
    Space("dinov2", "facebook/dinov2-large", "vit_large_patch14_dinov2.lvd142m", "dinov2", 256, "cls", 1024, 14.19),
    Space("mae", "facebook/vit-mae-large", "vit_large_patch16_224.mae", "vit_mae", 224, "cls", 1024, 0.04),
    Space("siglip", "google/siglip2-so400m-patch16-256", "vit_so400m_patch16_siglip_256.v2_webli", "siglip",
          224, "pooler", 1152, 0.60, HALF, HALF),
    Space("clip", "openai/clip-vit-large-patch14", "vit_large_patch14_clip_224.openai", "clip", 256, "pooler",
          1024, 5.60, CLIP_MEAN, CLIP_STD),
)}
SPACES: tuple[str, ...] = tuple(SPACE_TABLE)


def parse_spaces(spaces) -> tuple[str, ...]:
    """'inception,dinov2' or a list -> validated names in catalogue order, each once."""
    names = [s.strip().lower() for s in (spaces.split(",") if isinstance(spaces, str) else spaces or [])]
    names = [s for s in names if s]
    unknown = [s for s in names if s not in SPACE_TABLE]
    if unknown:
        raise ValueError(f"unknown feature space(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(SPACES)}")
    if not names:
        raise ValueError(f"no feature space given; allowed: {', '.join(SPACES)}")
    return tuple(s for s in SPACES if s in names)


def fd_ratios(fd: dict[str, float]) -> dict:
    """fd_r_<space> = FD / constant for each space, fd_r_mean over them, fd_r6 when all six are there."""
    out = {f"fd_r_{s}": v / SPACE_TABLE[s].norm_const for s, v in fd.items()}
    if out:
        out["fd_r_mean"] = sum(out.values()) / len(out)
    if set(fd) == set(SPACES):
        out["fd_r6"] = out["fd_r_mean"]
    return out


# ----------------------------------------------------------------------------- preprocessing


def resize_bicubic(x: torch.Tensor, size: int) -> torch.Tensor:
    """fd_evaluator's resize: bicubic, antialias, on float [0, 255]; none at the native size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def pad_to_patch(x: torch.Tensor, patch: int) -> torch.Tensor:
    """timm's dynamic_img_pad: zeros right and bottom up to a multiple of the patch size."""
    ph, pw = (-x.shape[-2]) % patch, (-x.shape[-1]) % patch
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def resample_grid(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """[G*G, D] position embeddings -> [n*n, D]: timm's resample_abs_pos_embed (bicubic, antialias)."""
    g = math.isqrt(pos.shape[0])
    if g * g != pos.shape[0]:
        raise ValueError(f"position embeddings of {pos.shape[0]} tokens are not a square grid")
    if g == new_grid:
        return pos
    grid = pos.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)


# ----------------------------------------------------------------------------- the networks


def _hf_class(family: str):
    import transformers as tf

    return {"convnextv2": tf.ConvNextV2Model, "dinov2": tf.Dinov2Model, "vit_mae": tf.ViTMAEModel,
            "siglip": tf.SiglipVisionModel, "clip": tf.CLIPVisionModel}[family]


def _patch_size(model: nn.Module, family: str) -> int:
    cfg = model.config
    return 1 if family == "convnextv2" else int(cfg.patch_size)


def _set_grid(model: nn.Module, family: str, grid: int, size: int) -> None:
    """Give a ViT position embeddings for a grid x grid input of `size` pixels (resampled once)."""
    if family == "dinov2":  # Parameter [1, 1 + G*G, D]; used as is when its length matches the input
        emb = model.embeddings
        pe = emb.position_embeddings.data[0]
        emb.position_embeddings = nn.Parameter(torch.cat([pe[:1], resample_grid(pe[1:], grid)])[None],
                                               requires_grad=False)
        return
    if family == "vit_mae":  # fixed sin-cos; the patch embedder checks the configured size
        emb = model.embeddings
        pe = emb.position_embeddings.data[0]
        emb.position_embeddings = nn.Parameter(torch.cat([pe[:1], resample_grid(pe[1:], grid)])[None],
                                               requires_grad=False)
        emb.patch_embeddings.image_size = (size, size)
        emb.patch_embeddings.num_patches = grid * grid
        model.config.image_size = size
        return
    emb = model.vision_model.embeddings  # siglip (no class token) and clip (class token first)
    w = emb.position_embedding.weight.data
    prefix = 1 if family == "clip" else 0
    new = torch.cat([w[:prefix], resample_grid(w[prefix:], grid)])
    emb.position_embedding = nn.Embedding.from_pretrained(new, freeze=True)
    emb.num_patches, emb.num_positions, emb.image_size = grid * grid, new.shape[0], size
    emb.register_buffer("position_ids", torch.arange(new.shape[0], device=new.device)[None], persistent=False)


class SpaceExtractor(nn.Module):
    """uint8 NCHW images -> float32 features [N, dim] of one space; frozen, deterministic."""

    def __init__(self, space: Space, model: nn.Module, source: str):
        super().__init__()
        self.space, self.source = space, source
        self.model = model.eval().requires_grad_(False)
        if space.family == "vit_mae":
            self.model.config.mask_ratio = 0.0  # MAE masks 75% of the tokens by default; features see all
        self.patch = _patch_size(model, space.family)
        self.register_buffer("mean", torch.tensor(space.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(space.std).view(1, 3, 1, 1) * 255.0)
        if space.family != "convnextv2":
            padded = space.input_size + (-space.input_size) % self.patch
            _set_grid(self.model, space.family, padded // self.patch, padded)
        self.digest = weights_digest(self.model)

    @property
    def dim(self) -> int:
        """Feature width of the loaded network (the table's `dim` for the released checkpoints)."""
        cfg = self.model.config
        return int(cfg.hidden_sizes[-1] if self.space.family == "convnextv2" else cfg.hidden_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the network's input (resize, normalise, pad), float32."""
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"{self.space.name} extractor expects uint8 images [N, 3, H, W], got "
                             f"{images.dtype} {tuple(images.shape)}")
        x = images.to(self.mean.device, torch.float32)
        x = (resize_bicubic(x, self.space.input_size) - self.mean) / self.std
        return pad_to_patch(x, self.patch) if self.patch > 1 else x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        family = self.space.family
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda and self.space.bf16_on_cuda):
            if family == "vit_mae":  # identity "shuffle": no masking, no random draw, tokens in order
                noise = torch.arange(self.model.embeddings.patch_embeddings.num_patches, device=x.device)
                out = self.model(pixel_values=x, noise=noise.float().expand(x.shape[0], -1))
            else:
                out = self.model(pixel_values=x)
        if self.space.feature == "spatial_mean":
            feats = out.last_hidden_state.mean(dim=(2, 3))
        elif self.space.feature == "cls":
            feats = out.last_hidden_state[:, 0]
        else:
            feats = out.pooler_output
        return feats.float()


def weights_digest(model: nn.Module) -> str:
    """sha1 over names and bytes of every parameter and buffer: which weights made the features."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def extractor_source(space: str, sources: dict | None = None, folder: str | None = None) -> str:
    """Where a space's network comes from: sources[space], else <folder or $RAE_SCALE_EXTRACTORS>/<space>,
    else the transformers release name (read from the local Hugging Face cache, never downloaded)."""
    if sources and sources.get(space):
        return str(sources[space])
    folder = folder or os.environ.get(EXTRACTORS_ENV)
    if folder:
        return str(Path(folder) / space)
    return SPACE_TABLE[space].hf_name


def _allowed_missing(key: str) -> bool:
    return "mask_token" in key  # unused at inference (no masking)


def build_extractor(space: str, source: str | None = None, device="cpu") -> SpaceExtractor:
    """The frozen network of one space from a transformers folder (save_pretrained) or a cached
    release name; offline only, safetensors or a weights-only .bin, every used weight present."""
    if space == "inception":
        raise ValueError("the inception space is the FID Inception (eval.inception.build_inception)")
    spec = SPACE_TABLE[parse_spaces([space])[0]]
    source = source or spec.hf_name
    looks_local = os.path.isabs(source) or source.startswith(".") or os.path.exists(source) \
        or source.count("/") != 1
    if looks_local and not Path(source).is_dir():
        raise FileNotFoundError(f"feature space {space!r}: extractor folder {source} does not exist (expected a "
                                f"transformers save_pretrained folder of {spec.hf_name})")
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = _hf_class(spec.family).from_pretrained(
            source, output_loading_info=True, local_files_only=True)  # .bin: transformers' weights_only load
    except OSError as exc:
        raise FileNotFoundError(f"feature space {space!r}: cannot load the extractor from {source} offline "
                                f"({str(exc).splitlines()[0]}); pass a local folder") from None
    except (RuntimeError, ValueError, KeyError) as exc:  # another architecture's folder
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ValueError(f"feature space {space!r}: {source} is not a checkpoint of {spec.hf_name} "
                         f"({lines[-1] if lines else type(exc).__name__})") from None
    finally:
        hf_logging.set_verbosity(old)
    missing = [k for k in info.get("missing_keys", ()) if not _allowed_missing(k)]
    if missing:
        raise ValueError(f"feature space {space!r}: {source} lacks {len(missing)} weight(s) the features use "
                         f"(e.g. {missing[0]}); is it a {spec.hf_name} checkpoint?")
    return SpaceExtractor(spec, model.float(), source).to(device)


def build_extractors(spaces, sources: dict | None = None, folder: str | None = None,
                     device="cpu") -> dict[str, SpaceExtractor]:
    """Extractors of every non-Inception space in `spaces`, keyed by space name."""
    return {s: build_extractor(s, extractor_source(s, sources, folder), device)
            for s in parse_spaces(spaces) if s != "inception"}


def extractors_identity(extractors: dict[str, SpaceExtractor]) -> dict:
    """What the spec records per space: source and a digest of the weights."""
    return {name: {"source": ex.source, "weights_sha1": ex.digest, "input_size": ex.space.input_size}
            for name, ex in extractors.items()}
