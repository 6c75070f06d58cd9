"""Weighted mixtures of prepared shard folders (``data.sources``), with a position that resumes exactly.

* MDS sources: one StreamingDataset with a ``Stream(proportion=w / sum w)`` per source. Streaming
  draws each epoch's composition and order from (seed, epoch) and the canonical node count, so the
  mixture keeps the properties of a single MDS folder: deterministic, resumable from (epoch,
  sample_in_epoch), and elastic (another world size with the same global batch gives the same global
  batches). See :class:`rae_scale.data.loader.ShardLoader`.
* webdataset sources: :class:`WdsMixture`. Each rank mixes its own slice of every source. Draw k of
  rank r picks a source from a golden-ratio Weyl sequence started at a hash of (seed, rank): a
  function of (seed, rank, k) alone, and stratified, so any window of n draws holds each source's
  share to within O(log n / n) (a batch is a near-exact mix, not a lottery). A source's samples come
  in passes: pass p is the source's shards permuted by (seed, source, p), each shard's samples
  permuted too, cut into equal contiguous slices per rank (wds.WdsSource.rank_positions). An
  exhausted source starts pass p + 1, a new order, not a replay. The position (per source: pass,
  offset, shard, sample in shard; the draw counter; counts) is the checkpointed state, so a
  resumed run on the same world size continues with exactly the samples it would have read.

Unlike RAEv2's mixer (one source per step, drawn with random.choices; an exhausted child replays
its order; no position), every batch here mixes the sources and a preempted run continues exactly.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from rae_scale import storage
from rae_scale.seeding import GOLDEN, MASK64, HashStream, mix

from . import schema

logger = logging.getLogger(__name__)

__all__ = ["SourceSpec", "resolve_sources", "build_mixture_loader", "WdsMixture", "weyl_choices"]

_STATE_VERSION = 1
_SHARD_CACHE_BYTES = 256 << 20  # per source: decoded tar members kept between passes (small shards stay)
_BLOCK = 1024  # source choices computed per block of draws


@dataclass(frozen=True)
class SourceSpec:
    name: str
    url: str
    weight: float
    format: str
    kind: str = "images"


def resolve_sources(data) -> list[SourceSpec]:
    """``data.sources`` as specs, or ``data.url`` (with ``data.format``) as a one-source mixture."""
    sources = list(getattr(data, "sources", None) or [])
    if sources and data.url:
        raise ValueError("data.url and data.sources are both set; data.url is the one-source shorthand of "
                         "data.sources: keep one of them")
    if not sources:
        if not data.url:
            raise ValueError("data.url and data.sources are empty: point data.url (or data.sources[].url) at "
                             "shards made by `rae-scale prepare`")
        return [SourceSpec(_default_name(data.url), data.url, 1.0, data.format, "images")]
    return [SourceSpec(s.name or _default_name(s.url), s.url, float(s.weight), s.format, s.kind) for s in sources]


def _default_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1] or url


def check_sources(specs: list[SourceSpec]) -> None:
    """One-line errors naming the source: a missing folder, the wrong index for its format, mixed
    formats, or resolutions that differ (the images of one batch are stacked)."""
    if not specs:
        raise ValueError("a mixture needs at least one source")
    formats = {s.format for s in specs}
    if len(formats) > 1:
        raise ValueError("data.sources mixes mds and wds sources; a mixture reads one format (convert the "
                         "webdataset sources with `rae-scale prepare format=mds`)")
    index = {"mds": schema.MDS_INDEX, "wds": schema.WDS_INDEX}
    resolutions = {}
    for i, s in enumerate(specs):
        where = f"data source {i} ({s.name!r}, {s.url})"
        fs, path = storage.filesystem(s.url)
        if not fs.exists(path):
            raise FileNotFoundError(f"{where} does not exist; make it with `rae-scale prepare`")
        if not schema.exists(storage.join(s.url, index[s.format])):
            raise FileNotFoundError(f"{where} holds no {index[s.format]} for format {s.format!r} "
                                    f"(prepared shards of format {s.format} are needed)")
        if schema.exists(storage.join(s.url, schema.MANIFEST)):
            resolutions[s.name] = schema.read_json(storage.join(s.url, schema.MANIFEST)).get("resolution")
    if len(set(resolutions.values())) > 1:
        raise ValueError(f"data sources were prepared at different resolutions {resolutions}; a batch stacks "
                         "images of one size: prepare every source at the same resolution")


def weyl_choices(seed: int, rank: int, draws, cum_weights: np.ndarray) -> np.ndarray:
    """The source of each draw index: u_k = frac(h(seed, rank) + k / golden ratio), in 64-bit fixed point."""
    start = np.uint64(mix(mix(int(seed)) ^ (int(rank) + 1)) << 1 & MASK64)
    k = np.asarray(draws, dtype=np.uint64)
    with np.errstate(over="ignore"):
        u = ((start + k * np.uint64(GOLDEN)) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.searchsorted(cum_weights, u, side="right")


def _cumulative(weights) -> np.ndarray:
    """The inner boundaries of the weights' partition of [0, 1): draw u falls in source searchsorted(u)."""
    w = np.asarray(weights, dtype=np.float64)
    return np.cumsum(w / w.sum())[:-1]


# ----------------------------------------------------------------------------- webdataset mixer


class _Cursor:
    """One webdataset source as seen by one rank: an endless sequence of passes over its slice."""

    def __init__(self, spec: SourceSpec, index: int, id_offset: int, *, seed: int, rank: int, world_size: int,
                 cache_dir: str | None):
        from .wds import WdsSource

        self.spec, self.id_offset = spec, int(id_offset)
        # the pass order is drawn from default_rng([source seed, pass]): keyed by (seed, source, pass)
        self.reader = WdsSource(spec.url, decode=None, batch_size=1, rank=rank, world_size=world_size,
                                seed=mix(mix(int(seed)) ^ mix(index + 1)), shuffle=True, num_workers=0,
                                drop_last=False, cache_dir=cache_dir)
        self.pass_, self.offset = 0, 0
        self._order: tuple[int, list] | None = None
        self._shards: dict[int, tuple[list, int]] = {}  # shard -> (samples, bytes), oldest first

    @property
    def num_samples(self) -> int:
        return self.reader.num_samples

    def _positions(self) -> list:
        if self._order is None or self._order[0] != self.pass_:
            self._order = (self.pass_, self.reader.rank_positions(self.pass_))
        return self._order[1]

    def __getstate__(self):  # a worker process starts without the parent's shard cache
        return {**self.__dict__, "_order": None, "_shards": {}}

    def where(self) -> tuple[int, int]:
        """(shard, sample in shard) of the next sample."""
        positions = self._positions()
        if self.offset >= len(positions):
            self.pass_, self.offset = self.pass_ + 1, 0
            positions = self._positions()
        return positions[self.offset]

    def take(self) -> tuple[dict, int, int]:
        """The next raw sample, its mixture-wide id and its pass; advances."""
        shard, local = self.where()
        pass_ = self.pass_
        self.offset += 1
        return self._load(shard)[local], self.id_offset + int(self.reader.offsets[shard]) + int(local), pass_

    def _load(self, shard: int) -> list:
        """A shard's samples; the most recently used shards stay in memory up to _SHARD_CACHE_BYTES."""
        if shard in self._shards:
            self._shards[shard] = self._shards.pop(shard)  # most recent last
            return self._shards[shard][0]
        samples = self.reader.load_shard(shard)
        size = sum(len(v) for smp in samples for v in smp.values() if isinstance(v, bytes))
        while self._shards and sum(b for _, b in self._shards.values()) + size > _SHARD_CACHE_BYTES:
            self._shards.pop(next(iter(self._shards)))
        self._shards[shard] = (samples, size)
        return samples

    def state(self) -> dict:
        shard, local = self.where()
        return {"name": self.spec.name, "pass": self.pass_, "offset": self.offset, "shard": int(shard),
                "sample_in_shard": int(local)}

    def load_state(self, state: dict) -> None:
        self.pass_, self.offset = int(state["pass"]), int(state["offset"])
        if self.where() != (int(state["shard"]), int(state["sample_in_shard"])):
            raise ValueError(f"data source {self.spec.name!r} ({self.spec.url}) changed since the checkpoint: its "
                             f"position pass {self.pass_} offset {self.offset} no longer points at shard "
                             f"{state['shard']} sample {state['sample_in_shard']}")


class WdsMixture:
    """A rank's batches of a weighted webdataset mixture; ShardLoader's interface (len, iter, state).

    ``batches_per_epoch`` sets the epoch (a virtual one: the stream itself never ends); by default
    the sources' total samples over the global batch. Yields (images, labels[, ids][, captions]):
    captions (a list of str, "" where a sample has none) when ``with_captions``. With
    ``num_workers`` > 0 one background process reads and decodes the same batches (the order is
    sequential: a skipped sample moves every later draw), sending its state with each batch.
    """

    format = "wds-mixture"

    def __init__(self, specs: list[SourceSpec], *, batch_size: int, rank: int, world_size: int, seed: int,
                 hflip: bool, batches_per_epoch: int | None = None, cache_dir: str | None = None,
                 with_ids: bool = False, num_workers: int = 0, flip_stream: HashStream = HashStream.IMAGE_FLIP,
                 with_captions: bool = False):
        self.specs, self.kind = list(specs), "images"
        self.flip_stream, self.with_captions = flip_stream, bool(with_captions)
        self.num_workers = min(1, int(num_workers))
        self._latest: dict | None = None  # the worker's state after the last batch handed out
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.hflip, self.with_ids = int(seed), bool(hflip), bool(with_ids)
        self.cursors, offset = [], 0
        for i, spec in enumerate(self.specs):
            cur = _Cursor(spec, i, offset, seed=seed, rank=rank, world_size=world_size, cache_dir=cache_dir)
            self.cursors.append(cur)
            offset += cur.num_samples
        self.cum = _cumulative([s.weight for s in self.specs])
        total = sum(c.num_samples for c in self.cursors)
        self._batches = int(batches_per_epoch or max(1, total // (self.batch_size * self.world_size)))
        self.epoch, self.batch_in_epoch, self.draws = 0, 0, 0
        self.source_counts = np.zeros(len(self.specs), dtype=np.int64)
        self.skipped = [dict() for _ in self.specs]  # per source: reason -> count
        self._choices: tuple[int, np.ndarray] | None = None  # (first draw, sources of a block of draws)

    def _choose(self, k: int) -> int:
        """The source of draw k (weyl_choices, computed a block at a time)."""
        if self._choices is None or not 0 <= k - self._choices[0] < _BLOCK:
            first = k - k % _BLOCK
            self._choices = (first, weyl_choices(self.seed, self.rank, np.arange(first, first + _BLOCK), self.cum))
        return int(self._choices[1][k - self._choices[0]])

    def __len__(self) -> int:
        return self._batches

    @property
    def num_samples(self) -> int:
        return sum(c.num_samples for c in self.cursors)

    @property
    def mixture(self) -> dict:
        return {"names": [s.name for s in self.specs], "weights": [s.weight for s in self.specs]}

    def state_dict(self) -> dict:
        if self._latest is not None:
            return copy.deepcopy(self._latest)
        return {"version": _STATE_VERSION, "format": self.format, "kind": self.kind, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
                "mixture": self.mixture, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "draws": self.draws, "sources": [c.state() for c in self.cursors],
                "source_counts": self.source_counts.tolist(), "skipped": [dict(s) for s in self.skipped]}

    def load_state_dict(self, state: dict) -> None:
        self._latest = None
        if state.get("format") != self.format:
            raise ValueError(f"loader state is for a {state.get('format')} loader, this one reads {self.format}")
        for key in ("seed", "world_size", "rank", "batch_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"webdataset mixture state was saved with {key}={state[key]} but this run has "
                                 f"{getattr(self, key)}; its exact resume needs the same seed, world size and "
                                 "per-rank batch (MDS sources resume on another world size)")
        if state["mixture"] != self.mixture:
            raise ValueError(f"loader state was saved for the mixture {state['mixture']}, this loader reads "
                             f"{self.mixture}; changed sources or weights give another sample order")
        for cur, s in zip(self.cursors, state["sources"]):
            cur.load_state(s)
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.draws = int(state["draws"])
        self.source_counts = np.asarray(state["source_counts"], dtype=np.int64)
        self.skipped = [dict(s) for s in state["skipped"]]

    def _sync(self) -> None:
        """Move the cursors to where the worker stopped."""
        if self._latest is not None:
            self.load_state_dict(self._latest)

    def __iter__(self):
        self._sync()
        if self.num_workers:
            yield from self._iter_worker()
            return
        epoch = self.epoch
        while self.batch_in_epoch < self._batches:
            x, y, ids, captions = self._next_batch()
            self.batch_in_epoch += 1
            yield self._output(x, y, ids, captions)
        self.epoch, self.batch_in_epoch = epoch + 1, 0

    def _output(self, x, y, ids, captions) -> tuple:
        return ((x, y, ids) if self.with_ids else (x, y)) + ((captions,) if self.with_captions else ())

    def _iter_worker(self):
        epoch = self.epoch
        loader = DataLoader(_InWorker(self), batch_size=None, num_workers=1, prefetch_factor=4)
        for x, y, ids, captions, state in loader:
            self._latest = state
            self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
            self.source_counts = np.asarray(state["source_counts"], dtype=np.int64)
            yield self._output(x, y, ids, captions)
        self._sync()
        self.epoch, self.batch_in_epoch = epoch + 1, 0

    def _next_batch(self):
        """The next batch: (images [B,3,H,W] in [0, 1], labels, ids, captions)."""
        from .loader import decode_image_sample, sample_caption, uint8_to_unit_float
        from .transforms import hash_uniform
        from .wds import decode_wds_image

        images, labels, ids, passes, captions = [], [], [], [], []
        while len(images) < self.batch_size:
            s = self._choose(self.draws)
            self.draws += 1
            raw, sample_id, pass_ = self.cursors[s].take()
            try:
                sample = decode_wds_image(raw)
                img, label, _ = decode_image_sample(sample, sample_id)
            except Exception as exc:  # noqa: BLE001 - any broken sample is counted and skipped
                self._skip(s, raw, exc)
                continue
            images.append(img)
            labels.append(label)
            ids.append(sample_id)
            passes.append(pass_)
            captions.append(sample_caption(sample))
            self.source_counts[s] += 1
        flips = np.zeros(len(ids), dtype=bool)
        if self.hflip:  # keyed by (seed, the source's pass, sample id): a sample met again may flip otherwise
            ids_a, passes_a = np.asarray(ids), np.asarray(passes)
            for p in np.unique(passes_a):
                at = passes_a == p
                flips[at] = hash_uniform(self.seed, int(p), ids_a[at], stream=self.flip_stream) < 0.5
        return (uint8_to_unit_float(torch.stack(images), flips.tolist()), torch.tensor(labels, dtype=torch.long),
                torch.tensor(ids, dtype=torch.long), captions)

    def _skip(self, s: int, raw: dict, exc: Exception) -> None:
        reason = "no_image" if isinstance(exc, (ValueError, KeyError)) and "none of" in str(exc) else "undecodable"
        counts = self.skipped[s]
        counts[reason] = counts.get(reason, 0) + 1
        if sum(counts.values()) == 1:
            logger.warning("data source %r: skipping sample %s (%s: %s); skipped samples are counted in the "
                           "loader state", self.specs[s].name, raw.get("__key__"), reason, exc)


class _InWorker(IterableDataset):
    """The mixture's batches of the current epoch in a DataLoader worker, each with the state after it."""

    def __init__(self, mixture: WdsMixture):
        self.mixture = mixture

    def __iter__(self):
        m = self.mixture  # the worker's own copy
        m.num_workers = 0
        while m.batch_in_epoch < m._batches:
            x, y, ids, captions = m._next_batch()
            m.batch_in_epoch += 1
            yield x, y, ids, captions, m.state_dict()


# ----------------------------------------------------------------------------- the builder


def build_mixture_loader(specs: list[SourceSpec], *, batch_size: int, rank: int = 0, world_size: int = 1,
                         seed: int = 0, hflip: bool = True, num_workers: int = 0, cache_dir: str | None = None,
                         num_canonical_nodes: int | None = None, batches_per_epoch: int | None = None,
                         with_ids: bool = False, flip_stream: HashStream = HashStream.IMAGE_FLIP,
                         with_captions: bool = False):
    """Loader of (images, labels[, ids][, captions]) over a weighted mixture of image shard folders.

    ``batches_per_epoch`` (per rank) makes epochs virtual: for MDS it sets streaming's epoch size
    (batches x batch x ranks samples, drawn with the weights); for webdataset it only sets where
    the epoch counter turns. Default: the sources' total samples per epoch. ``flip_stream``: the
    draw that flips an image (see ShardLoader). ``with_captions``: batches also carry the samples'
    captions; MDS sources without a caption column are refused, naming the source.
    """
    from .loader import ShardLoader, _check, _with_captions_checked, decode_image_sample

    _check(batch_size, rank, world_size, seed, num_workers)
    check_sources(specs)
    if specs[0].format == "wds":
        if num_workers > 1:
            logger.info("a webdataset mixture reads in one worker process (num_workers=%d asked)", num_workers)
        return WdsMixture(specs, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, hflip=hflip,
                          batches_per_epoch=batches_per_epoch, cache_dir=cache_dir, with_ids=with_ids,
                          num_workers=num_workers, flip_stream=flip_stream, with_captions=with_captions)
    from .mds import MDSSource

    decode = decode_image_sample
    if with_captions:
        for s in specs:
            decode = _with_captions_checked(s.url, "mds", decode_image_sample)
    total = sum(s.weight for s in specs)
    epoch_size = batches_per_epoch * batch_size * world_size if batches_per_epoch else None
    source = MDSSource(None, decode=decode, batch_size=batch_size, rank=rank, world_size=world_size,
                       seed=seed, shuffle=True, num_workers=num_workers, drop_last=True, cache_dir=cache_dir,
                       num_canonical_nodes=num_canonical_nodes, streams=[(s.url, s.weight / total) for s in specs],
                       epoch_size=epoch_size)
    mixture = {"names": [s.name for s in specs], "weights": [s.weight for s in specs]}
    return ShardLoader(source, kind="images", format="mds", seed=seed, hflip=hflip, batch_size=batch_size,
                       world_size=world_size, with_ids=with_ids, mixture=mixture, flip_stream=flip_stream)


def source_shares(loader) -> dict[str, float]:
    """{source name: share of this rank's samples so far}; empty for a loader of one plain folder."""
    return shares_of(getattr(loader, "mixture", None), getattr(loader, "source_counts", None))


def shares_of(mixture: dict | None, counts) -> dict[str, float]:
    """{source name: share} from a mixture's names and its per-source sample counts (a loader's, or those
    in its state_dict); empty without a mixture."""
    if not mixture or counts is None or len(counts) == 0:
        return {}
    total = max(1, int(np.sum(counts)))
    return {name: float(c) / total for name, c in zip(mixture["names"], counts)}
