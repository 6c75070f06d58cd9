"""On-disk layout of rae_scale shard datasets, and their small JSON files (URLs through rae_scale.storage).

A prepared image dataset is a folder (local path or URL) holding:

* MDS: ``index.json`` (merged from the per-part indexes) and ``part-NNNNN/shard.*.mds``; columns
  ``image`` (encoded JPEG/PNG bytes), ``label`` (int; -1 for a source without classes), ``key``
  (source path relative to the input), ``caption`` (text, "" when the input had none) and ``source``
  (the name of the input source, so a mixture prepared into one folder keeps its parts apart).
  Folders written before captions existed lack the last two columns; readers treat them as "".
* webdataset: ``part-NNNNN-SSSSSS.tar`` with members ``<key>.jpg|png``, ``<key>.cls``, ``<key>.txt``
  (the caption, BLIP3o's convention) and ``<key>.json`` ({"key", "source"}), listed with their
  sample counts in ``wds_index.json``.
* both: ``manifest.json`` (counts, classes without samples, skipped files, checksums) and
  ``class_index.json`` (synset -> id: the index in the sorted list of class folders, empty ones included).

A latent cache is an MDS folder with columns ``latent`` (and ``latent_flip``), ``label``, ``index``
plus ``latents.json`` describing dtype, shape and whether both flips were cached.
"""
from __future__ import annotations

import json
import os
from typing import Any

from rae_scale.storage import filesystem, is_remote, join

MDS_INDEX = "index.json"
WDS_INDEX = "wds_index.json"
MANIFEST = "manifest.json"
CLASS_INDEX = "class_index.json"
LATENT_META = "latents.json"
DONE_DIR = "_done"  # per-part completion markers: a part counts only once its marker exists

IMAGE_COLUMNS = {"image": "bytes", "label": "int", "key": "str"}  # what every image reader needs
CAPTION_COLUMN = "caption"
CAPTION_COLUMNS = {CAPTION_COLUMN: "str", "source": "str"}
PREPARED_COLUMNS = {**IMAGE_COLUMNS, **CAPTION_COLUMNS}  # what `prepare` writes
NO_LABEL = -1  # label of a sample whose source has no classes (captioned web images)
FORMATS = ("mds", "wds")


def latent_columns(shape, dtype: str, both_flips: bool, captions: bool = False) -> dict[str, str]:
    """MDS columns of a latent cache; bf16 is stored bit-exactly as uint16; the images' captions with
    `captions`."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"latent dtype must be 'fp32' or 'bf16', got {dtype!r}")
    np_dtype = "float32" if dtype == "fp32" else "uint16"
    spec = f"ndarray:{np_dtype}:{','.join(str(int(s)) for s in shape)}"
    cols = {"latent": spec, "label": "int", "index": "int"}
    if both_flips:
        cols["latent_flip"] = spec
    if captions:
        cols[CAPTION_COLUMN] = "str"
    return cols


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    """Write JSON; on local disks via a temp file + rename so readers never see half a file."""
    fs, path = filesystem(url)
    data = json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")
    if not is_remote(url):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open(path, "wb") as f:  # object stores publish a PUT atomically
        f.write(data)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def detect_format(url: str) -> str:
    """'mds' or 'wds' from the index file present in a dataset folder."""
    if exists(join(url, MDS_INDEX)):
        return "mds"
    if exists(join(url, WDS_INDEX)):
        return "wds"
    raise FileNotFoundError(f"{url} holds neither {MDS_INDEX} (MDS) nor {WDS_INDEX} (webdataset); "
                            "build it with `rae-scale prepare`")
