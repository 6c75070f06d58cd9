"""MDS shards read through mosaicml-streaming, positioned explicitly for exact resume.

Streaming's own counters (its epoch number and the resume block in shared memory) are overwritten
before every pass with the wrapper's (epoch, sample_in_epoch), so the position in a checkpoint is
the only state that matters. Batches come back as (payload, labels, sample ids); the ids drive the
per-sample random flip in the main process.

Iteration takes streaming's work partition (which sample ids this rank's worker gets, in which
order, for the epoch and resume point) but reads and decodes a whole batch at a time in the worker,
instead of streaming's per-sample loop with two helper threads and shared-memory hand-offs; the
batches are the ones StreamingDataset + DataLoader(batch_size) would form (see
``DecodedStreamingDataset.__iter__``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader

from rae_scale import storage
from rae_scale.config import ConfigError

from . import schema
from .streaming_import import import_streaming

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


def _remote_local(url: str, cache_dir: str | None) -> tuple[str | None, str]:
    """streaming's (remote, local) pair for a folder: a local path as it is, a URL cached locally."""
    if storage.is_remote(url):
        return url, (os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:16]) if cache_dir
                     else default_cache_dir(url))
    if cache_dir:
        logger.info("cache_dir is ignored for a local MDS folder %s", url)
    return None, storage.filesystem(url)[1]


def make_dataset(url: str | None, *, decode, batch_size: int, seed: int, shuffle: bool,
                 num_canonical_nodes: int | None, cache_dir: str | None, drop_last: bool = True,
                 streams: list[tuple[str, float]] | None = None, epoch_size: int | None = None):
    """A StreamingDataset over a local folder, or a remote URL cached under ``cache_dir``.

    ``streams`` [(url, proportion)] instead of ``url`` mixes several folders with streaming's
    ``Stream(proportion=...)``; ``epoch_size`` (samples, all ranks) sets the epoch's length (virtual
    epochs: streaming draws that many samples per epoch, in proportion when mixing).
    Iterating it yields whole batches of ``batch_size`` (see ``DecodedStreamingDataset``); indexing
    it (``ds[i]``) gives one decoded sample.
    """
    kwargs = {}
    if streams:
        Stream = import_streaming().Stream

        for u, _ in streams:
            read_index(u)
        kwargs["streams"] = [Stream(**dict(zip(("remote", "local"), _remote_local(u, cache_dir))), proportion=w)
                             for u, w in streams]
    else:
        read_index(url)  # refuses unsafe columns with one line naming the shard, before streaming starts
        if storage.is_remote(url):
            kwargs["remote"], kwargs["local"] = url, cache_dir or default_cache_dir(url)
        else:
            kwargs["remote"], kwargs["local"] = _remote_local(url, cache_dir)
    if epoch_size:
        kwargs["epoch_size"] = int(epoch_size)
    ds = _dataset_class()(batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
                          num_canonical_nodes=num_canonical_nodes, partition_algo="relaxed",
                          shuffle_algo="py1e", **kwargs)
    ds.decode = decode
    ds.drop_last = bool(drop_last)
    return ds


_CLASS = None


def _dataset_class():
    """StreamingDataset subclass that decodes samples; built lazily (importing streaming is slow)."""
    global _CLASS
    if _CLASS is None:
        StreamingDataset = import_streaming().StreamingDataset

        class DecodedStreamingDataset(StreamingDataset):
            """Yields this worker's batches of the epoch, each read and decoded in one go.

            ``decode(raw sample, sample id) -> (payload, label, sample id)``; ``drop_last`` as in
            DataLoader. The batches equal what StreamingDataset.__iter__ followed by
            DataLoader(batch_size, drop_last) would give in this worker: the same sample ids (from
            streaming's own ``_get_work``, so the order, the resume point and the split over ranks
            and workers are streaming's), padding ids (-1) skipped, cut into runs of ``batch_size``,
            a short last run dropped with ``drop_last``. DataLoader then interleaves the workers'
            batches round-robin exactly as it would interleave their auto-collated ones.
            """
            decode = None
            drop_last = True
            # optional (epoch, sample ids) -> the columns to read of each sample (None: all of them), so
            # a reader that needs one of several large columns (one flip variant of a latent) reads only it
            select = None

            def get_item(self, sample_id: int, retry: int = 7):
                return self.decode(super().get_item(sample_id, retry), sample_id)

            def __iter__(self):
                # The preamble of StreamingDataset.__iter__: worker topology, resume point and the
                # epoch counter in shared memory, then this worker's sample ids.
                self._unique_worker_world = self._unique_rank_world.detect_workers()
                self._parallel_worker_world = self._parallel_rank_world.detect_workers()
                epoch, sample_in_epoch = self._resume_incr_epoch()
                ids = self._get_work(epoch, sample_in_epoch)
                ids = ids[ids != -1]
                size = int(self.batch_size)
                stop = len(ids) - len(ids) % size if self.drop_last else len(ids)
                batches = [ids[i:i + size] for i in range(0, stop, size)]
                # With a cache limit shards may be evicted and fetched again between two reads:
                # keep streaming's checked per-sample path there.
                read = None if self.cache_limit else _MappedShards(self)
                for batch, shard_ids in _with_shards_ready(self, batches):
                    if read is None:
                        samples = [self.get_item(int(i)) for i in batch]
                    else:
                        columns = self.select(epoch, batch) if self.select is not None else [None] * len(batch)
                        samples = [self.decode(read(int(i), int(s), c), int(i))
                                   for i, s, c in zip(batch, shard_ids, columns)]
                    yield collate(samples)

        DecodedStreamingDataset.__module__ = __name__
        _CLASS = DecodedStreamingDataset
    return _CLASS


class _MappedShards:
    """Raw samples of local MDS shards, each shard file memory-mapped once per pass.

    Streaming's reader opens the shard file and seeks three times for every sample; here a sample
    is a slice of the mapped file between two entries of its offset table (an MDS shard is
    ``uint32 count, uint32 offsets[count + 1], samples``), decoded by the shard's own reader.
    Falls back to ``get_item`` for non-MDS shards or a raw file that is not there.
    """

    def __init__(self, ds):
        import_streaming()
        from streaming.base.format.mds.reader import MDSReader

        self.ds, self.reader_type, self.maps = ds, MDSReader, {}

    def __call__(self, sample_id: int, shard_id: int, columns=None):
        """The raw sample as a dict; with `columns`, only those columns are sliced from the mapped file
        (when every column has a fixed size), so only their pages are read."""
        shard = self.ds.shards[shard_id]
        mapped = self.maps.get(shard_id)
        if mapped is None and isinstance(shard, self.reader_type):
            path = os.path.join(shard.dirname, shard.split, shard.raw_data.basename)
            try:
                mapped = self.maps[shard_id] = np.memmap(path, dtype=np.uint8, mode="r")
            except FileNotFoundError:
                mapped = None
        if mapped is None:
            return super(type(self.ds), self.ds).get_item(sample_id)
        at = 4 * (1 + sample_id - int(self.ds.sample_offset_per_shard[shard_id]))
        begin, end = mapped[at:at + 8].view(np.uint32).tolist()
        if columns is None or not all(shard.column_sizes):
            return shard.decode_sample(mapped[begin:end].tobytes())
        import_streaming()
        from streaming.base.format.mds.encodings import mds_decode

        sample, offset = {}, begin
        for name, encoding, size in zip(shard.column_names, shard.column_encodings, shard.column_sizes):
            if name in columns:
                sample[name] = mds_decode(encoding, mapped[offset:offset + size].tobytes())
            offset += size
        return sample


def _with_shards_ready(ds, batches):
    """Yield (batch, shard id of each sample) once the batch's shards are local.

    This replaces streaming's per-sample download and ready threads: each shard is prepared
    (downloaded and/or unpacked; a cheap check when it is already local) once, in a thread, in the
    order the batches first need it, up to ``ds.predownload`` samples ahead of the batch being
    read. ``get_item`` still re-fetches a shard that went missing in between (cache eviction).
    """
    if not batches:
        return
    first_ids = np.asarray(ds.sample_offset_per_shard)
    shard_ids = [np.searchsorted(first_ids, b, side="right") - 1 for b in batches]
    needed = [list(dict.fromkeys(s.tolist())) for s in shard_ids]
    ahead = max(1, -(-int(ds.predownload or 0) // max(1, len(batches[0]))))
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mds-prepare")
    pending = {}

    def request(k):
        for shard_id in needed[k] if k < len(batches) else ():
            if shard_id not in pending:
                pending[shard_id] = pool.submit(ds.prepare_shard, shard_id)

    try:
        for k in range(ahead):
            request(k)
        for k, batch in enumerate(batches):
            request(k + ahead)
            for shard_id in needed[k]:
                pending[shard_id].result()
            yield batch, shard_ids[k]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def __getattr__(name):  # lets pickle find the lazily built class in spawned workers
    if name == "DecodedStreamingDataset":
        return _dataset_class()
    raise AttributeError(name)


class MDSSource:
    """Yields (payload batch, labels, sample ids) from a given (epoch, sample_in_epoch)."""

    def __init__(self, url: str | None, *, decode, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool, num_workers: int, drop_last: bool, cache_dir: str | None,
                 num_canonical_nodes: int | None, streams: list[tuple[str, float]] | None = None,
                 epoch_size: int | None = None):
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
                                    cache_dir=cache_dir, drop_last=drop_last, streams=streams,
                                    epoch_size=epoch_size)
        self._loader = None  # DataLoader kept across epochs (persistent worker processes)

    @property
    def num_samples(self) -> int:
        return int(self.dataset.num_samples)

    def stream_of(self, sample_ids) -> np.ndarray:
        """Which stream (mixture source) each sample id belongs to."""
        first = np.asarray(self.dataset.sample_offset_per_stream)
        return np.searchsorted(first, np.asarray(sample_ids, dtype=np.int64), side="right") - 1

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
        # Workers forked earlier keep attributes derived from the old setting (streaming's shuffle
        # block size is fixed on first use); start new ones.
        self._loader = None

    def iter_batches(self, epoch: int, sample_in_epoch: int):
        ds = self.dataset
        ds.next_epoch = epoch
        ds.load_state_dict({"epoch": epoch, "sample_in_epoch": sample_in_epoch,
                            "num_canonical_nodes": self.num_canonical_nodes, "shuffle_seed": self.seed,
                            "initial_physical_nodes": self.initial_physical_nodes})
        yield from self._data_loader()

    def _data_loader(self) -> DataLoader:
        """One DataLoader for all epochs; the dataset yields whole batches (no auto-batching).

        Its worker processes persist across epochs: the position written above goes through
        streaming's shared memory (resume block, epoch counter), which the workers read at the
        start of every pass, so forking and setting them up again each epoch is not needed.
        """
        if self._loader is None:
            self._loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                      collate_fn=_as_is, persistent_workers=self.num_workers > 0)
        return self._loader


def _as_is(batch):
    return batch


def collate(samples):
    """Decoded samples -> (payloads [B, ...], labels [B], ids [B]), plus the list of captions when the
    decoder returned them (loader.with_captions)."""
    payload, labels, ids, *captions = zip(*samples)
    batch = torch.stack(payload), torch.tensor(labels, dtype=torch.long), torch.tensor(ids, dtype=torch.long)
    return (*batch, list(captions[0])) if captions else batch


# --------------------------------------------------------------------------- whole-shard reading
# Pipeline workers (Ray tasks) read whole shards without StreamingDataset's shared-memory machinery,
# which allows only one dataset per local folder on a node. Without StreamingDataset there is no
# refusal of pickled columns either: check_shard_columns does it.

class UnsafeShardError(ConfigError):
    """A column whose decoding could run code (pickle) or that streaming cannot decode.

    A ConfigError so that the CLI prints its one line: the dataset named by ``input=`` is at fault.
    """


def _mds_encodings():
    """(encodings streaming decodes safely, its safety test, its known-encoding test)."""
    import_streaming()
    from streaming.base.format.mds.encodings import get_mds_encodings, is_mds_encoding, is_mds_encoding_safe

    safe = sorted(e for e in get_mds_encodings() if is_mds_encoding_safe(e))
    return safe, is_mds_encoding_safe, is_mds_encoding


def check_shard_columns(url: str, shard: dict) -> None:
    """Refuse a shard entry with a column streaming itself would not decode by default.

    Streaming refuses ``pkl`` columns (unpickling runs code) only inside StreamingDataset; the
    whole-shard reader of the Ray jobs decodes with the shard's reader directly and would run the
    pickle. So every read path of ours (``read_index``, ``shard_samples``, ``make_dataset``) checks
    here first, from the index alone, before any sample is read.
    """
    if shard.get("format", "mds") != "mds":
        return  # json / csv / tsv shards hold only strings and numbers
    basename = (shard.get("raw_data") or {}).get("basename", "?")
    names, encodings = shard.get("column_names"), shard.get("column_encodings")
    if not isinstance(names, list) or not isinstance(encodings, list) or len(names) != len(encodings):
        raise UnsafeShardError(f"{url}: shard {basename} has no matching column_names / column_encodings "
                               "lists in index.json; rebuild the dataset with streaming's MDSWriter")
    safe, is_safe, is_known = _mds_encodings()
    for name, enc in zip(names, encodings):
        enc = str(enc)
        if not is_safe(enc) or not is_safe(enc.split(":", 1)[0]):
            why = "reading it unpickles data, which can run arbitrary code"
        else:
            try:
                known = is_known(enc)
            except (KeyError, ValueError, TypeError):
                known = False
            if known:
                continue
            why = "streaming does not know that encoding"
        raise UnsafeShardError(f"{url}: column {name!r} of shard {basename} has encoding {enc!r}: {why}; "
                               f"allowed: {', '.join(safe)} (ndarray with :dtype:shape); nothing was read")


def read_index(url: str) -> list[dict]:
    """The shard entries of an MDS folder's index.json, each with its first global sample id.

    Every shard's columns are checked (``check_shard_columns``) before any sample is read.
    """
    shards = schema.read_json(storage.join(url, schema.MDS_INDEX))["shards"]
    first = 0
    for s in shards:
        check_shard_columns(url, s)
        s["first_sample"] = first
        first += int(s["samples"])
    return shards


def shard_samples(url: str, shard: dict):
    """Yield (global sample id, sample dict) of one shard, fetching it first when remote."""
    import_streaming()
    from streaming.base.format import reader_from_json

    check_shard_columns(url, shard)  # callers may pass an entry that did not come from read_index
    basename = shard["raw_data"]["basename"]
    fs, root = storage.filesystem(url)
    with tempfile.TemporaryDirectory(prefix="rae_mds_shard_") as tmp:
        if storage.is_remote(url):
            local_root = tmp
            os.makedirs(os.path.dirname(os.path.join(tmp, basename)), exist_ok=True)
            fs.get_file(f"{root.rstrip('/')}/{basename}", os.path.join(tmp, basename))
        else:
            local_root = root
        entry = {k: v for k, v in shard.items() if k != "first_sample"}
        reader = reader_from_json(local_root, None, entry)
        for i in range(int(shard["samples"])):
            yield int(shard["first_sample"]) + i, reader.get_item(i)
