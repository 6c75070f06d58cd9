"""webdataset tar shards with a deterministic, resumable order.

Order of one epoch: the shards are permuted with (seed, epoch), the samples of each shard with
(seed, epoch, shard); the concatenation is the epoch's global stream. Rank r reads the r-th of
world_size equal contiguous slices of that stream (the remainder is dropped so every rank yields the
same number of samples), so a rank touches only about 1/world_size of the shards. The position is
a sample count within the rank's slice, so resume is exact for the same world size; a different
world size changes the slices and is refused. Each shard is read whole (shards are tens of MB).
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rae_scale import storage

from . import schema
from .mds import collate

logger = logging.getLogger(__name__)

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def read_tar_samples(fileobj) -> list[dict]:
    """Group tar members by key (the name before the first dot); returns samples in tar order."""
    samples: dict[str, dict] = {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            samples.setdefault(key, {"__key__": key})[ext.lower()] = tar.extractfile(member).read()
    return list(samples.values())


def decode_wds_image(sample: dict):
    """{"image": bytes, "label": int, "caption": str} (the MDS column layout) from a webdataset sample
    (caption "" where the sample has no ``.txt``)."""
    for ext in _IMAGE_EXTS:
        if ext in sample:
            caption = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else ""
            return {"image": sample[ext], "label": int(sample["cls"]), "caption": caption}
    raise ValueError(f"webdataset sample {sample.get('__key__')} has none of {_IMAGE_EXTS}")


class _RankStream(IterableDataset):
    """One rank's slice of an epoch, as collated batches; DataLoader worker w makes batches w, w+n, ..."""

    def __init__(self, source: "WdsSource", epoch: int, start: int, decode):
        self.source, self.epoch, self.start, self.decode = source, epoch, start, decode

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        src = self.source
        positions = src.rank_positions(self.epoch)[self.start:]
        b = src.batch_size
        nb = len(positions) // b if src.drop_last else -(-len(positions) // b)
        mine = [positions[j * b:(j + 1) * b] for j in range(wid, nb, nw)]
        cache: tuple[int, list] | None = None
        for batch_pos in mine:
            out = []
            for shard, local in batch_pos:
                if cache is None or cache[0] != shard:
                    cache = (shard, src.load_shard(shard))
                sample_id = int(src.offsets[shard] + local)
                out.append(self.decode(decode_wds_image(cache[1][local]), sample_id))
            yield collate(out)


class WdsSource:
    """Yields (payload batch, labels, sample ids) of webdataset tar shards from a given (epoch, sample_in_epoch)."""

    def __init__(self, url: str, *, decode, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool, num_workers: int, drop_last: bool, cache_dir: str | None):
        index = schema.read_json(storage.join(url, schema.WDS_INDEX))
        self.url, self.decode = url, decode
        self.shards = [s["url"] for s in index["shards"]]
        self.counts = np.array([int(s["samples"]) for s in index["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.num_workers, self.drop_last = seed, shuffle, num_workers, drop_last
        self.cache_dir = cache_dir
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if self.num_samples // world_size == 0:
            raise ValueError(f"{url}: {self.num_samples} samples cannot be split over {world_size} ranks")

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def per_rank(self) -> int:
        return self.num_samples // self.world_size

    def batches_per_epoch(self) -> int:
        n = self.per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def rank_positions(self, epoch: int) -> list[tuple[int, int]]:
        """(shard, index in shard) for every sample of this rank's slice of the epoch."""
        order = []
        rng = np.random.default_rng([self.seed, epoch])
        shard_order = rng.permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))
        n = self.per_rank()
        lo, hi = self.rank * n, (self.rank + 1) * n
        pos = 0
        for s in shard_order:
            c = int(self.counts[s])
            if pos + c > lo and pos < hi:
                local = (np.random.default_rng([self.seed, epoch, int(s)]).permutation(c)
                         if self.shuffle else np.arange(c))
                a, b = max(lo - pos, 0), min(hi - pos, c)
                order.extend((int(s), int(i)) for i in local[a:b])
            pos += c
            if pos >= hi:
                break
        return order

    def load_shard(self, shard: int) -> list[dict]:
        url = storage.join(self.url, self.shards[shard])
        if self.cache_dir and storage.is_remote(url):
            local = os.path.join(self.cache_dir, self.shards[shard])
            if not os.path.exists(local):
                fs, path = storage.filesystem(url)
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get_file(path, local + ".part")
                shutil.move(local + ".part", local)
            with open(local, "rb") as f:
                return read_tar_samples(f)
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            return read_tar_samples(io.BufferedReader(f) if not hasattr(f, "peek") else f)

    def state(self) -> dict:
        return {"world_size": self.world_size}

    def load_state(self, state: dict) -> None:
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise ValueError(
                f"webdataset position was saved with world_size={state['world_size']} but this run has "
                f"{self.world_size}; webdataset resume needs the same world size (use MDS shards with a "
                "fixed num_canonical_nodes to change it)")

    def iter_batches(self, epoch: int, sample_in_epoch: int):
        start = sample_in_epoch // self.world_size
        stream = _RankStream(self, epoch, start, self.decode)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers)
        yield from loader

