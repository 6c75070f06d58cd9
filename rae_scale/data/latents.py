"""Cached-latent samples and latent statistics files.

Statistics are written twice: our file (safetensors, float64 ``mean`` / ``var`` [C,H,W] plus the
sample count in its metadata) and, for upstream tools, a torch file ``{"mean", "var"}`` in float32
(the layout upstream RAE's ``normalization_stat_path`` reads). :func:`load_stats` reads either.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from rae_scale import storage

STATS_FORMAT = "rae_scale.latent_stats/1"


def latent_to_tensor(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored latent (float32, or bf16 bits as uint16) -> float32 tensor."""
    if dtype == "bf16":
        # a copy: the decoded column is a read-only view of the shard's bytes
        return torch.from_numpy(np.array(arr, dtype=np.uint16).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(arr, dtype=np.float32))


def tensor_to_stored(t: torch.Tensor, dtype: str) -> np.ndarray:
    """float tensor -> the array written to the cache (bf16 keeps its exact bits as uint16)."""
    if dtype == "bf16":
        return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)
    return t.detach().float().cpu().numpy()


def decode_latent_sample(sample: dict, sample_id: int, *, dtype: str, both_flips: bool):
    """(latent [C,h,w], label, sample id), or both variants [2,C,h,w] when the reader read both. A reader
    that selected one variant (FlipVariant) hands over only "latent" or only "latent_flip"."""
    if both_flips and "latent" in sample and "latent_flip" in sample:
        lat = torch.stack([latent_to_tensor(sample["latent"], dtype), latent_to_tensor(sample["latent_flip"], dtype)])
    else:
        lat = latent_to_tensor(sample["latent"] if "latent" in sample else sample["latent_flip"], dtype)
    return lat, int(sample["label"]), sample_id


class FlipVariant:
    """Which stored variant of each latent to read: the flipped one with probability 1/2 per (seed, epoch,
    sample id) when hflip is on, else the plain one (the same draw ShardLoader makes from both variants)."""

    def __init__(self, seed: int, hflip: bool, extra: tuple[str, ...] = ()):
        """extra: other columns to read besides the variant, label and index (e.g. the caption)."""
        self.seed, self.hflip, self.extra = int(seed), bool(hflip), tuple(extra)

    def __call__(self, epoch: int, sample_ids) -> list[tuple[str, ...]]:
        from rae_scale.data.transforms import hash_uniform
        from rae_scale.seeding import HashStream

        ids = np.asarray(sample_ids, dtype=np.int64)
        flipped = (hash_uniform(self.seed, epoch, ids, stream=HashStream.LATENT_FLIP) < 0.5 if self.hflip
                   else np.zeros(len(ids), dtype=bool))
        return [("latent_flip" if f else "latent", "label", "index", *self.extra) for f in flipped]


def save_stats(url: str, mean: torch.Tensor, var: torch.Tensor, count: int,
               upstream_url: str | None = None) -> None:
    """Write our stats file at ``url`` and, if given, upstream's {"mean","var"} .pt at ``upstream_url``."""
    from safetensors.torch import save

    data = save({"mean": mean.to(torch.float64).contiguous(), "var": var.to(torch.float64).contiguous()},
                metadata={"format": STATS_FORMAT, "count": str(int(count))})
    fs, path = storage.filesystem(url)
    with fs.open(path, "wb") as f:
        f.write(data)
    if upstream_url:
        buf = io.BytesIO()
        torch.save({"mean": mean.to(torch.float32).clone(), "var": var.to(torch.float32).clone()}, buf)
        fs, path = storage.filesystem(upstream_url)
        with fs.open(path, "wb") as f:
            f.write(buf.getvalue())


def load_stats(url: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mean, var) from our safetensors file or an upstream .pt; a missing key comes back as None."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        data = f.read()
    if data[:1] != b"P" and data[:2] != b"\x80\x02":  # not a zip/pickle -> safetensors
        from safetensors.torch import load

        obj = load(data)
    else:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not ({"mean", "var"} & set(obj)):
        raise ValueError(f"{url}: expected a stats file with 'mean' and/or 'var', found {type(obj).__name__}")
    return obj.get("mean"), obj.get("var")
