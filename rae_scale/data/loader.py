"""Training loaders over image shards and latent caches, with exact mid-epoch resume.

``build_image_loader`` yields ``(images float32 [B,3,H,W] in [0,1], labels int64 [B])``;
``build_latent_loader`` yields ``(latents float32 [B,C,h,w], labels int64 [B])``. Both return a
:class:`ShardLoader` with ``state_dict()`` / ``load_state_dict()`` and ``len()``
(batches per rank per epoch). Iterating runs the current epoch from the saved position and then
advances the epoch, so ``for epoch: for batch in loader`` needs no extra calls.

Resume guarantee (state saved after k batches, restored into a fresh loader built with the same
url, seed, shuffle and per-rank batch size):

* MDS (mosaicml-streaming): the next batch on every rank is the one the uninterrupted run would
  have produced. The order depends on (seed, epoch, num_canonical_nodes), not on the ranks, so a
  run may resume on a different number of ranks if it keeps the global batch size (per-rank batch
  x ranks) and num_canonical_nodes (saved in the state and pinned on load): the sequence of
  global batches stays the same, split differently over the ranks.
* webdataset: exact for the same world size and per-rank batch size; each rank owns a contiguous
  slice of the epoch's shuffled stream, so another world size is refused with an error.
* Random flips (images) and the choice between cached flip variants (latents) are functions of
  (seed, epoch, sample id), so they are reproduced exactly too, whatever the number of workers.
"""
from __future__ import annotations

import functools
import io
import logging
import warnings

import numpy as np
import torch
from PIL import Image

from rae_scale import storage
from rae_scale.config import ConfigError
from rae_scale.seeding import HashStream

from . import schema
from .latents import FlipVariant, decode_latent_sample
from .transforms import flip_mask, hash_uniform

logger = logging.getLogger(__name__)

__all__ = ["ShardLoader", "build_image_loader", "build_latent_loader", "decode_image_sample"]

_STATE_VERSION = 1


def decode_image_sample(sample: dict, sample_id: int):
    """{"image": encoded bytes, "label"} -> (uint8 [3,H,W] view of an HWC array, label, sample id).

    RGB JPEGs (what ``prepare`` writes) go straight into a uint8 tensor through torchvision's
    libjpeg-turbo decoder, with no PIL image and no extra copies; libjpeg-turbo is also what Pillow
    decodes with, and the pixels are identical (checked in tests/unit/test_data_loader.py). Other
    formats (PNG), grey or CMYK JPEGs, and torchvision builds without the decoder go through Pillow.
    The batch stack makes the result contiguous.
    """
    data = sample["image"]
    decode_jpeg = _jpeg_decoder()
    if decode_jpeg is not None and data[:2] == b"\xff\xd8":
        with warnings.catch_warnings():  # its DeprecationWarning on every call (see _jpeg_decoder)
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if img.shape[0] == 3:
            return img, int(sample["label"]), sample_id
    with Image.open(io.BytesIO(data)) as img:
        arr = np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1), int(sample["label"]), sample_id


def sample_caption(sample: dict) -> str:
    """A sample's caption, stripped; "" where the shards have no caption column or the sample none
    (folders prepared before captions existed, class-folder inputs)."""
    return str(sample.get(schema.CAPTION_COLUMN) or "").strip()


def captioned(decode):
    """A sample decoder that also returns the sample's caption: (payload, label, id, caption)."""
    return functools.partial(_decode_with_caption, decode)


def _decode_with_caption(decode, sample: dict, sample_id: int):
    return (*decode(sample, sample_id), sample_caption(sample))


@functools.lru_cache(maxsize=1)
def _jpeg_decoder():
    """torchvision.io.decode_jpeg, or None where this torchvision no longer ships it.

    Deprecated since torchvision 0.29 in favour of TorchCodec (not a dependency here); the fallback
    is Pillow (same pixels, slower). The deprecation warning it raises on every call is silenced
    around the call only.
    """
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        return None
    return decode_jpeg


class ShardLoader:
    """Epoch/position bookkeeping around an MDS or webdataset source (see module docstring)."""

    def __init__(self, source, *, kind: str, format: str, seed: int, hflip: bool, batch_size: int,
                 world_size: int, with_ids: bool = False, mixture: dict | None = None,
                 flip_stream: HashStream = HashStream.IMAGE_FLIP):
        """mixture: {"names": [...], "weights": [...]} when the source mixes several folders
        (source.stream_of(ids) tells each sample's source); this rank's samples are counted per source."""
        self.with_ids = bool(with_ids)  # also yield the samples' dataset ids (they seed per-sample randomness)
        self.source, self.kind, self.format = source, kind, format
        self.seed, self.hflip = int(seed), bool(hflip)
        self.flip_stream = flip_stream  # which draw flips an image (LATENT_FLIP: as a both-flips latent cache)
        self.batch_size, self.world_size = int(batch_size), int(world_size)
        self.epoch = 0
        self._sample_in_epoch = 0  # global samples (all ranks) already handed out this epoch
        self.mixture = mixture
        self.source_counts = np.zeros(len(mixture["names"]) if mixture else 0, dtype=np.int64)

    def __len__(self) -> int:
        return self.source.batches_per_epoch()

    @property
    def num_samples(self) -> int:
        """Samples in the dataset (all ranks)."""
        return self.source.num_samples

    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "format": self.format, "kind": self.kind, "epoch": self.epoch,
                "sample_in_epoch": self._sample_in_epoch, "seed": self.seed,
                "global_batch_size": self.batch_size * self.world_size, **self.source.state(),
                **({"mixture": dict(self.mixture), "source_counts": self.source_counts.tolist()}
                   if self.mixture else {})}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != self.format or state.get("kind") != self.kind:
            raise ValueError(f"loader state is for a {state.get('format')}/{state.get('kind')} loader, "
                             f"this one reads {self.format}/{self.kind}")
        if state.get("mixture") != self.mixture:
            raise ValueError(f"loader state was saved for the mixture {state.get('mixture')}, this loader reads "
                             f"{self.mixture}; changed sources or weights give another sample order")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state was saved with seed={state['seed']}, this loader has seed="
                             f"{self.seed}; the sample order would differ")
        gbs = self.batch_size * self.world_size
        if int(state["global_batch_size"]) != gbs:
            logger.warning("resuming with global batch %d instead of %d: no sample is repeated or "
                           "skipped, but the batches differ from the original run",
                           gbs, state["global_batch_size"])
        self.source.load_state(state)
        self.epoch, self._sample_in_epoch = int(state["epoch"]), int(state["sample_in_epoch"])
        if self.mixture:
            self.source_counts = np.asarray(state["source_counts"], dtype=np.int64)

    def __iter__(self):
        epoch, start = self.epoch, self._sample_in_epoch
        step = self.world_size
        for payload, labels, ids, *captions in self.source.iter_batches(epoch, start):
            self._sample_in_epoch += len(labels) * step
            if self.mixture:
                self.source_counts += np.bincount(self.source.stream_of(ids), minlength=len(self.source_counts))
            x, y = self._finish(payload, labels, ids, epoch)
            # captions (a list of str) come last when the loader reads them (with_captions)
            yield ((x, y, torch.as_tensor(ids, dtype=torch.long)) if self.with_ids else (x, y)) + tuple(captions)
        self.epoch, self._sample_in_epoch = epoch + 1, 0

    def _finish(self, payload, labels, ids, epoch):
        if self.kind == "images":
            flip = (flip_mask(self.seed, epoch, ids.numpy(), self.flip_stream).tolist() if self.hflip
                    else [False] * len(ids))
            return uint8_to_unit_float(payload, flip), labels
        if payload.dim() == 5:  # both flip variants cached: [B, 2, C, h, w]
            if self.hflip:
                draw = hash_uniform(self.seed, epoch, ids.numpy(), stream=HashStream.LATENT_FLIP)
                pick = torch.from_numpy(draw < 0.5)
            else:
                pick = torch.zeros(len(ids), dtype=torch.bool)
            payload = payload[torch.arange(len(ids)), pick.long()]
        return payload, labels


def uint8_to_unit_float(images: torch.Tensor, flip) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float32 in [0,1] (x / 255), with images[i] mirrored where flip[i].

    One sample at a time into a preallocated batch: each sample's float data stay in the CPU cache
    between the conversion and the division, and the mirror is taken on the 4x smaller uint8
    copy. Bit-identical to ``images.float().div_(255.0)`` then flipping.
    """
    out = torch.empty(images.shape, dtype=torch.float32)
    for i, mirrored in enumerate(flip):
        out[i].copy_(images[i].flip(-1) if mirrored else images[i]).div_(255.0)
    return out


def _make_source(url, fmt, decode, *, batch_size, rank, world_size, seed, shuffle, num_workers,
                 drop_last, cache_dir, num_canonical_nodes, epoch_size=None):
    if fmt == "mds":
        from .mds import MDSSource

        return MDSSource(url, decode=decode, batch_size=batch_size, rank=rank, world_size=world_size,
                         seed=seed, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
                         cache_dir=cache_dir, num_canonical_nodes=num_canonical_nodes, epoch_size=epoch_size)
    if fmt == "wds":
        from .wds import WdsSource

        if num_canonical_nodes is not None:
            logger.info("num_canonical_nodes applies to MDS only; ignored for webdataset")
        return WdsSource(url, decode=decode, batch_size=batch_size, rank=rank, world_size=world_size,
                         seed=seed, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
                         cache_dir=cache_dir)
    raise ValueError(f"format must be 'mds', 'wds' or 'auto', got {fmt!r}")


def _check(batch_size, rank, world_size, seed, num_workers):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def build_image_loader(url: str, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                       shuffle: bool = True, hflip: bool = True, num_workers: int = 0,
                       drop_last: bool = True, cache_dir: str | None = None, format: str = "auto",
                       num_canonical_nodes: int | None = None, with_ids: bool = False,
                       flip_stream: HashStream = HashStream.IMAGE_FLIP, with_captions: bool = False) -> ShardLoader:
    """Loader of (images [B,3,H,W] float in [0,1], labels [B] int64) from prepared image shards.

    ``batch_size`` is per rank. ``cache_dir`` holds shards of a remote dataset (MDS: required
    scratch space, a temp folder by default; webdataset: optional). For MDS, pass the same
    ``num_canonical_nodes`` in every run (default: the node count of the first run). with_captions:
    each batch also carries the list of the samples' captions (last).
    """
    _check(batch_size, rank, world_size, seed, num_workers)
    fmt = schema.detect_format(url) if format == "auto" else format
    decode = _with_captions_checked(url, fmt, decode_image_sample) if with_captions else decode_image_sample
    source = _make_source(url, fmt, decode, batch_size=batch_size, rank=rank,
                          world_size=world_size, seed=seed, shuffle=shuffle, num_workers=num_workers,
                          drop_last=drop_last, cache_dir=cache_dir, num_canonical_nodes=num_canonical_nodes)
    return ShardLoader(source, kind="images", format=fmt, seed=seed, hflip=hflip, batch_size=batch_size,
                       world_size=world_size, with_ids=with_ids, flip_stream=flip_stream)


def _with_captions_checked(url: str, fmt: str, decode):
    """captioned(decode), once the shards are known to have a caption column (MDS: their index)."""
    if fmt == "mds":
        from .mds import read_index

        shards = read_index(url)
        missing = [i for i, sh in enumerate(shards) if schema.CAPTION_COLUMN not in sh.get("column_names", [])]
        if missing:
            raise ValueError(f"{url}: shard {missing[0]} (of {len(shards)}) has no '{schema.CAPTION_COLUMN}' column; "
                             "text conditioning reads captions: prepare the images with their captions "
                             "(`rae-scale prepare` of webdataset tars with .txt/.json captions, or a folder with a "
                             "captions file)")
    return captioned(decode)


def latent_cache_info(url: str) -> dict:
    """The cache's ``latents.json``: dtype, shape [C,h,w], both_flips, num_samples."""
    return schema.read_json(storage.join(url, schema.LATENT_META))


def build_latent_loader(url: str, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                        shuffle: bool = True, hflip: bool = True, num_workers: int = 0,
                        drop_last: bool = True, cache_dir: str | None = None,
                        num_canonical_nodes: int | None = None, with_ids: bool = False,
                        select_variant: bool = True, with_captions: bool = False,
                        latent_shape: tuple[int, int, int] | None = None,
                        batches_per_epoch: int | None = None) -> ShardLoader:
    """Loader of (latents [B,C,h,w] float32, labels [B] int64) from a `cache-latents` MDS folder.

    When both flips were cached, ``hflip`` picks one of the two variants per sample at random
    (deterministically from seed, epoch and sample id); otherwise the plain latent is used. With
    select_variant the reader reads only the picked variant (False reads both and picks after: the
    same values, for comparison). with_captions: each batch also carries the samples' captions (a cache
    of captioned images; latents.json "captions"). latent_shape: the [C, h, w] the model expects; a cache
    of another shape is refused before anything is read. batches_per_epoch (per rank): virtual epochs of
    that many batches (streaming's epoch_size; the cache is sampled, without repeats within an epoch
    while it is large enough); default: one pass over the cache.
    """
    _check(batch_size, rank, world_size, seed, num_workers)
    info = latent_cache_info(url)
    if latent_shape is not None and list(info["shape"]) != list(latent_shape):
        raise ConfigError(f"{url}: this cache holds latents of shape {list(info['shape'])} but the config's latent is "
                         f"{list(latent_shape)} (rae.encoder.hidden_size, input_size / patch_size); state the encoder "
                         "the cache was made with, or cache latents with this one")
    decode = functools.partial(decode_latent_sample, dtype=info["dtype"], both_flips=bool(info["both_flips"]))
    if with_captions:
        if not info.get("captions"):
            raise ValueError(f"{url}: this latent cache holds no captions (latents.json \"captions\" is not true); "
                             "text conditioning needs them: cache latents of shards prepared with captions")
        decode = captioned(decode)
    source = _make_source(url, "mds", decode, batch_size=batch_size, rank=rank, world_size=world_size,
                          seed=seed, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
                          cache_dir=cache_dir, num_canonical_nodes=num_canonical_nodes,
                          epoch_size=batches_per_epoch * batch_size * world_size if batches_per_epoch else None)
    if info["both_flips"] and select_variant:
        # read only the variant each sample needs: half the bytes of a both-flips cache
        source.dataset.select = FlipVariant(seed, hflip, extra=(schema.CAPTION_COLUMN,) if with_captions else ())
    return ShardLoader(source, kind="latents", format="mds", seed=seed, hflip=hflip, batch_size=batch_size,
                       world_size=world_size, with_ids=with_ids)
