"""`rae-scale cache-text`: the captions of prepared MDS shards -> frozen text-encoder tokens as MDS shards.

The text-side twin of cache_latents, with the same resumable shape: one input shard is one unit of
work and becomes one output part (``part-NNNNN/``), published before its marker
``_done/part-NNNNN.json``; a re-run skips marked parts. Each Ray actor loads the text encoder once.
A row holds ``tokens`` [max_length, width] (bf16 bits as uint16, or float32), ``mask`` [max_length]
(uint8, 1 = token) and ``index`` (the sample's global id in the image shards, so latents and text
join by id). ``text.json`` beside them says which encoder, max_length, width and dtype wrote it, and
counts the empty captions (stored as the null condition: every position masked), the captions
`prepare` found missing, and the truncated ones. A cache of other settings in ``output`` is refused.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile

import numpy as np
import torch

from rae_scale import storage
from rae_scale.data import schema
from rae_scale.data.latents import tensor_to_stored
from rae_scale.data.mds import read_index, shard_samples
from rae_scale.data.streaming_import import import_streaming

from .cache_latents import _publish, encode_missing_parts

logger = logging.getLogger(__name__)

TEXT_META = "text.json"
PLAN_FILE = "text_plan.json"  # in _done/: the settings every finished part was written with
CAPTION_COLUMN = "caption"


def text_columns(max_length: int, width: int, dtype: str) -> dict[str, str]:
    """MDS columns of a text cache; bf16 is stored bit-exactly as uint16 (as latents are)."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"text cache dtype must be 'fp32' or 'bf16', got {dtype!r}")
    np_dtype = "float32" if dtype == "fp32" else "uint16"
    return {"tokens": f"ndarray:{np_dtype}:{int(max_length)},{int(width)}",
            "mask": f"ndarray:uint8:{int(max_length)}", "index": "int"}


def text_encoder_factory(pretrained: str, max_length: int):
    """Picklable zero-argument callable (for Ray actors) that loads the frozen text encoder."""
    from rae_scale.models.text import load_text_encoder

    return functools.partial(load_text_encoder, pretrained, int(max_length))


def _caption_batches(url: str, shard: dict, batch_size: int):
    """(captions, global ids) of one shard, batch by batch."""
    caps, ids = [], []
    for sid, sample in shard_samples(url, shard):
        caps.append(str(sample[CAPTION_COLUMN] or "").strip())
        ids.append(int(sid))
        if len(caps) == batch_size:
            yield caps, ids
            caps, ids = [], []
    if caps:
        yield caps, ids


class TextShardWorker:
    """Per-process state of the job: the text encoder (loaded once) and its device."""

    def __init__(self, encoder_factory, dtype: str = "bf16"):
        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # one CPU per actor: Ray schedules one actor per core
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.encoder = encoder_factory().to(self.device)

    def encode_shard(self, url: str, shard: dict, part_id: int, output: str, batch_size: int) -> dict:
        MDSWriter = import_streaming().MDSWriter

        name = f"part-{part_id:05d}"
        staging = tempfile.mkdtemp(prefix=f"rae_text_{name}_")
        enc = self.encoder
        count = empty = truncated = 0
        try:
            part_dir = os.path.join(staging, name)
            writer = None
            for captions, ids in _caption_batches(url, shard, batch_size):
                tokens, mask = enc(captions)
                truncated += enc.count_truncated(captions)
                empty += sum(not c for c in captions)
                if writer is None:
                    writer = MDSWriter(out=part_dir, columns=text_columns(enc.max_length, enc.width, self.dtype),
                                       compression=None, size_limit=256 << 20, progress_bar=False)
                mask_u8 = mask.to(torch.uint8).cpu().numpy()
                for i, sid in enumerate(ids):
                    writer.write({"tokens": tensor_to_stored(tokens[i], self.dtype),
                                  "mask": np.ascontiguousarray(mask_u8[i]), "index": sid})
                    count += 1
            if writer is not None:
                writer.finish()
                _publish(part_dir, output, name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report = {"part": part_id, "num_samples": count, "num_empty": empty, "num_truncated": truncated,
                  "width": enc.width}
        schema.write_json(storage.join(output, schema.DONE_DIR, f"{name}.json"), report)
        return report


def check_caption_column(url: str, shards: list[dict]) -> None:
    """Every shard must carry the caption column (folders prepared before captions existed do not)."""
    for s in shards:
        if CAPTION_COLUMN not in (s.get("column_names") or []):
            raise ValueError(f"cache-text: {url} has no {CAPTION_COLUMN!r} column (shard "
                             f"{s['raw_data']['basename']} holds {', '.join(s.get('column_names') or [])}); "
                             "re-run `rae-scale prepare` on captioned input (webdataset tars with .txt/.json)")


def _missing_captions(input: str) -> int | None:
    """Samples `prepare` dropped for lacking a caption (its manifest), None without a manifest."""
    url = storage.join(input, schema.MANIFEST)
    if not schema.exists(url):
        return None
    return int((schema.read_json(url).get("skipped_counts") or {}).get("no_caption", 0))


def _claim(output: str, plan: dict) -> None:
    url = storage.join(output, schema.DONE_DIR, PLAN_FILE)
    if schema.exists(url):
        old = schema.read_json(url)
        if old != plan:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {plan[k]!r}" for k in plan if old.get(k) != plan[k])
            raise ValueError(f"cache-text: {output} holds a text cache written with other settings ({diff}); "
                             "choose another output or delete it")
        return
    schema.write_json(url, plan)


def run_cache_text(*, input: str, output: str, pretrained: str, max_length: int, batch_size: int = 64,
                   dtype: str = "bf16", num_workers: int | None = None, ray_address: str | None = None) -> dict:
    """Encode the caption of every sample of the MDS dataset at ``input`` into a text cache at ``output``.

    ``num_workers``: encoder actors (default: one per GPU, else one per CPU); 0 encodes in this
    process without Ray. Returns the cache description also written to ``text.json``.
    """
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"cache-text dtype must be 'fp32' or 'bf16', got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"cache-text batch_size must be >= 1, got {batch_size}")
    if max_length < 1:
        raise ValueError(f"cache-text max_length must be >= 1, got {max_length}")
    if schema.detect_format(input) != "mds":
        raise ValueError(f"cache-text reads MDS shards; {input} is webdataset (prepare with format='mds')")
    shards = read_index(input)
    check_caption_column(input, shards)
    from rae_scale.models.text import check_available

    check_available(pretrained)  # one line here on a missing encoder, not once per actor inside Ray
    factory = text_encoder_factory(pretrained, max_length)
    _claim(output, {"model": pretrained, "max_length": int(max_length), "dtype": dtype, "source": input,
                    "num_shards": len(shards)})
    ordered = encode_missing_parts(
        output, len(shards), lambda i: ("encode_shard", (input, shards[i], i, output, batch_size)),
        TextShardWorker, (factory, dtype), "cache-text", num_workers=num_workers, ray_address=ray_address)
    width = next((r["width"] for r in ordered if r.get("width")), None)
    info = {"model": pretrained, "max_length": int(max_length), "width": width, "dtype": dtype,
            "num_samples": int(sum(r["num_samples"] for r in ordered)),
            "num_empty_captions": int(sum(r["num_empty"] for r in ordered)),
            "num_missing_captions": _missing_captions(input),
            "num_truncated": int(sum(r["num_truncated"] for r in ordered)), "source": input}
    if info["num_empty_captions"]:
        logger.warning("cache-text: %d of %d captions are empty; they are stored as the null condition (every "
                       "token masked)", info["num_empty_captions"], info["num_samples"])
    if info["num_truncated"]:
        logger.warning("cache-text: %d caption(s) longer than max_length=%d tokens were truncated",
                       info["num_truncated"], max_length)
    schema.write_json(storage.join(output, TEXT_META), info)
    return info


def read_text_sample(sample: dict, dtype: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One stored row -> (tokens float32 [L, D], mask long [L], global sample id)."""
    from rae_scale.data.latents import latent_to_tensor

    return (latent_to_tensor(np.array(sample["tokens"]), dtype), torch.from_numpy(np.array(sample["mask"])).long(),
            int(sample["index"]))
