"""The tiny captioned digits for text-to-image on CPU, built on first use through the real pipeline.

Each bundled 8x8 digit is upscaled, painted in one of six hue-separated colours on a dark grey
background, and captioned with its digit and colour ("a green seven on a dark background"). The
images go into BLIP3o-style webdataset tars (``<key>.png``, caption ``<key>.txt``, label ``<key>.cls``)
that the real `prepare` ingests, so the shards carry the caption column like any web dataset. A
sample's colour and background are drawn from a generator keyed by (seed, sample index) only. A
seeded random tiny Qwen3 (models.text) stands in for the text encoder; its tokenizer makes each caption
word one token.
"""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

from rae_scale.seeding import index_seed

log = logging.getLogger(__name__)

# Hues 60 degrees apart, so a hue classifier can tell them apart after a tiny decoder's blur.
COLOURS = {"red": (1.0, 0.1, 0.1), "yellow": (1.0, 0.95, 0.1), "green": (0.1, 1.0, 0.1),
           "cyan": (0.1, 0.95, 1.0), "blue": (0.15, 0.25, 1.0), "magenta": (1.0, 0.1, 1.0)}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RESOLUTION = 32  # what the tiny text-to-image configs prepare (the tiny RAE's image size)
SOURCE_NAME = "digits_t2i"


def caption(digit: int, colour: str) -> str:
    return f"a {colour} {DIGIT_WORDS[int(digit)]} on a dark background"


def caption_words() -> list[str]:
    """Every word of the captions: the tiny text encoder's tokenizer makes each one token."""
    return sorted({w for d in range(len(DIGIT_WORDS)) for c in COLOURS for w in caption(d, c).split()})


def ensure_random_text_encoder(te) -> None:
    """The seeded random tiny Qwen3 of a `text_encoder` config section, written to te.pretrained when
    missing (the caller holds the build lock)."""
    if Path(te.pretrained).exists():
        return
    from rae_scale.models.text import save_random_qwen3

    save_random_qwen3(te.pretrained, hidden_size=te.hidden_size, num_layers=te.num_layers, num_heads=te.num_heads,
                      num_kv_heads=te.num_kv_heads, seed=0, words=caption_words())
    log.info("wrote a seeded random Qwen3 text encoder (one token per caption word) to %s", te.pretrained)


def colourise(img8, index: int, *, size: int, seed: int = 0):
    """(RGB uint8 [size, size, 3], colour name) of one 8x8 digit (0..16), drawn from (seed, index)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index_seed(seed, index))
    name = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    grey = Image.fromarray((img8 / 16.0 * 255.0).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    g = np.asarray(grey, dtype=np.float32)[..., None] / 255.0
    fg = np.asarray(COLOURS[name], dtype=np.float32) * rng.uniform(0.8, 1.0)
    bg = np.full(3, rng.uniform(0.0, 0.12), dtype=np.float32)
    rgb = np.clip((g * fg + (1.0 - g) * bg) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return rgb, name


def write_captioned_digit_tars(out_dir, *, size: int = 64, per_class: int | None = None, per_tar: int = 256,
                               seed: int = 0) -> int:
    """The colourised, captioned digits as webdataset tars ``NNNNN.tar`` in ``out_dir``; returns the
    number of samples. Tar members have fixed metadata, so the bytes depend only on the arguments."""
    from PIL import Image

    from data_pipeline.images import first_per_class, load_digits

    images, targets = load_digits()
    chosen = first_per_class(targets, per_class)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(0, len(chosen), per_tar):
        with tarfile.open(folder / f"{t // per_tar:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for idx in chosen[t:t + per_tar]:
                rgb, colour = colourise(images[idx], idx, size=size, seed=seed)
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="PNG")
                digit = int(targets[idx])
                members = (("png", buf.getvalue()), ("txt", caption(digit, colour).encode()),
                           ("cls", str(digit).encode()))
                for ext, data in members:
                    info = tarfile.TarInfo(f"digit_{idx:05d}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    return len(chosen)


def build_captioned_digits(output: str, *, root, resolution: int = RESOLUTION, per_class: int | None = None,
                           per_tar: int = 256, num_workers: int | None = None) -> dict:
    """Prepare the captioned digits into MDS shards at ``output`` with the real `prepare`; returns its
    manifest. The raw tars go to ``root/digits_t2i_raw``."""
    from data_pipeline.prepare import run_prepare

    raw = Path(root) / f"{SOURCE_NAME}_raw"
    if not raw.exists():
        n = write_captioned_digit_tars(raw, size=max(64, resolution), per_class=per_class, per_tar=per_tar)
        log.info("wrote %d captioned digit images to %s", n, raw)
    return run_prepare(input=str(raw), output=output, resolution=resolution, format="mds", image_format="png",
                       source_name=SOURCE_NAME, num_workers=num_workers)


def ensure_tiny_text(cfg, *, per_class: int | None = None, num_workers: int | None = None) -> None:
    """What a tiny `cache-text` config (CacheTextJob with build_if_missing) points at, when missing: the
    captioned digits shards at cfg.input and the random Qwen3 folder at cfg.text_encoder.pretrained.
    Idempotent; a file lock lets several local processes call it at once."""
    from filelock import FileLock

    from rae_scale.data.schema import MANIFEST, exists
    from rae_scale.storage import is_remote, join

    te = cfg.text_encoder
    if is_remote(cfg.input) or is_remote(te.pretrained):
        raise ValueError(f"build_if_missing only builds local folders; input={cfg.input!r}, "
                         f"text_encoder.pretrained={te.pretrained!r}")
    root = Path(cfg.input.replace("file://", "")).parent
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".build.lock")):
        ensure_random_text_encoder(te)
        if not exists(join(cfg.input, MANIFEST)):
            build_captioned_digits(cfg.input, root=root, per_class=per_class, num_workers=num_workers)
