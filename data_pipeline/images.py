"""Real and deliberately broken image folders for tests, benchmarks and the quickstart.

Nothing is downloaded: the digits are bundled (data/digits.csv.gz, see data/README.md); photo-like
JPEGs are generated.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["synset_name", "load_digits", "make_digits_folder", "make_broken_folder", "make_photo_folder",
           "BROKEN_EXPECTED"]


def synset_name(class_id: int) -> str:
    """An ImageNet-like folder name; zero padding keeps the sorted order equal to the class order."""
    return f"n{class_id:08d}"


DIGITS_FILE = Path(__file__).with_name("data") / "digits.csv.gz"
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 UCI handwritten digits: (images [N, 8, 8] float64 in 0..16, classes [N] int64)."""
    raw = DIGITS_FILE.read_bytes()
    if hashlib.sha256(raw).hexdigest() != DIGITS_SHA256:
        raise RuntimeError(f"{DIGITS_FILE} is not the bundled digits file (sha256 differs); restore it from git")
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.float64)
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def make_digits_folder(out_dir, *, size: int = 64, per_class: int | None = None,
                       quality: int = 95) -> dict[str, int]:
    """Write the 8x8 handwritten digits (load_digits) as an ImageNet-style tree of RGB JPEGs.

    Each digit is upscaled to ``size`` (bicubic) and tinted with a per-image colour so that the
    three channels differ. Returns the number of images written per class folder.
    """
    images, targets = load_digits()
    out = Path(out_dir)
    rng = np.random.default_rng(0)
    counts: dict[str, int] = {}
    for idx, (img8, target) in enumerate(zip(images, targets)):
        name = synset_name(int(target))
        if per_class is not None and counts.get(name, 0) >= per_class:
            continue
        gray = Image.fromarray((img8 / 16.0 * 255.0).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        g = np.asarray(gray, dtype=np.float32)[..., None] / 255.0
        fg = rng.uniform(0.4, 1.0, size=3).astype(np.float32)
        bg = rng.uniform(0.0, 0.25, size=3).astype(np.float32)
        rgb = np.clip((g * fg + (1.0 - g) * bg) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        (out / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(out / name / f"digit_{idx:05d}.JPEG", quality=quality)
        counts[name] = counts.get(name, 0) + 1
    return counts


# What `prepare` must report for the folder written by make_broken_folder at a resolution at most
# 96 // 2 (so that only the tiny image is upsampled): converted files become samples, skipped ones
# do not.
BROKEN_EXPECTED = {
    "samples": 8,  # good + cmyk + grayscale + palette + rgba + 16bit + tiny + la
    "skipped": {"corrupt": 1, "not_an_image": 1, "unreadable": 1, "empty": 1},
    "converted": {"cmyk": 1, "grayscale": 1, "palette": 1, "alpha": 2, "16bit": 1, "upsampled": 1},
}


def make_broken_folder(out_dir, *, size: int = 96) -> dict:
    """Write one file of each awkward kind into a two-class tree; returns BROKEN_EXPECTED.

    Kinds: a good JPEG, a truncated JPEG, CMYK JPEG, grayscale JPEG, palette PNG with transparency,
    RGBA PNG, LA (grey + alpha) PNG, 16-bit greyscale PNG, an image smaller than the crop, a text
    file named .JPEG, an empty file, and an unreadable entry (a dangling symlink, which stays
    unreadable even for root).
    """
    out = Path(out_dir)
    a, b = out / synset_name(0), out / synset_name(1)
    a.mkdir(parents=True, exist_ok=True)
    b.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(size, size + 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(a / "good.JPEG", quality=90)
    full = (a / "good.JPEG").read_bytes()
    (a / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    Image.fromarray(rgb).convert("CMYK").save(a / "cmyk.JPEG", quality=90)
    Image.fromarray(rgb).convert("L").save(a / "gray.JPEG", quality=90)
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(b / "palette.png", transparency=0)
    rgba = np.concatenate([rgb, rng.integers(0, 256, size=(size, size + 20, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(b / "rgba.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(b / "la.png")
    deep = (rng.integers(0, 65536, size=(size, size), dtype=np.int64)).astype(np.uint16)
    Image.fromarray(deep).save(b / "deep16.png")  # mode I;16 -> 16-bit greyscale PNG
    Image.fromarray(rgb[:12, :9]).save(b / "tiny.JPEG", quality=90)
    (b / "notes.JPEG").write_text("this is not an image\n")
    (b / "empty.JPEG").write_bytes(b"")
    link = b / "missing.JPEG"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(str(out / "does-not-exist.JPEG"), link)
    return BROKEN_EXPECTED


def make_photo_folder(out_dir, num_images: int, *, num_classes: int = 10, width: int = 500,
                      height: int = 375, quality: int = 90, seed: int = 0) -> int:
    """ImageNet-sized JPEGs with photo-like statistics (smooth colour fields plus fine texture)."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        coarse = rng.uniform(0, 255, size=(height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        noise = rng.integers(-18, 19, size=(height, width, 1), dtype=np.int16)
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        folder = out / synset_name(i % num_classes)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"img_{i:06d}.JPEG", quality=quality)
    return num_images


def first_per_class(targets, per_class: int | None) -> list[int]:
    """Indices of the first ``per_class`` samples of each class, in dataset order (all when None)."""
    seen: dict[int, int] = {}
    chosen = []
    for idx, target in enumerate(targets.tolist()):
        if per_class is None or seen.get(target, 0) < per_class:
            seen[target] = seen.get(target, 0) + 1
            chosen.append(idx)
    return chosen
