"""Build what the tiny CPU configs point at when it is missing: digits shards, a seeded random encoder
folder, cached latents and latent statistics. Every step goes through the real pipeline (prepare,
cache-latents, stats) on one local Ray instance; a file lock lets several local ranks call it at once.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

from rae_scale import config as C

log = logging.getLogger(__name__)


def _exists(url: str, marker: str) -> bool:
    from rae_scale.data.schema import exists
    from rae_scale.storage import join

    return exists(join(url, marker))


def encoder_from_config(encoder_cfg: dict):
    """Picklable factory (for Ray workers): the frozen encoder as an images -> [B, C, h, w] module."""
    import torch

    from rae_scale.builders import build_frozen_encoder

    enc = build_frozen_encoder(C.EncoderConfig(**encoder_cfg))

    class _ToMap(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, x):
            tokens = self.encoder(x)
            b, n, c = tokens.shape
            side = int(round(n ** 0.5))
            return tokens.transpose(1, 2).reshape(b, c, side, side)

    return _ToMap(enc).eval()


def encoder_factory(encoder_cfg: C.EncoderConfig):
    import dataclasses

    return functools.partial(encoder_from_config, dataclasses.asdict(encoder_cfg))


def ensure_tiny_data(cfg, *, stage: str, ray_address: str | None = None, per_class: int | None = None,
                     num_workers: int | None = None) -> None:
    """Create the missing inputs of a tiny stage-1/stage-2 config (idempotent, safe across local ranks).

    num_workers=0 runs the stage-2 jobs (prepare, cache-latents, stats) in this process without Ray."""
    from filelock import FileLock

    data, rae = cfg.data, cfg.rae
    from rae_scale.storage import is_remote

    urls = [s.url for s in getattr(data, "sources", None) or []] or [data.url]
    if any(is_remote(u) for u in urls):
        raise ValueError(f"data.build_if_missing only builds local datasets; {urls} holds a remote URL")
    root = Path(urls[0].replace("file://", "")).parent
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".build.lock")):
        enc = rae.encoder
        if enc.pretrained and not Path(enc.pretrained).exists():
            from rae_scale.builders import save_random_encoder

            sized = C.EncoderConfig(**{**enc.__dict__, "pretrained": None})
            save_random_encoder(sized, enc.pretrained, seed=0)
            log.info("wrote a seeded random %s encoder to %s", enc.kind, enc.pretrained)
        if getattr(data, "sources", None):  # the tiny two-source digits mixture (stage 1)
            missing = [s for s in data.sources if not _exists(s.url, "manifest.json")]
            if missing:
                from data_pipeline.ray_utils import ray_session

                with ray_session(ray_address):
                    build_digits_mixture(missing, resolution=rae.image_size, root=root, per_class=per_class)
            return
        needs_latents = stage == "stage2" and data.source == "latents" and not _exists(data.latents_url,
                                                                                        "latents.json")
        needs_stats = stage == "stage2" and rae.stats_path and not Path(rae.stats_path).exists()
        text = stage == "stage2" and cfg.dit.condition_type == "text"
        needs_text = text and not Path(cfg.text_encoder.pretrained).exists()
        if _exists(data.url, "manifest.json") and not needs_latents and not needs_stats and not needs_text:
            return
        if num_workers == 0:
            _build_missing(cfg, root, stage, per_class, num_workers)
            return
        from data_pipeline.ray_utils import ray_session

        with ray_session(ray_address):  # one Ray instance for every job below (each reuses it)
            _build_missing(cfg, root, stage, per_class, num_workers)


def _build_missing(cfg, root: Path, stage: str, per_class: int | None, num_workers: int | None) -> None:
    """The jobs of ensure_tiny_data, in order: prepare, cache latents, statistics (what is missing), in
    the Ray session ensure_tiny_data opened (or in this process: num_workers=0)."""
    data, rae = cfg.data, cfg.rae
    text = getattr(getattr(cfg, "dit", None), "condition_type", "label") == "text"
    if text:  # text-to-image: the captioned colour digits and the random tiny Qwen3
        from data_pipeline.tiny_captions import build_captioned_digits, ensure_random_text_encoder

        ensure_random_text_encoder(cfg.text_encoder)
        if not _exists(data.url, "manifest.json"):
            build_captioned_digits(data.url, root=root, resolution=rae.image_size, per_class=per_class)
    if not _exists(data.url, "manifest.json"):
        from data_pipeline.images import make_digits_folder
        from data_pipeline.prepare import run_prepare

        raw = root / "digits_raw"
        if not raw.exists():
            counts = make_digits_folder(raw, size=max(64, rae.image_size), per_class=per_class)
            log.info("wrote %d digit images to %s", sum(counts.values()), raw)
        run_prepare(input=str(raw), output=data.url, resolution=rae.image_size, format=data.format,
                    image_format="png", num_workers=num_workers)
    if stage == "stage2" and data.source == "latents" and not _exists(data.latents_url, "latents.json"):
        from data_pipeline.cache_latents import run_cache_latents

        run_cache_latents(input=data.url, output=data.latents_url, encoder_factory=encoder_factory(rae.encoder),
                          batch_size=64, both_flips=True, num_workers=num_workers)
    if stage == "stage2" and rae.stats_path and not Path(rae.stats_path).exists():
        from data_pipeline.stats import run_stats

        workers = {} if num_workers is None else {"num_workers": num_workers}
        if data.source == "latents":
            run_stats(input=data.latents_url, kind="latents", output_path=rae.stats_path, **workers)
        else:
            run_stats(input=data.url, kind="images", encoder_factory=encoder_factory(rae.encoder),
                      output_path=rae.stats_path, **workers)


# ----------------------------------------------------------------------------- the tiny mixture

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIXTURE_SOURCES = ("plain", "colour")


def write_digit_tars(out_dir, *, size: int = 64, per_class: int | None = None, per_tar: int = 256,
                     split: str = "plain") -> int:
    """The digits as plain grey JPEGs in BLIP3o-style webdataset tars (``<split>/NNNNN.tar`` holding
    ``<key>.jpg`` and a caption ``<key>.txt``): the input `prepare` ingests for the "plain" source.
    Returns the number of samples written."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from data_pipeline.images import first_per_class, load_digits

    images, targets = load_digits()
    folder = Path(out_dir) / split
    folder.mkdir(parents=True, exist_ok=True)
    chosen = first_per_class(targets, per_class)
    for t in range(0, len(chosen), per_tar):
        with tarfile.open(folder / f"{t // per_tar:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for idx in chosen[t:t + per_tar]:
                grey = Image.fromarray((images[idx] / 16.0 * 255.0).astype(np.uint8))
                grey = grey.resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                grey.convert("RGB").save(buf, format="JPEG", quality=95)
                caption = f"a handwritten digit {DIGIT_WORDS[int(targets[idx])]}, white on black".encode()
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption), ("cls", str(int(targets[idx])).encode())):
                    info = tarfile.TarInfo(f"digit_{idx:05d}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    return len(chosen)


def build_digits_mixture(sources, *, resolution: int, root, per_class: int | None = None,
                         num_workers: int | None = None) -> None:
    """Prepare the tiny mixture's sources (data.sources entries named "plain" and "colour") with the
    real `prepare`: plain grey digits from webdataset tars (captioned), colourised digits from a
    class-folder tree."""
    from data_pipeline.images import make_digits_folder
    from data_pipeline.prepare import run_prepare

    root = Path(root)
    for src in sources:
        name = src.name or src.url.rstrip("/").rsplit("/", 1)[-1]
        if name not in MIXTURE_SOURCES:
            raise ValueError(f"data.build_if_missing builds the digits mixture's sources {MIXTURE_SOURCES}; "
                             f"source {name!r} ({src.url}) is missing: prepare it with `rae-scale prepare`")
        raw = root / f"digits_{name}_raw"
        if not raw.exists():
            if name == "plain":
                write_digit_tars(raw, size=max(64, resolution), per_class=per_class)
            else:
                make_digits_folder(raw, size=max(64, resolution), per_class=per_class)
        run_prepare(input=str(raw), output=src.url, resolution=resolution, format=src.format, image_format="png",
                    source_name=name, num_workers=num_workers)
        log.info("prepared the %s digits source at %s", name, src.url)
