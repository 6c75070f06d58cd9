"""Reference statistics: ADM npz files, image folders, MDS datasets; cached by content hash.

ADM's reference npz holds `mu`, `sigma` (pool3, 2048) and `mu_s`, `sigma_s` (mixed_6 spatial,
2023) computed over a whole dataset, plus `arr_0` (uint8 NHWC images, used for precision/recall).
A sample npz holds only `arr_0` (and `arr_1` labels); its statistics are computed here.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from rae_scale.eval.feature_set import featurize_batches
from rae_scale.eval.inception import InceptionFeatures, build_inception

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_VERSION = 1  # bump when the feature pipeline changes, so old cache entries are not reused


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool_features: np.ndarray | None = None  # [N, 2048] of the reference images, for P/R
    num_images: int | None = None


@dataclass
class SpaceReference:
    """Reference moments of one non-Inception feature space, and per-image features for MIND."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    num_images: int | None = None


# ----------------------------------------------------------------------------- npz I/O


def read_reference_npz(path) -> tuple[ReferenceStats | None, bool]:
    """(stats stored in the file or None, whether the file has arr_0); arr_0 is not loaded."""
    with np.load(path) as f:
        keys = set(f.files)
        stats = None
        if "mu" in keys:
            stats = ReferenceStats(
                mu=f["mu"].astype(np.float64), sigma=f["sigma"].astype(np.float64),
                mu_s=f["mu_s"].astype(np.float64) if "mu_s" in keys else None,
                sigma_s=f["sigma_s"].astype(np.float64) if "sigma_s" in keys else None)
    if stats is None and "arr_0" not in keys:
        raise ValueError(f"{path}: neither reference statistics (mu, sigma) nor images (arr_0); keys {sorted(keys)}")
    return stats, "arr_0" in keys


def iter_npz_images(path, key: str = "arr_0", batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Stream uint8 NCHW batches from an npz member without loading it whole (ADM's reader does too)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{path}:{key} must be C-order uint8 [N, H, W, 3], got {dtype} {shape}")
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(n * per_image)
            arr = np.frombuffer(buf, dtype=np.uint8).reshape(n, *shape[1:])
            yield torch.from_numpy(arr.copy()).permute(0, 3, 1, 2)


def write_npz_from_parts(path, parts: list) -> None:
    """Stream per-unit shards (images NHWC, labels) into one ADM sample npz: arr_0 images, arr_1 labels."""
    shapes = []
    for p in parts:
        with np.load(p) as f:
            shapes.append(f["images"].shape)
    n = sum(s[0] for s in shapes)
    img_shape = (n, *shapes[0][1:])
    tmp = f"{path}.tmp"
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        for key, member, shape, dtype in (("images", "arr_0.npy", img_shape, np.uint8),
                                          ("labels", "arr_1.npy", (n,), np.int64)):
            with zf.open(member, "w", force_zip64=True) as out:
                np.lib.format.write_array_header_2_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                          "fortran_order": False, "shape": shape})
                for p in parts:
                    with np.load(p) as f:
                        out.write(np.ascontiguousarray(f[key].astype(dtype)).tobytes())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- image sources


def list_images(folder) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return files


def _decode(data_or_path) -> np.ndarray:
    from PIL import Image

    src = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else data_or_path
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


def _batch_by_shape(arrays: Iterator[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack consecutive same-sized HWC images into NCHW batches (sizes may differ across images)."""
    batch: list[np.ndarray] = []
    for a in arrays:
        if batch and (len(batch) == batch_size or a.shape != batch[0].shape):
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
        batch.append(a)
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def iter_folder_images(folder, batch_size: int = 50) -> Iterator[torch.Tensor]:
    """uint8 NCHW batches of every image under folder (sorted paths; no crop, the net resizes)."""
    return _batch_by_shape((_decode(p) for p in list_images(folder)), batch_size)


def iter_mds_images(folder, batch_size: int = 50) -> Iterator[torch.Tensor]:
    """uint8 NCHW batches from a local MDS dataset with an encoded `image` column (rae_scale schema)."""
    from rae_scale.data.streaming_import import import_streaming

    StreamingDataset = import_streaming().StreamingDataset

    ds = StreamingDataset(local=str(folder), shuffle=False, batch_size=batch_size)
    return _batch_by_shape((_decode(ds[i]["image"]) for i in range(len(ds))), batch_size)


def image_batches(source, batch_size: int = 50) -> Iterator[torch.Tensor]:
    """Batches from an image folder, an MDS folder (index.json) or an npz with arr_0."""
    source = Path(source)
    if source.is_dir():
        if (source / "index.json").exists():
            return iter_mds_images(source, batch_size)
        return iter_folder_images(source, batch_size)
    if source.suffix == ".npz":
        return iter_npz_images(source, "arr_0", batch_size)
    raise ValueError(f"{source}: expected an image folder, an MDS folder or an .npz file")


# ----------------------------------------------------------------------------- stats + cache


def content_hash(source) -> str:
    """sha256 over the bytes of a file, or over the sorted relative paths and bytes of a folder."""
    source = Path(source)
    h = hashlib.sha256()
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for p in files:
        if source.is_dir():
            h.update(str(p.relative_to(source)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _model_id(inception: InceptionFeatures) -> str:
    h = hashlib.sha1()
    for k, v in inception.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAE_SCALE_CACHE", Path.home() / ".cache" / "rae_scale")) / "fid_reference"


def compute_stats(source, *, inception: InceptionFeatures, batch_size: int = 50,
                  keep_pool_features: bool = False) -> ReferenceStats:
    """Featurise every image of source and return its statistics (no cache)."""
    fs = featurize_batches(image_batches(source, batch_size), inception, keep_pool=keep_pool_features,
                           progress=f"features {Path(source).name}")
    mu, sigma = fs.pool.stats()
    mu_s, sigma_s = fs.spatial.stats()
    pool = fs.pool_features.numpy() if fs.pool_features is not None else None
    return ReferenceStats(mu, sigma, mu_s, sigma_s, pool, fs.count)


def load_reference(source, *, inception: InceptionFeatures | None = None, batch_size: int = 50,
                   keep_pool_features: bool = False, cache_dir=None, use_cache: bool = True) -> ReferenceStats:
    """Reference statistics of an ADM npz, a sample npz, an image folder or an MDS folder.

    Stats stored in an npz (`mu` ...) are used as they are (ADM's rule); anything computed is
    cached under cache_dir, keyed by the content hash of the source and the Inception weights.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"reference {source} does not exist")
    stored, has_images = (read_reference_npz(source) if source.suffix == ".npz" else (None, True))
    if stored is not None and not (keep_pool_features and has_images):
        if keep_pool_features:
            raise ValueError(f"{source} has no arr_0 images, so precision/recall cannot be computed")
        return stored
    inception = inception or build_inception()
    cache_file = None
    if use_cache:
        key = hashlib.sha256(f"{content_hash(source)}:{_model_id(inception)}:{CACHE_VERSION}".encode()).hexdigest()
        cache_file = Path(cache_dir or default_cache_dir()) / f"{key[:32]}.npz"
        if cache_file.exists():
            with np.load(cache_file) as f:
                if not keep_pool_features or "pool_features" in f.files:
                    logger.info("reference stats of %s from cache %s", source, cache_file)
                    computed = ReferenceStats(f["mu"], f["sigma"], f["mu_s"], f["sigma_s"],
                                              f["pool_features"] if "pool_features" in f.files else None,
                                              int(f["num_images"]))
                    return _prefer_stored(stored, computed)
    computed = compute_stats(source, inception=inception, batch_size=batch_size,
                             keep_pool_features=keep_pool_features)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        extra = {"pool_features": computed.pool_features} if computed.pool_features is not None else {}
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, mu=computed.mu, sigma=computed.sigma, mu_s=computed.mu_s, sigma_s=computed.sigma_s,
                 num_images=computed.num_images, **extra)
        os.replace(tmp, cache_file)
        (cache_file.with_suffix(".json")).write_text(json.dumps({"source": str(source.resolve())}))
    return _prefer_stored(stored, computed)


def _prefer_stored(stored: ReferenceStats | None, computed: ReferenceStats) -> ReferenceStats:
    # an ADM reference npz: FID against its whole-dataset stats, P/R against its arr_0 features
    if stored is None:
        return computed
    stored.pool_features = computed.pool_features
    return stored


def _stored_space_stats(source: Path, space: str) -> SpaceReference | None:
    """`mu_<space>` / `sigma_<space>` stored in an npz (operator-supplied moments, e.g. converted from
    fd_evaluator's reference files), used as they are, like ADM's mu / sigma."""
    if source.suffix != ".npz":
        return None
    with np.load(source) as f:
        if f"mu_{space}" in f.files and f"sigma_{space}" in f.files:
            return SpaceReference(f[f"mu_{space}"].astype(np.float64), f[f"sigma_{space}"].astype(np.float64))
    return None


def _image_source_check(source: Path, space: str) -> None:
    if source.suffix == ".npz":
        with np.load(source) as f:
            if "arr_0" not in f.files:
                raise ValueError(f"feature space {space!r} needs reference images: {source} has no arr_0 and no "
                                 f"mu_{space} / sigma_{space}; give an image folder, MDS folder or npz with arr_0")


def load_space_reference(source, extractor, *, batch_size: int = 50, keep_features: bool = False,
                         cache_dir=None, use_cache: bool = True) -> SpaceReference:
    """Moments (and with keep_features the per-image features) of one feature space over the images of
    a reference (image folder, MDS folder, npz with arr_0); cached per space under cache_dir, keyed by
    the source's content hash, the space and the digest of the extractor's weights."""
    from rae_scale.eval.metrics import MomentAccumulator

    source, space = Path(source), extractor.space.name
    if not source.exists():
        raise FileNotFoundError(f"reference {source} does not exist")
    stored = _stored_space_stats(source, space)
    if stored is not None and not keep_features:
        return stored
    _image_source_check(source, space)
    cache_file = None
    if use_cache:
        key = hashlib.sha256(f"{content_hash(source)}:{space}:{extractor.digest}:{CACHE_VERSION}".encode()).hexdigest()
        cache_file = Path(cache_dir or default_cache_dir()) / f"{space}_{key[:32]}.npz"
        if cache_file.exists():
            with np.load(cache_file) as f:
                if not keep_features or "features" in f.files:
                    logger.info("%s reference stats of %s from cache %s", space, source, cache_file)
                    feats = f["features"] if "features" in f.files else None
                    cached = SpaceReference(f["mu"], f["sigma"], feats, int(f["num_images"]))
                    return _prefer_stored_space(stored, cached)
    acc, kept = MomentAccumulator(extractor.dim), []
    for images in image_batches(source, batch_size):
        feats = extractor(images)
        acc.update(feats)
        if keep_features:
            kept.append(feats.float().cpu())
    mu, sigma = acc.stats()
    computed = SpaceReference(mu, sigma, torch.cat(kept).numpy() if kept else None, acc.count)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        extra = {"features": computed.features} if computed.features is not None else {}
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, num_images=acc.count, **extra)
        os.replace(tmp, cache_file)
        cache_file.with_suffix(".json").write_text(json.dumps({"source": str(source.resolve()), "space": space,
                                                               "extractor": extractor.source}))
    return _prefer_stored_space(stored, computed)


def _prefer_stored_space(stored: SpaceReference | None, computed: SpaceReference) -> SpaceReference:
    if stored is None:
        return computed
    stored.features = computed.features
    return stored


def compare_folders(a, b, *, pr: bool = False, inception: InceptionFeatures | None = None,
                    batch_size: int = 50, cache_dir=None, use_cache: bool = True, spaces=None,
                    extractors: dict | None = None, mind: bool = False, mind_seed: int | None = None) -> dict:
    """FID and sFID (and precision/recall with pr=True) between two image folders or npz files.

    The everyday `rae-scale evaluate folders A B`: returns {"fid", "sfid", "num_a", "num_b"[,
    "precision", "recall"]}; precision is the share of B inside A's manifold. With `spaces`, also
    fd_<space>, fd_r_<space>, fd_r_mean (fd_r6 with all six) and with mind=True mind_<space>
    (A taken as the generated side, B as the reference); spaces without "inception" skip the
    Inception (no fid / sfid).
    """
    from rae_scale.eval.metrics import frechet_distance, precision_recall

    spaces = _parse_spaces(spaces)
    out, ra, rb = {}, None, None
    if not spaces or "inception" in spaces:  # spaces without inception: no Inception pass at all
        inception = inception or build_inception()
        keep_pool = pr or (mind and "inception" in spaces)
        kw = dict(inception=inception, batch_size=batch_size, keep_pool_features=keep_pool, cache_dir=cache_dir,
                  use_cache=use_cache)
        ra, rb = load_reference(a, **kw), load_reference(b, **kw)
        out["fid"] = frechet_distance(ra.mu, ra.sigma, rb.mu, rb.sigma)
        if ra.mu_s is not None and rb.mu_s is not None:
            out["sfid"] = frechet_distance(ra.mu_s, ra.sigma_s, rb.mu_s, rb.sigma_s)
        out.update(num_a=ra.num_images, num_b=rb.num_images)
        if pr:
            out["precision"], out["recall"] = precision_recall(ra.pool_features, rb.pool_features)
    elif pr:
        raise ValueError("precision/recall is computed in the inception space; add inception to the spaces")
    if spaces:
        out.update(_compare_spaces(a, b, ra, rb, spaces, extractors, mind=mind, mind_seed=mind_seed,
                                   batch_size=batch_size, cache_dir=cache_dir, use_cache=use_cache))
    return out


def _parse_spaces(spaces) -> tuple:
    if spaces is None:
        return ()
    from rae_scale.eval.spaces import parse_spaces

    return parse_spaces(spaces)


def _compare_spaces(a, b, ra: ReferenceStats | None, rb: ReferenceStats | None, spaces, extractors, *, mind,
                    mind_seed, batch_size, cache_dir, use_cache) -> dict:
    from rae_scale.eval.metrics import frechet_distance
    from rae_scale.eval.mind import MIND_SEED, mind as mind_distance
    from rae_scale.eval.spaces import build_extractors, fd_ratios

    if extractors is None:
        extractors = build_extractors(spaces)
    fd, out = {}, {}
    for space in spaces:
        if space == "inception":
            sa = SpaceReference(ra.mu, ra.sigma, ra.pool_features)
            sb = SpaceReference(rb.mu, rb.sigma, rb.pool_features)
        else:
            kw = dict(batch_size=batch_size, keep_features=mind, cache_dir=cache_dir, use_cache=use_cache)
            sa = load_space_reference(a, extractors[space], **kw)
            sb = load_space_reference(b, extractors[space], **kw)
        fd[space] = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
        if mind:
            if sa.features is None or sb.features is None:
                raise ValueError(f"MIND in space {space!r} needs images on both sides, not only statistics")
            out[f"mind_{space}"] = mind_distance(sa.features, sb.features,
                                                 seed=MIND_SEED if mind_seed is None else mind_seed)
    return {**{f"fd_{s}": v for s, v in fd.items()}, **fd_ratios(fd), **out}
