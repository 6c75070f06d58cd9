"""`rae-scale prepare`: an image folder or webdataset tars -> ADM-center-cropped MDS or webdataset shards, with Ray.

Inputs: an ImageNet-style class-folder tree (or a flat folder plus a labels file), or a folder of
webdataset ``.tar`` files in the BLIP3o layout (``<key>.jpg|jpeg|png|webp`` plus a caption in
``<key>.txt`` or ``<key>.json``; nested split folders allowed), detected when the folder holds tars
and no images. Every output sample keeps its caption and its source name (schema.PREPARED_COLUMNS), so
one prepared mixture serves stage 1 and text-to-image. A tar sample without an image, with an
undecodable image, or without a caption is counted in the manifest and skipped.

The sorted input listing is cut into parts whose size depends only on the number of files, so the
output is the same whatever the worker count. Each Ray task writes one part (its shards, then a
marker ``_done/part-NNNNN.json`` with its counts and checksums); a re-run skips parts whose marker
exists, then merges the indexes and writes ``manifest.json`` and ``class_index.json``. Shard bytes
are deterministic (fixed tar metadata, same encoder settings), so a resumed run ends bit-identical.

A class's index is its place among all class folders (empty ones too), never among the classes
that happen to hold files; the manifest lists the classes without samples. The output may not be,
contain or sit inside the input: ``overwrite`` deletes the output first.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from rae_scale import storage
from rae_scale.config import ConfigError
from rae_scale.data import schema
from rae_scale.data.streaming_import import import_streaming
from rae_scale.data.transforms import adm_center_crop

from . import ray_utils

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class PartConfig:
    input: str
    output: str
    resolution: int
    format: str
    image_format: str
    jpeg_quality: int
    shard_size_bytes: int
    input_format: str = "folder"  # folder | wds
    source_name: str = ""  # source column; for wds input "" means each tar's folder (BLIP3o's split)
    keep_uncaptioned: bool = False  # wds input: keep a sample without caption (caption "") instead of skipping


# ----------------------------------------------------------------------------- decoding

def decode_rgb(data: bytes):
    """Bytes -> (RGB PIL image | None, conversion kind | None, skip reason | None)."""
    if not data:
        return None, None, "empty"
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError:
        return None, None, "too_large"
    except UnidentifiedImageError:
        return None, None, "not_an_image"
    except (OSError, SyntaxError, ValueError, EOFError):  # truncated or corrupt data
        return None, None, "corrupt"
    mode = img.mode
    if mode == "RGB":
        return img, None, None
    if mode == "CMYK":
        return img.convert("RGB"), "cmyk", None
    if mode in ("L", "1"):
        return img.convert("RGB"), "grayscale", None
    if mode == "P":
        kind = "palette"
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode == "RGB":
            return img, kind, None
        return _flatten_alpha(img), kind, None
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _flatten_alpha(img.convert("RGBA")), "alpha", None
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if (mode.startswith("I;16") or arr.max() > 255) else 1.0
        arr8 = np.clip(np.round(arr / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB"), "16bit", None
    try:
        return img.convert("RGB"), "other_mode", None
    except (OSError, ValueError):
        return None, None, "unsupported_mode"


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    """Composite on white, the usual convention for transparent product/icon images."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def encode_image(img: Image.Image, image_format: str, quality: int) -> bytes:
    out = io.BytesIO()
    if image_format == "jpeg":
        img.save(out, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        img.save(out, format="PNG", compress_level=6)
    return out.getvalue()


# ----------------------------------------------------------------------------- listing

def _read_labels_file(url: str) -> dict[str, str]:
    fs, path = storage.filesystem(url)
    text = fs.cat_file(path).decode("utf-8")
    if text.lstrip().startswith("{"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    labels = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").replace("\t", " ").split()
        if len(parts) != 2:
            raise ValueError(f"{url} line {lineno}: expected '<file> <label>' (space, tab or comma "
                             f"separated), got {line!r}")
        labels[parts[0]] = parts[1]
    return labels


def read_captions_file(url: str) -> dict[str, str]:
    """{relative path or bare file name: caption} from a JSON object, JSON lines ({"file", "caption"}) or
    ``<file><TAB><caption>`` lines; one-line errors for anything else."""
    fs, path = storage.filesystem(url)
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"captions_file {url!r} does not exist") from None
    if text.lstrip().startswith("{") and not text.strip().splitlines()[0].rstrip().endswith("}"):
        return {str(k): str(v).strip() for k, v in json.loads(text).items()}
    captions = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            row = json.loads(line)
            if "file" not in row or "caption" not in row:
                raise ValueError(f"{url} line {lineno}: a JSON line needs \"file\" and \"caption\", got {sorted(row)}")
            captions[str(row["file"])] = str(row["caption"]).strip()
        elif "\t" in line:
            name, caption = line.split("\t", 1)
            captions[name.strip()] = caption.strip()
        else:
            raise ValueError(f"{url} line {lineno}: expected '<file><TAB><caption>' or a JSON line "
                             f"{{\"file\": ..., \"caption\": ...}}, got {line[:80]!r}")
    return captions


def attach_captions(items: list, captions: dict[str, str]) -> tuple[list, int]:
    """Folder items (rel, class) -> (rel, class, caption) with the caption of the path (or of its bare file
    name; "" when the file has none), and the number of images without a caption."""
    out, missing = [], 0
    for rel, cls in items:
        caption = captions.get(rel, captions.get(posixpath.basename(rel), ""))
        missing += not caption
        out.append((rel, cls, caption))
    return out, missing


def list_inputs(input: str, labels_file: str | None = None):
    """Sorted [(relative path, class name)], sorted class names, and skipped [(relative path, reason)].

    Class-folder tree: every sub-folder of ``input`` is a class, files are found recursively. The
    classes are all the sub-folders, empty ones included, so a class's index is its place in the
    sorted folder list (the ImageNet / torchvision ImageFolder mapping) whatever the other folders
    hold. Hidden sub-folders (``.ipynb_checkpoints``, ``.Trash-0``) are not classes: an empty one would
    otherwise shift every label; their files are skipped as ``hidden_folder``.
    Flat folder: ``labels_file`` maps a relative path (or a bare file name) to a class name; every
    class the file names is a class, whether or not any of its files are present.
    """
    # Every file is tried whatever its extension: a wrong extension is no reason to lose an image.
    fs, root = storage.filesystem(input)
    if not fs.isdir(root):
        raise FileNotFoundError(f"input {input!r} is not a folder (expected an ImageNet-style "
                                "class-folder tree, or a flat folder plus labels_file)")
    root = root.rstrip("/")
    entries = fs.find(root, detail=True)
    files = sorted(p[len(root) + 1:] for p, info in entries.items() if info.get("type") != "directory")
    skipped: list[tuple[str, str]] = []
    if labels_file is None:
        folders = {info["name"].rstrip("/").rsplit("/", 1)[-1]
                   for info in fs.ls(root, detail=True) if info.get("type") == "directory"}
        classes = {name for name in folders if not name.startswith(".")}
        items = []
        for rel in files:
            top = rel.split("/", 1)[0] if "/" in rel else None
            if top in classes:
                items.append((rel, top))
            else:
                skipped.append((rel, "unlabeled" if top is None else "hidden_folder"))
        if not classes:
            raise ValueError(f"input {input!r} has no class sub-folders; pass labels_file for a flat folder")
        if not items:
            raise ValueError(f"input {input!r} has class sub-folders but no files in any of them")
    else:
        labels = _read_labels_file(labels_file)
        classes = set(labels.values())
        items = []
        for rel in files:
            label = labels.get(rel, labels.get(rel.rsplit("/", 1)[-1]))
            if label is None:
                skipped.append((rel, "unlabeled"))
            else:
                items.append((rel, label))
    return items, sorted(classes, key=_class_sort_key), skipped


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def detect_input_format(input: str) -> str:
    """'wds' for a folder of webdataset tars (some .tar and no image files), else 'folder'."""
    fs, root = storage.filesystem(input)
    if not fs.isdir(root):
        raise FileNotFoundError(f"input {input!r} is not a folder (expected an ImageNet-style class-folder tree, "
                                "a flat folder plus labels_file, or a folder of webdataset .tar files)")
    names = [p.lower() for p in fs.find(root)]
    has_tar = any(n.endswith(".tar") for n in names)
    return "wds" if has_tar and not any(n.endswith(_IMAGE_SUFFIXES) for n in names) else "folder"


def list_tar_inputs(input: str) -> list[tuple[str, None]]:
    """Sorted [(relative .tar path, None)] under ``input`` (BLIP3o: ``<split>/*.tar``), hidden folders left out."""
    fs, root = storage.filesystem(input)
    root = root.rstrip("/")
    tars = sorted(p[len(root) + 1:] for p in fs.find(root) if p.endswith(".tar"))
    tars = [t for t in tars if not any(part.startswith(".") for part in t.split("/"))]
    if not tars:
        raise ValueError(f"input {input!r} holds no .tar files; webdataset input is a folder of tar shards")
    return [(t, None) for t in tars]


def _class_sort_key(name: str):
    # Integer labels from a labels file keep numeric order; synset names sort as strings.
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def files_per_part(num_files: int) -> int:
    """Part size from the dataset size alone (never the worker count): ~64+ parts, 16..1024 files."""
    return int(min(1024, max(16, math.ceil(num_files / 64))))


# ----------------------------------------------------------------------------- one part

def _part_name(part_id: int) -> str:
    return f"part-{part_id:05d}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _TarShards:
    """Deterministic webdataset tar writer (fixed mtime/owner) with a size limit per shard."""

    def __init__(self, folder: str, prefix: str, size_limit: int):
        self.folder, self.prefix, self.size_limit = folder, prefix, size_limit
        self.shards: list[tuple[str, int]] = []  # (file name, samples)
        self._tar = None
        self._bytes = 0

    def _open(self):
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(os.path.join(self.folder, name), "w", format=tarfile.USTAR_FORMAT)
        self.shards.append((name, 0))
        self._bytes = 0

    def _add(self, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        self._tar.addfile(info, io.BytesIO(data))
        self._bytes += 512 + ((len(data) + 511) // 512) * 512

    def write(self, key: str, ext: str, image: bytes, label: int, rel: str, caption: str = "", source: str = ""):
        if self._tar is None or self._bytes >= self.size_limit:
            self.close()
            self._open()
        self._add(f"{key}.{ext}", image)
        self._add(f"{key}.cls", str(label).encode())
        self._add(f"{key}.txt", caption.encode("utf-8"))
        self._add(f"{key}.json", json.dumps({"key": rel, "source": source}, sort_keys=True).encode("utf-8"))
        name, n = self.shards[-1]
        self.shards[-1] = (name, n + 1)

    def close(self):
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def _read_bytes(fs, path: str):
    try:
        return fs.cat_file(path), None
    except (OSError, IOError) as exc:  # missing target, permission, I/O error
        logger.debug("cannot read %s: %s", path, exc)
        return None, "unreadable"


_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_CAPTION_FIELDS = ("caption", "text", "prompt", "txt")


def tar_caption(sample: dict) -> str | None:
    """A webdataset sample's caption: ``txt`` (UTF-8, stripped), else the first text field of ``json``."""
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace").strip()
        if text:
            return text
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        if isinstance(meta, dict):
            for name in _CAPTION_FIELDS:
                if isinstance(meta.get(name), str) and meta[name].strip():
                    return meta[name].strip()
    return None


def _tar_source_items(in_fs, in_root: str, rel_tar: str, cfg: PartConfig, skipped: list):
    """(key, image bytes | None, label, caption, source) of each sample of one input tar; a sample
    without caption is recorded in ``skipped`` here (unless kept), one without image by the caller."""
    from rae_scale.data.wds import read_tar_samples

    folder = rel_tar.rsplit("/", 1)[0] if "/" in rel_tar else ""
    source = cfg.source_name or folder or posixpath.basename(in_root)
    try:
        with in_fs.open(f"{in_root}/{rel_tar}", "rb") as f:
            samples = read_tar_samples(f)
    except (OSError, tarfile.TarError, EOFError) as exc:
        logger.warning("cannot read tar %s: %s", rel_tar, exc)
        skipped.append({"path": rel_tar, "reason": "unreadable_tar"})
        return
    for sample in samples:
        key = f"{rel_tar}/{sample['__key__']}"
        image = next((sample[e] for e in _TAR_IMAGE_EXTS if e in sample), None)
        caption = tar_caption(sample)
        if image is not None and caption is None and not cfg.keep_uncaptioned:
            skipped.append({"path": key, "reason": "no_caption"})
            continue
        try:
            label = int(sample["cls"].decode().strip()) if "cls" in sample else schema.NO_LABEL
        except ValueError:
            label = schema.NO_LABEL
        yield key, image, label, caption or "", source


def process_part(part_id: int, items: list, first_index: int, class_ids: dict, cfg: PartConfig) -> dict:
    """Write one part (Ray task body, also callable in-process); returns its report.

    Folder input: items are (relative file, class name[, caption]). wds input: items are (relative tar, None),
    and the part's output keys are ``<part>_<n>`` (the sample count of a tar is known only once read).
    """
    MDSWriter = import_streaming().MDSWriter

    in_fs, in_root = storage.filesystem(cfg.input)
    in_root = in_root.rstrip("/")
    name = _part_name(part_id)
    ext = "jpg" if cfg.image_format == "jpeg" else "png"
    skipped, converted, per_class, per_source = [], Counter(), Counter(), Counter()
    captioned = 0
    staging = tempfile.mkdtemp(prefix=f"rae_prepare_{name}_")
    try:
        part_dir = os.path.join(staging, name)
        if cfg.format == "mds":
            writer = MDSWriter(out=part_dir, columns=schema.PREPARED_COLUMNS, compression=None,
                               size_limit=cfg.shard_size_bytes, progress_bar=False)
        else:
            os.makedirs(part_dir)
            writer = _TarShards(part_dir, name, cfg.shard_size_bytes)
        written = 0
        for offset, (rel, data, reason, label, caption, source, group) in enumerate(
                _part_inputs(in_fs, in_root, items, class_ids, cfg, skipped)):
            img = kind = None
            if reason is None:
                img, kind, reason = decode_rgb(data)
            if reason is not None:
                skipped.append({"path": rel, "reason": reason})
                continue
            if kind:
                converted[kind] += 1
            if min(img.size) < cfg.resolution:
                converted["upsampled"] += 1
            crop = adm_center_crop(img, cfg.resolution)
            payload = encode_image(crop, cfg.image_format, cfg.jpeg_quality)
            if cfg.format == "mds":
                writer.write({"image": payload, "label": label, "key": rel, "caption": caption, "source": source})
            else:
                key = f"{first_index + offset:09d}" if cfg.input_format == "folder" else f"{part_id:05d}_{written:08d}"
                writer.write(key, ext, payload, label, rel, caption, source)
            written += 1
            per_class[group] += 1
            per_source[source] += 1
            captioned += bool(caption)
        if cfg.format == "mds":
            writer.finish()
        else:
            writer.close()
        shards = []
        for fname in sorted(os.listdir(part_dir)):
            fpath = os.path.join(part_dir, fname)
            shards.append({"path": f"{name}/{fname}" if cfg.format == "mds" else fname,
                           "sha256": _sha256(fpath), "bytes": os.path.getsize(fpath)})
        if cfg.format == "wds":
            counts = dict(writer.shards)
            for s in shards:
                s["samples"] = counts[s["path"]]
        _publish(part_dir, cfg, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = {"part": part_id, "num_samples": int(sum(per_class.values())), "per_class": dict(per_class),
              "per_source": dict(per_source), "num_captioned": captioned,
              "skipped": skipped, "converted": dict(converted), "shards": shards}
    schema.write_json(storage.join(cfg.output, schema.DONE_DIR, f"{name}.json"), report)
    return report


def _part_inputs(in_fs, in_root: str, items: list, class_ids: dict, cfg: PartConfig, skipped: list):
    """(relative name, bytes | None, skip reason | None, label, caption, source, class group) of each
    input sample; the class group is the class folder, or the label's text for tars."""
    if cfg.input_format == "folder":
        source = cfg.source_name or posixpath.basename(in_root)
        for rel, cls, *caption in items:  # (rel, class[, caption from the captions file])
            data, reason = _read_bytes(in_fs, f"{in_root}/{rel}")
            yield rel, data, reason, class_ids[cls], caption[0] if caption else "", source, cls
        return
    for rel_tar, _ in items:
        for key, image, label, caption, source in _tar_source_items(in_fs, in_root, rel_tar, cfg, skipped):
            yield key, image, None if image is not None else "no_image", label, caption, source, str(label)


def _publish(part_dir: str, cfg: PartConfig, name: str) -> None:
    """Move a finished part into the output (a rename locally, uploads to object storage)."""
    if storage.is_remote(cfg.output):
        fs, root = storage.filesystem(cfg.output)
        dest = f"{root.rstrip('/')}/{name}" if cfg.format == "mds" else root.rstrip("/")
        for fname in sorted(os.listdir(part_dir)):
            fs.put_file(os.path.join(part_dir, fname), f"{dest}/{fname}")
        return
    root = storage.filesystem(cfg.output)[1]
    if cfg.format == "mds":
        dest = os.path.join(root, name)
        shutil.rmtree(dest, ignore_errors=True)  # leftovers of a crashed attempt
        shutil.move(part_dir, dest)
    else:
        for fname in sorted(os.listdir(part_dir)):
            shutil.move(os.path.join(part_dir, fname), os.path.join(root, fname))


# ----------------------------------------------------------------------------- the job

def _merge_mds_index(output: str, reports: list[dict]) -> None:
    shards = []
    for rep in reports:
        name = _part_name(rep["part"])
        sub = schema.read_json(storage.join(output, name, schema.MDS_INDEX))
        for shard in sub["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = f"{name}/{shard[key]['basename']}"
            shards.append(shard)
    schema.write_json(storage.join(output, schema.MDS_INDEX), {"version": 2, "shards": shards})


def _validate(resolution, format, image_format, jpeg_quality, shard_size_bytes):
    if format not in schema.FORMATS:
        raise ValueError(f"format must be one of {schema.FORMATS}, got {format!r}")
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if int(resolution) < 8:
        raise ValueError(f"resolution must be at least 8, got {resolution}")
    if int(shard_size_bytes) < 1 << 16:
        raise ValueError(f"shard_size_bytes must be at least 65536, got {shard_size_bytes}")


_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "adl": "az"}


def _location(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, absolute path) of a folder: local paths with symlinks and '..' resolved,
    URLs with the scheme's aliases folded, the bucket lower-cased and the path normalised."""
    if not storage.is_remote(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        return "file", "", os.path.realpath(os.path.expanduser(path))
    scheme, rest = url.split("://", 1)
    bucket, _, path = rest.partition("/")
    scheme = scheme.lower()
    return _SCHEME_ALIASES.get(scheme, scheme), bucket.lower(), posixpath.normpath("/" + path.lstrip("/"))


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_output_apart(input: str, output: str, labels_file: str | None = None,
                       overwrite: bool = False) -> None:
    """Refuse an output that is, contains or sits inside the input folder.

    With overwrite the output is deleted first, and with it the images; without, shards written
    into the input would be listed as images (or unlabeled files) by the next run. A labels file
    inside the output would be deleted by overwrite too. Checked before anything is read or deleted.
    """
    (s_in, b_in, p_in), (s_out, b_out, p_out) = _location(input), _location(output)
    if (s_in, b_in) == (s_out, b_out):
        relation = ("is the input folder" if p_in == p_out else
                    "contains the input folder" if _within(p_in, p_out) else
                    "is inside the input folder" if _within(p_out, p_in) else None)
        if relation:
            raise ConfigError(f"prepare output {output!r} {relation} {input!r}; choose an output folder "
                              "outside the input and not above it (overwrite=true deletes the output first)")
    if overwrite and labels_file:
        s_lab, b_lab, p_lab = _location(labels_file)
        if (s_lab, b_lab) == (s_out, b_out) and _within(p_lab, p_out):
            raise ConfigError(f"labels_file {labels_file!r} is inside prepare output {output!r}, which "
                              "overwrite=true deletes; keep the labels file outside the output folder")


def run_prepare(*, input: str, output: str, resolution: int = 256, format: str = "mds",
                image_format: str = "jpeg", jpeg_quality: int = 95, labels_file: str | None = None,
                shard_size_bytes: int = 64 << 20, num_workers: int | None = None,
                ray_address: str | None = None, overwrite: bool = False, input_format: str = "auto",
                source_name: str | None = None, keep_uncaptioned: bool = False,
                captions_file: str | None = None) -> dict:
    """Build the shard dataset at ``output`` from the images under ``input``; returns the manifest.

    ``input_format``: folder (class folders / labels file), wds (webdataset tars, one part per tar)
    or auto (wds when the folder holds tars and no images). ``source_name`` fills the ``source``
    column (default: the input folder's name; for tars in sub-folders, each tar's folder).
    ``captions_file`` (folder input): each image's caption (read_captions_file); images it does not
    name keep the caption "" and are counted in the manifest (``num_missing_captions``).
    ``num_workers`` caps the number of concurrently running tasks (default: every CPU of the
    cluster); 0 runs every part in this process without Ray (debugging, small tests).
    """
    _validate(resolution, format, image_format, jpeg_quality, shard_size_bytes)
    check_output_apart(input, output, labels_file, overwrite)
    if input_format not in ("auto", "folder", "wds"):
        raise ValueError(f"input_format must be 'auto', 'folder' or 'wds', got {input_format!r}")
    if input_format == "auto":
        input_format = "folder" if labels_file else detect_input_format(input)
    if input_format == "wds":
        if labels_file:
            raise ValueError("labels_file applies to image folders; webdataset input takes labels from <key>.cls")
        items, classes, listing_skipped = list_tar_inputs(input), [], []
    else:
        items, classes, listing_skipped = list_inputs(input, labels_file)
    missing_captions = None
    if captions_file:
        if input_format == "wds":
            raise ValueError("captions_file applies to image folders; webdataset input takes captions from "
                             "<key>.txt or <key>.json")
        items, missing_captions = attach_captions(items, read_captions_file(captions_file))
    class_ids = {c: (int(c) if c.isdigit() and labels_file else i) for i, c in enumerate(classes)}
    cfg = PartConfig(input, output, int(resolution), format, image_format, int(jpeg_quality),
                     int(shard_size_bytes), input_format, source_name or "", bool(keep_uncaptioned))
    per_part = files_per_part(len(items)) if input_format == "folder" else 1
    parts = [items[i:i + per_part] for i in range(0, len(items), per_part)]
    listing_hash = hashlib.sha256(json.dumps([items, class_ids]).encode()).hexdigest()
    plan = {"config": asdict(cfg), "files_per_part": per_part, "num_parts": len(parts),
            "listing_sha256": listing_hash}

    out_fs, out_root = storage.filesystem(output)
    plan_url = storage.join(output, schema.DONE_DIR, PLAN_FILE)
    if overwrite and out_fs.exists(out_root):
        out_fs.rm(out_root, recursive=True)
    if schema.exists(plan_url):
        if schema.read_json(plan_url) != plan:
            raise ValueError(f"output {output!r} holds a run with a different input listing or settings; "
                             "pass overwrite=True to replace it, or choose another output")
    out_fs.makedirs(out_root, exist_ok=True)
    schema.write_json(plan_url, plan)

    done = _finished_parts(output)
    todo = [p for p in range(len(parts)) if p not in done]
    empty = sorted(set(classes) - {item[1] for item in items}, key=_class_sort_key)
    logger.info("prepare: %d %s in %d classes (%d of them without files), %d parts (%d already done)",
                len(items), "files" if input_format == "folder" else "tars", len(classes), len(empty), len(parts),
                len(done))
    reports = dict(done)
    if todo:
        reports.update(_run_parts(parts, todo, class_ids, cfg, num_workers, ray_address))
    ordered = [reports[p] for p in range(len(parts))]
    if format == "mds":
        _merge_mds_index(output, ordered)
    else:
        schema.write_json(storage.join(output, schema.WDS_INDEX), {
            "shards": [{"url": s["path"], "samples": s["samples"]} for r in ordered for s in r["shards"]],
            "num_samples": sum(r["num_samples"] for r in ordered)})
    schema.write_json(storage.join(output, schema.CLASS_INDEX), class_ids)
    manifest = _manifest(ordered, classes, listing_skipped, cfg, per_part)
    if missing_captions is not None:
        manifest.update(captions_file=captions_file, num_missing_captions=int(missing_captions))
        if missing_captions:
            logger.warning("prepare: %d of %d images have no caption in %s (kept, caption \"\")", missing_captions,
                           len(items), captions_file)
    schema.write_json(storage.join(output, schema.MANIFEST), manifest)
    if manifest["empty_classes"]:
        logger.warning("prepare: %d of %d classes have no samples (their labels are kept, so the other "
                       "classes keep their indices): %s", len(manifest["empty_classes"]), len(classes),
                       ", ".join(manifest["empty_classes"]))
    return manifest


def _finished_parts(output: str) -> dict[int, dict]:
    fs, root = storage.filesystem(storage.join(output, schema.DONE_DIR))
    if not fs.exists(root):
        return {}
    found = {}
    for path in fs.ls(root, detail=False):
        base = path.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith("part-") and base.endswith(".json"):
            rep = schema.read_json(storage.join(output, schema.DONE_DIR, base))
            found[int(rep["part"])] = rep
    return found


def _run_parts(parts, todo, class_ids, cfg, num_workers, ray_address) -> dict[int, dict]:
    starts = _starts([len(p) for p in parts])
    if num_workers == 0:  # in this process, without Ray: for debugging and small unit tests
        return {p: process_part(p, parts[p], starts[p], class_ids, cfg) for p in todo}
    with ray_utils.ray_session(ray_address, num_cpus=num_workers) as ray:
        task = ray.remote(num_cpus=1, max_retries=2)(process_part)
        limit = num_workers or ray_utils.cluster_cpus()
        class_ref = ray.put(class_ids)
        results, pending, queue = {}, [], list(todo)

        def submit():
            p = queue.pop(0)
            pending.append(task.remote(p, parts[p], starts[p], class_ref, cfg))

        bar = ray_utils.progress(len(todo), "prepare")
        while queue and len(pending) < 2 * limit:  # keep every CPU busy, bound the queue
            submit()
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            rep = ray.get(ready[0])
            results[rep["part"]] = rep
            bar.update(1)
            if queue:
                submit()
        bar.close()
    return results


def _starts(sizes: list[int]) -> list[int]:
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += n
    return starts


def _manifest(reports, classes, listing_skipped, cfg: PartConfig, per_part: int) -> dict:
    per_class, per_source = Counter(), Counter()
    converted = Counter()
    skipped = [{"path": rel, "reason": reason} for rel, reason in listing_skipped]
    shards = []
    for rep in reports:
        per_class.update(rep["per_class"])
        per_source.update(rep.get("per_source", {}))
        converted.update(rep["converted"])
        skipped.extend(rep["skipped"])
        shards.extend(rep["shards"])
    return {
        "num_samples": int(sum(per_class.values())),
        "input_format": cfg.input_format,
        "counts_per_source": dict(sorted(per_source.items())),
        "num_captioned": int(sum(r.get("num_captioned", 0) for r in reports)),
        "num_classes": len(classes),
        "counts_per_class": {c: int(per_class.get(c, 0)) for c in classes},
        # classes with no sample (an empty folder, every file unreadable): they keep their index
        "empty_classes": [c for c in classes if not per_class.get(c)],
        "num_skipped": len(skipped),
        "skipped": skipped,
        "skipped_counts": dict(Counter(s["reason"] for s in skipped)),
        "converted_counts": dict(converted),
        "shards": shards,
        "format": cfg.format,
        "image_format": cfg.image_format,
        "jpeg_quality": cfg.jpeg_quality if cfg.image_format == "jpeg" else None,
        "resolution": cfg.resolution,
        "files_per_part": per_part,
        "num_parts": len(reports),
        "class_index": schema.CLASS_INDEX,
    }
