"""Stage-2 input: cached latents vs online encoding (samples/s of what the loop gets before normalisation).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/online_encoding.py [--encoder dinov3|dinov2]
        [--batch 32 --passes 3 --threads 1 --per-class N]

Builds the tiny digits data the way the tiny configs do (data_pipeline: digit images -> `prepare` -> MDS image
shards at 32 px; a seeded random encoder saved as a folder; `cache-latents` with both flips in bf16), all in
this process without Ray, in a temporary folder. Then the two stage-2 input paths, as stage2.main runs them:

* cached (baseline): BatchStream.for_latents -> the batch's raw latents as float32;
* online: BatchStream.for_images(flip_like_latent_cache=True) -> stage2.encode_images with the frozen encoder
  (prepare_frozen, fp32 autocast context as a fp32 run has).

Each timed pass reads one epoch (the stream's batches_per_epoch batches); after one warm-up pass each, passes
alternate cached / online so that a change in machine load hits both, and the result is the median of the
per-pass ratios. Before timing, the first batch of both paths is compared: same sample ids, and the online
latents equal the cached ones up to bf16 (the cache job encodes under bf16 autocast and stores bf16). Also
printed: bytes on disk per sample (image shards vs latent cache) for this data, and the latent bytes per
million images of RAE's and RAEv2's encoders at 256 px.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch

from rae_scale import config as C

# the tiny configs' encoder (configs/stage2/tiny_cpu.yaml), and a tiny DINOv3 with a K=3 multi-layer latent
ENCODERS = {
    "dinov2": dict(kind="dinov2", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, patch_size=4,
                   input_size=32),
    "dinov3": dict(kind="dinov3", hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256, patch_size=4,
                   input_size=32, layers=[1, 2, 3]),
}
# latents of real encoders at 256 px: channels x 16 x 16 (README, "Cached latents or online encoding")
REAL_LATENTS = {"DINOv2-B (RAE, 768 x 16 x 16)": 768, "DINOv3-L K=7 (RAEv2, 1024 x 16 x 16)": 1024}


def build_data(root: Path, enc: C.EncoderConfig, per_class: int | None) -> tuple[str, str]:
    """Digits -> image shards -> latent cache (bf16, both flips), each through the real pipeline job."""
    from data_pipeline.cache_latents import run_cache_latents
    from data_pipeline.images import make_digits_folder
    from data_pipeline.prepare import run_prepare
    from data_pipeline.tiny import encoder_factory

    make_digits_folder(root / "raw", size=64, per_class=per_class)
    shards, latents = str(root / "shards"), str(root / "latents")
    run_prepare(input=str(root / "raw"), output=shards, resolution=enc.input_size, format="mds",
                image_format="png", num_workers=0)
    run_cache_latents(input=shards, output=latents, encoder_factory=encoder_factory(enc), batch_size=64,
                      dtype="bf16", both_flips=True, num_workers=0)
    return shards, latents


def folder_bytes(url: str) -> int:
    return sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file())


class CachedInput:
    """The baseline: stage 2's batches from the latent cache."""

    def __init__(self, data: C.DataConfig, batch: int):
        from rae_scale.data.batch_stream import BatchStream

        self.stream = BatchStream.for_latents(data, micro_batch=batch, rank=0, world_size=1, seed=0)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.stream.next_batch()
        return b["latent"].float(), b["index"]


class OnlineInput:
    """Online encoding: stage 2's image batches through the frozen encoder, as in its step."""

    def __init__(self, data: C.DataConfig, batch: int, enc: C.EncoderConfig):
        from rae_scale.builders import build_frozen_encoder
        from rae_scale.data.batch_stream import BatchStream
        from rae_scale.parallel.frozen import prepare_frozen
        from rae_scale.parallel.precision import autocast

        self.stream = BatchStream.for_images(data, micro_batch=batch, rank=0, world_size=1, seed=0,
                                             flip_like_latent_cache=True)
        self.encoder = prepare_frozen(build_frozen_encoder(enc), "cpu")
        # encode_images needs only the strategy's autocast; a fp32 run's is this one
        self.strategy = types.SimpleNamespace(autocast=lambda: autocast("fp32", "cpu"))
        self.encode_seconds = 0.0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        from rae_scale.train.stage2 import encode_images

        b = self.stream.next_batch()
        t = time.perf_counter()
        raw = encode_images(self.encoder, b["image"], self.strategy)
        self.encode_seconds += time.perf_counter() - t
        return raw, b["index"]


def timed_pass(source, batches: int) -> tuple[float, int]:
    t, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(source.next()[1])
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", choices=sorted(ENCODERS), default="dinov3")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--passes", type=int, default=3, help="timed epochs per path (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--per-class", type=int, default=None, help="digits per class (default: all, ~180)")
    args = ap.parse_args()
    if args.batch < 1 or args.passes < 1 or args.threads < 1:
        ap.error("--batch, --passes and --threads must be >= 1")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from rae_scale.builders import save_random_encoder

        sized = C.EncoderConfig(**ENCODERS[args.encoder])
        enc = C.EncoderConfig(**{**sized.__dict__, "pretrained": save_random_encoder(sized, str(root / "encoder"))})
        t0 = time.perf_counter()
        shards, latents = build_data(root, enc, args.per_class)
        print(f"built the digits shards and latent cache in {time.perf_counter() - t0:.1f} s")
        data = C.DataConfig(url=shards, latents_url=latents, source="latents", hflip=True)
        cached, online = CachedInput(data, args.batch), OnlineInput(data, args.batch, enc)

        # the same samples and the same latents on both paths (the cache rounds to bf16)
        (z_cache, ids_cache), (z_online, ids_online) = cached.next(), online.next()
        assert torch.equal(ids_cache, ids_online), "the two paths read different samples"
        diff = ((z_cache - z_online).norm() / z_online.norm()).item()
        assert diff < 2e-2, f"online latents differ from the cache by {diff:.3g} (relative; bf16 allows ~4e-3)"

        per_epoch = cached.stream.batches_per_epoch
        assert per_epoch == online.stream.batches_per_epoch
        n_samples = per_epoch * args.batch
        for source in (cached, online):  # warm-up pass each
            timed_pass(source, per_epoch)
        print(f"encoder {args.encoder}: latent {list(z_cache.shape[1:])}, "
              f"{sum(p.numel() for p in online.encoder.parameters()):,} parameters; {n_samples} samples per pass, "
              f"batch {args.batch}, {args.threads} thread(s), one process; load avg {os.getloadavg()[0]:.1f}")
        rates = {"cached": [], "online": []}
        online.encode_seconds = 0.0
        for _ in range(args.passes):
            for name, source in (("cached", cached), ("online", online)):
                seconds, n = timed_pass(source, per_epoch)
                rates[name].append(n / seconds)
        ratios = [o / c for c, o in zip(rates["cached"], rates["online"])]
        online_seconds = sum(n_samples / r for r in rates["online"])
        print(f"cached latents (baseline): {', '.join(f'{r:.0f}' for r in rates['cached'])} samples/s")
        print(f"online encoding:           {', '.join(f'{r:.0f}' for r in rates['online'])} samples/s "
              f"(encoder forward {100 * online.encode_seconds / online_seconds:.0f}% of its time)")
        print(f"online / cached per pass: {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.3f} (load avg {os.getloadavg()[0]:.1f}); first batch |online - cached| / |online| {diff:.1e}")
        total = json.loads((Path(shards) / "manifest.json").read_text())["num_samples"]
        print(f"on disk per sample ({total} samples): image shards {folder_bytes(shards) / total:,.0f} B, "
              f"latent cache (bf16, both flips) {folder_bytes(latents) / total:,.0f} B")
    for name, channels in REAL_LATENTS.items():
        per_variant = channels * 16 * 16 * 2
        print(f"{name}, per million images: bf16 one flip {per_variant * 1e6 / 1e12:.2f} TB, "
              f"bf16 both flips {2 * per_variant * 1e6 / 1e12:.2f} TB")


if __name__ == "__main__":
    main()
