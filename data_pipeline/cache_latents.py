"""`rae-scale cache-latents`: image MDS shards -> frozen-encoder latents as MDS shards, with Ray actors.

One input shard is one unit of work and becomes one output part (``part-NNNNN/``), published before
its marker ``_done/part-NNNNN.json``; a re-run skips marked parts. Each actor builds the encoder once
from ``encoder_factory`` (a picklable zero-argument callable) and holds a GPU when the cluster has
them. Latents are the raw encoder output (no normalisation, no noise); ``both_flips`` also stores
the latent of the horizontally flipped image.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import torch

from rae_scale import storage
from rae_scale.data import schema
from rae_scale.data.latents import tensor_to_stored
from rae_scale.data.loader import decode_image_sample, sample_caption
from rae_scale.data.mds import read_index, shard_samples
from rae_scale.data.streaming_import import import_streaming
from rae_scale.models.encoders import tokens_to_grid

from . import ray_utils

logger = logging.getLogger(__name__)


def _batches(url: str, shard: dict, batch_size: int):
    """(uint8 images [B,3,H,W], labels, global ids, captions) of one image shard."""
    buf = []
    for sid, sample in shard_samples(url, shard):
        buf.append((*decode_image_sample(sample, sid), sample_caption(sample)))
        if len(buf) == batch_size:
            yield _stack(buf)
            buf = []
    if buf:
        yield _stack(buf)


def _stack(items):
    imgs, labels, ids, captions = zip(*items)
    return torch.stack(imgs), list(labels), list(ids), list(captions)


class ShardWorker:
    """Per-process state of the pipeline: the encoder (built once) and its device."""

    def __init__(self, encoder_factory=None, dtype: str = "fp32"):
        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # one CPU per actor: Ray schedules one actor per core
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.encoder = None
        if encoder_factory is not None:
            self.encoder = encoder_factory().to(self.device).eval().requires_grad_(False)

    @torch.inference_mode()
    def encode(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = images_u8.to(self.device).float().div_(255.0)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            z = self.encoder(x)
        if z.dim() == 3 and int(z.shape[1] ** 0.5) ** 2 == z.shape[1]:  # tokens [B,N,C] on a square grid
            z = tokens_to_grid(z)
        if z.dim() != 4:
            raise ValueError(f"encoder must return latents [B,C,h,w] (or square-grid tokens [B,N,C]), "
                             f"got shape {tuple(z.shape)}")
        return z.float().cpu()

    def encode_shard(self, url: str, shard: dict, part_id: int, output: str, batch_size: int,
                     both_flips: bool, captions: bool = False) -> dict:
        MDSWriter = import_streaming().MDSWriter

        name = f"part-{part_id:05d}"
        staging = tempfile.mkdtemp(prefix=f"rae_latents_{name}_")
        writer, shape, count = None, None, 0
        try:
            part_dir = os.path.join(staging, name)
            for images, labels, ids, texts in _batches(url, shard, batch_size):
                z = self.encode(images)
                zf = self.encode(images.flip(-1)) if both_flips else None
                if writer is None:
                    shape = list(z.shape[1:])
                    writer = MDSWriter(out=part_dir, columns=schema.latent_columns(shape, self.dtype, both_flips,
                                                                                 captions),
                                       compression=None, size_limit=256 << 20, progress_bar=False)
                for i in range(len(labels)):
                    row = {"latent": tensor_to_stored(z[i], self.dtype), "label": int(labels[i]),
                           "index": int(ids[i])}
                    if both_flips:
                        row["latent_flip"] = tensor_to_stored(zf[i], self.dtype)
                    if captions:
                        row[schema.CAPTION_COLUMN] = texts[i]
                    writer.write(row)
                    count += 1
            if writer is not None:
                writer.finish()
                _publish(part_dir, output, name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report = {"part": part_id, "num_samples": count, "shape": shape}
        schema.write_json(storage.join(output, schema.DONE_DIR, f"{name}.json"), report)
        return report

    def stats_shard(self, url: str, shard: dict, kind: str, batch_size: int, both_variants: bool):
        """(count, mean, M2) in float64 over one shard, by two passes over the shard in memory."""
        from rae_scale.data.latents import latent_to_tensor

        chunks = []
        if kind == "images":
            for images, _, _, _ in _batches(url, shard, batch_size):
                chunks.append(self.encode(images))
        else:
            dtype = schema.read_json(storage.join(url, schema.LATENT_META))["dtype"]
            keys = ["latent", "latent_flip"] if both_variants else ["latent"]
            for _, sample in shard_samples(url, shard):
                for k in keys:
                    chunks.append(latent_to_tensor(sample[k], dtype)[None])
        x = torch.cat(chunks).float()  # exact: fp32 and bf16 latents are representable in fp32
        # Two passes in float64, chunked so that no float64 copy of the whole shard is made.
        mean = torch.zeros(x.shape[1:], dtype=torch.float64)
        for c in x.split(64):
            mean += c.sum(0, dtype=torch.float64)
        mean /= x.shape[0]
        m2 = torch.zeros_like(mean)
        for c in x.split(64):
            d = c.double() - mean
            m2 += (d * d).sum(0)
        return x.shape[0], mean.numpy(), m2.numpy()


def _publish(part_dir: str, output: str, name: str) -> None:
    if storage.is_remote(output):
        fs, root = storage.filesystem(output)
        for fname in sorted(os.listdir(part_dir)):
            fs.put_file(os.path.join(part_dir, fname), f"{root.rstrip('/')}/{name}/{fname}")
        return
    dest = os.path.join(storage.filesystem(output)[1], name)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.move(part_dir, dest)


def run_on_actors(ray, actors, calls, desc: str):
    """calls: list of (method name, args); returns results in call order, keeping every actor busy."""
    results, pending, queue = {}, {}, list(enumerate(calls))
    free = list(actors)
    bar = ray_utils.progress(len(calls), desc)
    while queue or pending:
        while queue and free:
            i, (method, args) = queue.pop(0)
            actor = free.pop()
            pending[getattr(actor, method).remote(*args)] = (i, actor)
        ready, _ = ray.wait(list(pending), num_returns=1)
        i, actor = pending.pop(ready[0])
        results[i] = ray.get(ready[0])
        free.append(actor)
        bar.update(1)
    bar.close()
    return [results[i] for i in range(len(calls))]


def run_calls(worker_cls, init_args: tuple, calls: list, desc: str, *, num_workers: int | None,
              ray_address: str | None = None) -> list:
    """The results of ``calls`` ((method name, args) pairs), in call order: on one ``worker_cls(*init_args)``
    in this process when num_workers is 0, else on a pool of Ray actors of it (num_workers of them; None:
    one per GPU, else one per CPU), one GPU each when the cluster has GPUs."""
    if not calls:
        return []
    if num_workers == 0:
        worker = worker_cls(*init_args)
        return [getattr(worker, method)(*args) for method, args in calls]
    with ray_utils.ray_session(ray_address) as ray:
        n = num_workers or ray_utils.cluster_gpus() or ray_utils.cluster_cpus()
        opts = {"num_gpus": 1, "num_cpus": 1} if ray_utils.cluster_gpus() else {"num_cpus": 1}
        actor_cls = ray.remote(**opts)(worker_cls)
        actors = [actor_cls.remote(*init_args) for _ in range(min(n, len(calls)))]
        return run_on_actors(ray, actors, calls, desc)


def encode_missing_parts(output: str, num_shards: int, call_for, worker_cls, init_args: tuple, desc: str, *,
                         num_workers: int | None, ray_address: str | None) -> list[dict]:
    """Encode the shards a cache at ``output`` does not hold yet (``call_for(i)``: the call for shard i;
    finished parts are kept, so an interrupted job resumes) and merge every part's index into one.
    Returns each shard's report, in shard order."""
    reports = _finished(output)
    todo = [i for i in range(num_shards) if i not in reports]
    logger.info("%s: %d shards (%d already done)", desc, num_shards, num_shards - len(todo))
    for rep in run_calls(worker_cls, init_args, [call_for(i) for i in todo], desc, num_workers=num_workers,
                         ray_address=ray_address):
        reports[rep["part"]] = rep
    ordered = [reports[i] for i in range(num_shards)]
    merge_part_indexes(output, ordered)
    return ordered


def _finished(output: str) -> dict[int, dict]:
    fs, root = storage.filesystem(storage.join(output, schema.DONE_DIR))
    if not fs.exists(root):
        return {}
    out = {}
    for path in fs.ls(root, detail=False):
        base = path.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith("part-") and base.endswith(".json"):
            rep = schema.read_json(storage.join(output, schema.DONE_DIR, base))
            out[int(rep["part"])] = rep
    return out


def merge_part_indexes(output: str, reports: list[dict]) -> None:
    """One MDS index at ``output`` over the shards of every non-empty ``part-NNNNN`` folder, in part order."""
    merged = []
    for rep in reports:
        if rep["num_samples"] == 0:
            continue
        name = f"part-{rep['part']:05d}"
        for s in schema.read_json(storage.join(output, name, schema.MDS_INDEX))["shards"]:
            s["raw_data"]["basename"] = f"{name}/{s['raw_data']['basename']}"
            merged.append(s)
    schema.write_json(storage.join(output, schema.MDS_INDEX), {"version": 2, "shards": merged})


def run_cache_latents(*, input: str, output: str, encoder_factory, batch_size: int = 64,
                      dtype: str = "fp32", both_flips: bool = False, num_workers: int | None = None,
                      ray_address: str | None = None) -> dict:
    """Encode every image of the MDS dataset at ``input`` into a latent cache at ``output``.

    ``num_workers``: number of encoder actors (default: one per GPU, else one per CPU); 0 encodes
    in this process without Ray. Returns the cache description also written to ``latents.json``.
    """
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not callable(encoder_factory):
        raise ValueError("encoder_factory must be a picklable zero-argument callable returning a module")
    if schema.detect_format(input) != "mds":
        raise ValueError(f"cache-latents reads MDS image shards; {input} is webdataset (prepare with format='mds')")
    shards = read_index(input)
    # the captions ride along (text-to-image trains on latents + captions) when every shard has them
    captions = all(schema.CAPTION_COLUMN in sh.get("column_names", []) for sh in shards)
    ordered = encode_missing_parts(
        output, len(shards), lambda i: ("encode_shard", (input, shards[i], i, output, batch_size, both_flips, captions)),
        ShardWorker, (encoder_factory, dtype), "cache-latents", num_workers=num_workers, ray_address=ray_address)
    shape = next((r["shape"] for r in ordered if r["shape"]), None)
    info = {"dtype": dtype, "shape": shape, "both_flips": bool(both_flips), "captions": captions,
            "num_samples": int(sum(r["num_samples"] for r in ordered)), "source": input}
    schema.write_json(storage.join(output, schema.LATENT_META), info)
    return info
