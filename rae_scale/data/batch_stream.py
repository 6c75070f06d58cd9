"""The micro-batches one rank trains on: an endless stream over epochs whose position is checkpointed."""
from __future__ import annotations

from rae_scale.data.loader import build_image_loader, build_latent_loader
from rae_scale.seeding import HashStream


class BatchStream:
    """An endless stream of micro-batches over epochs, with the loader's exact position as its state.

    Each batch is a dict: "image" or "latent", "label" and "index" (the samples' dataset ids, which
    seed the per-sample randomness of the loops), and "caption" (a list of str) when captions are read.
    """

    def __init__(self, loader, key: str):
        self.loader = loader
        self.key = key
        self._it = None

    @classmethod
    def for_latents(cls, data, *, micro_batch: int, rank: int, world_size: int, seed: int,
                    with_captions: bool = False, latent_shape: tuple[int, int, int] | None = None,
                    virtual_epoch_steps: int | None = None, accum_steps: int = 1) -> "BatchStream":
        """Cached encoder latents (stage 2) from the `data` config section (with their captions), in epochs
        of the cache or virtual ones of `virtual_epoch_steps` steps; a cache whose latents are not of
        latent_shape is refused."""
        if getattr(data, "sources", None):
            raise ValueError("data.sources mixes image shards, which stage 2 reads with online encoding "
                             "(data.source=images); a mixture of latent caches is not implemented: set data.sources "
                             "to [] and data.latents_url to one cache, or set data.source=images")
        if not data.latents_url:
            raise ValueError("data.latents_url is empty: stage 2 trains on cached latents; make them with "
                             "`rae-scale cache-latents --input <image shards> --output <url>` and set "
                             "data.latents_url to that url")
        loader = build_latent_loader(data.latents_url, batch_size=micro_batch, rank=rank, world_size=world_size,
                                     seed=seed, hflip=data.hflip, num_workers=data.num_workers,
                                     cache_dir=data.cache_dir, num_canonical_nodes=data.num_canonical_nodes,
                                     with_ids=True, with_captions=with_captions, latent_shape=latent_shape,
                                     batches_per_epoch=_micro_batches(virtual_epoch_steps, accum_steps))
        return cls(loader, "latent")

    @classmethod
    def for_images(cls, data, *, micro_batch: int, rank: int, world_size: int, seed: int,
                   virtual_epoch_steps: int | None = None, accum_steps: int = 1,
                   flip_like_latent_cache: bool = False, with_captions: bool = False) -> "BatchStream":
        """Prepared image shards (stage 1; stage 2's online encoding) from the `data` config section:
        `data.url`, or the weighted mixture `data.sources` (also used for one folder with virtual epochs of
        `virtual_epoch_steps`). flip_like_latent_cache: flip a sample exactly when a latent cache with
        both flips would hand out its flipped variant (stage 2's online encoding; of one MDS folder, the
        same samples as its cache). with_captions: batches also hold "caption", the samples' captions
        (text-to-image)."""
        flip_stream = HashStream.LATENT_FLIP if flip_like_latent_cache else HashStream.IMAGE_FLIP
        if getattr(data, "sources", None) or virtual_epoch_steps:
            from rae_scale.data.mixture import build_mixture_loader, resolve_sources

            loader = build_mixture_loader(
                resolve_sources(data), batch_size=micro_batch, rank=rank, world_size=world_size, seed=seed,
                hflip=data.hflip, num_workers=data.num_workers, cache_dir=data.cache_dir,
                num_canonical_nodes=data.num_canonical_nodes, with_ids=True,
                batches_per_epoch=_micro_batches(virtual_epoch_steps, accum_steps),
                flip_stream=flip_stream, with_captions=with_captions)
            return cls(loader, "image")
        if not data.url:
            raise ValueError("data.url is empty: point it at shards made by `rae-scale prepare`")
        loader = build_image_loader(data.url, batch_size=micro_batch, rank=rank, world_size=world_size, seed=seed,
                                    hflip=data.hflip, num_workers=data.num_workers, cache_dir=data.cache_dir,
                                    format=data.format, num_canonical_nodes=data.num_canonical_nodes,
                                    with_ids=True, flip_stream=flip_stream, with_captions=with_captions)
        return cls(loader, "image")

    @property
    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def next_batch(self) -> dict:
        for _ in range(2):  # a fresh iterator once at an epoch boundary
            if self._it is None:
                self._it = iter(self.loader)
            try:
                x, y, ids, *captions = next(self._it)
                batch = {self.key: x, "label": y, "index": ids}
                if captions:
                    batch["caption"] = captions[0]
                return batch
            except StopIteration:
                self._it = None
        raise RuntimeError("the data loader yields no batch: the dataset is smaller than one global batch "
                           "(lower training.global_batch_size or add data)")

    def source_shares(self) -> dict[str, float]:
        """Realised share of each mixture source among this rank's samples so far ({} for one folder)."""
        from rae_scale.data.mixture import source_shares

        return source_shares(self.loader)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def _micro_batches(virtual_epoch_steps: int | None, accum_steps: int) -> int | None:
    """A virtual epoch's micro-batches per rank (None: epochs of the data as it is)."""
    return virtual_epoch_steps * accum_steps if virtual_epoch_steps else None
