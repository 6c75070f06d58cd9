"""CLIP score of text-to-image samples: how well each image matches its prompt.

CLIP-S (Hessel et al. 2021) with torchmetrics' weight: 100 * max(cos(E_image, E_text), 0) per image and
its prompt, averaged (over all images, and per prompt). Unlike torchmetrics, which clamps the average,
the clamp acts on each pair as the paper defines it; the two agree whenever no cosine is negative.

Images are preprocessed as CLIP's own (slow, PIL) image processor does, so scores match those of
CLIPProcessor + CLIPModel: each uint8 image is resized with PIL's bicubic filter (antialiased) so its
shortest side is the processor's size (the vision tower's image_size), center-cropped, scaled to [0, 1]
and normalised with the folder's preprocessor_config.json mean / std (OpenAI CLIP's constants when it has
none). The resize stays in PIL on purpose: PIL rounds to uint8 after each of its two passes, which no
torch resize reproduces (up to 20 levels apart on sharp images). Prompts longer than the text tower's
positions are truncated with a warning. The model runs in float32, eval mode, without gradients.
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from rae_scale.eval.spaces import CLIP_MEAN, CLIP_STD, weights_digest
from rae_scale.models.text import check_available as check_text_model_available

logger = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"


def check_available(source: str | None) -> None:
    """Raise FileNotFoundError (one line) unless `source` is a folder, or a hub name whose config is in the
    local Hugging Face cache (the text encoder's check, models.text.check_available)."""
    check_text_model_available(source, what="CLIP model", key="clip_model", kind=" of a CLIPModel")


def _preprocessor_config(source: str) -> dict:
    """The folder's (or cached release's) preprocessor_config.json, or {} when it has none."""
    path = os.path.join(os.path.expanduser(source), PREPROCESSOR_FILE)
    if not os.path.isdir(os.path.expanduser(source)):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, PREPROCESSOR_FILE)
        path = cached if isinstance(cached, str) else ""
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _side(value, default: int) -> int:
    """A processor size entry (int, {"shortest_edge": n} or {"height": n, "width": n}) as one side."""
    if value is None:
        return default
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if value.get("height") != value.get("width"):
            raise ValueError(f"CLIP preprocessing: a non-square size {value} is not supported")
        return int(value["height"])
    return int(value)


class CLIPScorer(nn.Module):
    """A frozen CLIPModel and its tokenizer: preprocess(images), image_embeds, text_embeds, scores."""

    def __init__(self, model: nn.Module, tokenizer, *, resize_to: int, crop: int, mean: Sequence[float],
                 std: Sequence[float], source: str = ""):
        super().__init__()
        self.model = model.float().eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.resize_to, self.crop, self.source = int(resize_to), int(crop), source
        image_size = int(model.config.vision_config.image_size)
        if self.crop != image_size:
            raise ValueError(f"CLIP model {source!r}: its processor crops to {self.crop} px, its vision tower "
                             f"takes {image_size} px")
        self.max_tokens = int(model.config.text_config.max_position_embeddings)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.digest = weights_digest(self.model)

    def train(self, mode: bool = True):  # frozen: stays in eval mode whatever the caller asks
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def identity(self) -> dict:
        """What a results JSON records about the scorer: which weights and which preprocessing."""
        return {"source": self.source, "weights_sha1": self.digest, "resize_shortest_edge": self.resize_to,
                "crop": self.crop, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(),
                "max_text_tokens": self.max_tokens}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float32 pixel values [B, 3, crop, crop] on the scorer's device."""
        from PIL import Image

        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            got = (tuple(images.shape), images.dtype) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"CLIP score takes uint8 images [B, 3, H, W]; got {got}")
        h, w = images.shape[-2:]
        short, long = min(h, w), max(h, w)
        new_long = int(self.resize_to * long / short)  # transformers' shortest-edge rule (floor)
        size = (new_long, self.resize_to) if h > w else (self.resize_to, new_long)  # (height, width)
        if (h, w) != size:
            arrays = images.permute(0, 2, 3, 1).cpu().numpy()
            resized = [np.asarray(Image.fromarray(a).resize(size[::-1], Image.BICUBIC)) for a in arrays]
            images = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        if top < 0 or left < 0:
            raise ValueError(f"CLIP preprocessing: resized images {size} are smaller than the crop {self.crop}")
        x = images[:, :, top:top + self.crop, left:left + self.crop].to(self.device, torch.float32) / 255.0
        return (x - self.mean) / self.std

    def tokenize(self, prompts: Sequence[str]) -> dict:
        """Padded token ids and attention mask; prompts longer than the text tower's positions are cut."""
        prompts = list(prompts)
        lengths = self.tokenizer(prompts, padding=False, truncation=False)["input_ids"]
        cut = sum(len(ids) > self.max_tokens for ids in lengths)
        if cut:
            logger.warning("CLIP score: %d of %d prompt(s) longer than %d tokens were truncated", cut, len(prompts),
                           self.max_tokens)
        enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length CLIP image embeddings of uint8 images."""
        emb = self.model.get_image_features(pixel_values=self.preprocess(images)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-length CLIP text embeddings of prompts."""
        emb = self.model.get_text_features(**self.tokenize(prompts)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """100 * max(cos, 0) of image i and prompt i, [B] float32 on the CPU."""
        if len(prompts) != len(images):
            raise ValueError(f"CLIP score needs one prompt per image; got {len(prompts)} for {len(images)}")
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return (100.0 * cos.clamp(min=0)).cpu()


def load_clip_scorer(source: str, device: str | torch.device = "cpu") -> CLIPScorer:
    """A CLIPScorer from a save_pretrained folder or a hub name already in the local cache (offline)."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    check_available(source)
    path = os.path.expanduser(source)
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):  # its init draws must not shift the caller's random stream
            model, info = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                    output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"CLIP model {source!r} cannot be loaded offline ({first}); give a local "
                                "save_pretrained folder of a CLIPModel with its tokenizer") from None
    except (ValueError, KeyError, RuntimeError) as exc:  # another architecture's folder
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ValueError(f"CLIP model {source!r} is not a CLIPModel checkpoint "
                         f"({lines[-1] if lines else type(exc).__name__})") from None
    finally:
        hf_logging.set_verbosity(old)
    missing = [k for k in info.get("missing_keys", ()) if "position_ids" not in k]
    if missing:
        raise ValueError(f"CLIP model {source!r} lacks {len(missing)} weight(s) (e.g. {missing[0]}); is it a "
                         "CLIPModel checkpoint with both towers?")
    pre = _preprocessor_config(source)
    image_size = int(model.config.vision_config.image_size)
    scorer = CLIPScorer(model, tokenizer, resize_to=_side(pre.get("size"), image_size),
                        crop=_side(pre.get("crop_size"), image_size), mean=pre.get("image_mean", CLIP_MEAN),
                        std=pre.get("image_std", CLIP_STD), source=source)
    return scorer.to(device)


# ----------------------------------------------------------------------------- scoring a sample npz


def iter_npz_rows(path: str, key: str = "arr_0", chunk: int = 64) -> Iterator[np.ndarray]:
    """Rows of one array of an npz, `chunk` at a time, without loading the whole array (a 50k-sample
    npz of 256 px images is 10 GB)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"{path}: {key} has npy format version {version}; allowed: 1.0, 2.0")
        shape, fortran, dtype = read_header(f)
        if fortran:
            raise ValueError(f"{path}: {key} is stored in Fortran order; allowed: C order")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], chunk):
            n = min(chunk, shape[0] - start)
            yield np.frombuffer(bytearray(f.read(row * n)), dtype=dtype).reshape(n, *shape[1:])


def score_npz(scorer: CLIPScorer, path: str, prompts: Sequence[str], batch_size: int = 64) -> dict:
    """CLIP scores of a sample npz (arr_0 uint8 NHWC images, arr_1 the prompt index of each image).

    Returns clip_score (mean over all images), per_prompt ({prompt, clip_score, num_samples} in prompt
    order) and the per-image scores (index order)."""
    with np.load(path) as f:
        index = torch.from_numpy(f["arr_1"].astype(np.int64))
    if len(index) == 0:
        raise ValueError(f"{path} holds no samples")
    if int(index.min()) < 0 or int(index.max()) >= len(prompts):
        raise ValueError(f"{path}: prompt indices span {int(index.min())}..{int(index.max())}, but there are "
                         f"{len(prompts)} prompts")
    text = torch.cat([scorer.text_embeds(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
    per_image, start = [], 0
    for rows in iter_npz_rows(path, "arr_0", batch_size):
        images = torch.from_numpy(rows).permute(0, 3, 1, 2)
        idx = index[start:start + len(images)].to(text.device)
        cos = (scorer.image_embeds(images) * text[idx]).sum(-1)
        per_image.append((100.0 * cos.clamp(min=0)).cpu())
        start += len(images)
    scores = torch.cat(per_image).double()
    if len(scores) != len(index):
        raise ValueError(f"{path}: {len(scores)} images but {len(index)} prompt indices")
    counts = torch.bincount(index, minlength=len(prompts))
    sums = torch.zeros(len(prompts), dtype=torch.float64).index_add_(0, index, scores)
    per_prompt = [{"prompt": p, "clip_score": float(sums[i] / counts[i]) if counts[i] else None,
                   "num_samples": int(counts[i])} for i, p in enumerate(prompts)]
    return {"clip_score": float(scores.mean()), "per_prompt": per_prompt, "per_image": scores.tolist()}


# ----------------------------------------------------------------------------- a tiny CLIP for tests and demos


def save_random_clip(folder: str, *, hidden_size: int = 16, num_layers: int = 2, num_heads: int = 2,
                     projection_dim: int = 8, image_size: int = 32, patch_size: int = 8, max_tokens: int = 77,
                     seed: int = 0) -> str:
    """Write a seeded random CLIPModel with a byte-level CLIP tokenizer (each byte a token, the word's last
    byte with CLIP's `</w>`; start/end-of-text specials) and a CLIP image processor, as a save_pretrained
    folder that load_clip_scorer reads back. Weights are perturbed away from the default init (identity
    LayerNorms, zero biases) so that every part acts."""
    import tempfile

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with tempfile.TemporaryDirectory(prefix="rae_clip_tok_") as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = CLIPTokenizerFast(vocab_file=os.path.join(tmp, "vocab.json"),
                                      merges_file=os.path.join(tmp, "merges.txt"))
    tower = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                 intermediate_size=2 * hidden_size)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=max_tokens,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, **tower),
                        vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
                        projection_dim=projection_dim)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(folder)
    return folder
