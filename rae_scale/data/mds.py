"""MDS shards read through mosaicml-streaming, positioned explicitly for exact resume.

Streaming's own counters (its epoch number and the resume block in shared memory) are overwritten
before every pass with the wrapper's (epoch, sample_in_epoch), so the position in a checkpoint is
the only state that matters. Samples come back as (payload, label, sample id); the id drives the
per-sample random flip in the main process.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import torch
from torch.utils.data import DataLoader

from . import schema

logger = logging.getLogger(__name__)


def _env_world() -> tuple[int, int, int]:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank, world, local_world


def check_world(rank: int, world_size: int) -> int:
    """streaming reads RANK/WORLD_SIZE/LOCAL_WORLD_SIZE itself; they must agree with the arguments.

    Returns the number of physical nodes.
    """
    env_rank, env_world, local_world = _env_world()
    if (env_rank, env_world) != (rank, world_size):
        raise ValueError(
            f"MDS loader got rank={rank}, world_size={world_size} but the environment says "
            f"RANK={env_rank}, WORLD_SIZE={env_world}; mosaicml-streaming reads RANK, WORLD_SIZE and "
            "LOCAL_WORLD_SIZE from the environment (torchrun sets them), so they must match")
    return max(1, env_world // max(1, local_world))


def default_cache_dir(url: str) -> str:
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "rae_scale_mds_cache", digest)


def make_dataset(url: str, *, decode, batch_size: int, seed: int, shuffle: bool,
                 num_canonical_nodes: int | None, cache_dir: str | None):
    """A StreamingDataset over a local folder, or a remote URL cached under ``cache_dir``."""
    if schema.is_remote(url):
        remote, local = url, cache_dir or default_cache_dir(url)
    else:
        remote, local = None, schema.url_to_fs(url)[1]
        if cache_dir:
            logger.info("cache_dir is ignored for a local MDS folder %s", url)
    ds = _dataset_class()(remote=remote, local=local, batch_size=batch_size, shuffle=shuffle,
                          shuffle_seed=seed, num_canonical_nodes=num_canonical_nodes,
                          partition_algo="relaxed", shuffle_algo="py1e")
    ds.decode = decode
    return ds


_CLASS = None


def _dataset_class():
    """StreamingDataset subclass that decodes samples; built lazily (importing streaming is slow)."""
    global _CLASS
    if _CLASS is None:
        from streaming import StreamingDataset

        class DecodedStreamingDataset(StreamingDataset):
            decode = None

            def get_item(self, sample_id: int, retry: int = 7):
                return self.decode(super().get_item(sample_id, retry), sample_id)

        DecodedStreamingDataset.__module__ = __name__
        _CLASS = DecodedStreamingDataset
    return _CLASS


def __getattr__(name):  # lets pickle find the lazily built class in spawned workers
    if name == "DecodedStreamingDataset":
        return _dataset_class()
    raise AttributeError(name)


class MDSSource:
    """Yields (payload batch, labels, sample ids) from a given (epoch, sample_in_epoch)."""

    resumable_across_world_sizes = True

    def __init__(self, url: str, *, decode, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool, num_workers: int, drop_last: bool, cache_dir: str | None,
                 num_canonical_nodes: int | None):
        self.num_physical_nodes = check_world(rank, world_size)
        self.world_size = world_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.seed = seed
        # Pinned so that the sample order does not depend on the first run's node count.
        self.num_canonical_nodes = num_canonical_nodes or self.num_physical_nodes
        self.initial_physical_nodes = self.num_physical_nodes
        self.dataset = make_dataset(url, decode=decode, batch_size=batch_size, seed=seed,
                                    shuffle=shuffle, num_canonical_nodes=self.num_canonical_nodes,
                                    cache_dir=cache_dir)

    @property
    def num_samples(self) -> int:
        return int(self.dataset.num_samples)

    def batches_per_epoch(self) -> int:
        per_rank = len(self.dataset)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def state(self) -> dict:
        return {"num_canonical_nodes": self.num_canonical_nodes,
                "initial_physical_nodes": self.initial_physical_nodes}

    def load_state(self, state: dict) -> None:
        self.num_canonical_nodes = state["num_canonical_nodes"]
        self.initial_physical_nodes = state["initial_physical_nodes"]
        self.dataset.num_canonical_nodes = self.num_canonical_nodes

    def iter_batches(self, epoch: int, sample_in_epoch: int):
        ds = self.dataset
        ds.next_epoch = epoch
        ds.load_state_dict({"epoch": epoch, "sample_in_epoch": sample_in_epoch,
                            "num_canonical_nodes": self.num_canonical_nodes, "shuffle_seed": self.seed,
                            "initial_physical_nodes": self.initial_physical_nodes})
        loader = DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                            drop_last=self.drop_last, collate_fn=collate)
        yield from loader


def collate(samples):
    payload, labels, ids = zip(*samples)
    return torch.stack(payload), torch.tensor(labels, dtype=torch.long), torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- whole-shard reading
# Pipeline workers (Ray tasks) read whole shards without StreamingDataset's shared-memory machinery,
# which allows only one dataset per local folder on a node.

def read_index(url: str) -> list[dict]:
    """The shard entries of an MDS folder's index.json, each with its first global sample id."""
    shards = schema.read_json(schema.join(url, schema.MDS_INDEX))["shards"]
    first = 0
    for s in shards:
        s["first_sample"] = first
        first += int(s["samples"])
    return shards


def shard_samples(url: str, shard: dict):
    """Yield (global sample id, sample dict) of one shard, fetching it first when remote."""
    from streaming.base.format import reader_from_json

    basename = shard["raw_data"]["basename"]
    fs, root = schema.url_to_fs(url)
    with tempfile.TemporaryDirectory(prefix="rae_mds_shard_") as tmp:
        if schema.is_remote(url):
            local_root = tmp
            os.makedirs(os.path.dirname(os.path.join(tmp, basename)), exist_ok=True)
            fs.get_file(f"{root.rstrip('/')}/{basename}", os.path.join(tmp, basename))
        else:
            local_root = root
        entry = {k: v for k, v in shard.items() if k != "first_sample"}
        reader = reader_from_json(local_root, None, entry)
        for i in range(int(shard["samples"])):
            yield int(shard["first_sample"]) + i, reader.get_item(i)
