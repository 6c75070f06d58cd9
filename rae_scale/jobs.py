"""Config -> library calls for the jobs that are not training loops: latent caching, statistics and
evaluation. The CLI calls these; Ray launchers submit the same CLI commands."""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from rae_scale import config as C

log = logging.getLogger(__name__)


def run_cache_latents_job(cfg: C.CacheLatentsJob) -> dict:
    from data_pipeline.cache_latents import run_cache_latents
    from data_pipeline.tiny import encoder_factory

    if not cfg.input or not cfg.output:
        raise C.ConfigError("cache-latents needs input= (image shards) and output= (latent cache)")
    return run_cache_latents(input=cfg.input, output=cfg.output, encoder_factory=encoder_factory(cfg.rae.encoder),
                             batch_size=cfg.batch_size, dtype=cfg.dtype, both_flips=cfg.both_flips,
                             num_workers=cfg.num_workers, ray_address=cfg.ray_address)


def run_stats_job(cfg: C.StatsJob) -> dict:
    from data_pipeline.stats import run_stats
    from data_pipeline.tiny import encoder_factory

    if not cfg.input or not cfg.output:
        raise C.ConfigError("stats needs input= (latent cache or image shards) and output= (stats file)")
    factory = encoder_factory(cfg.rae.encoder) if cfg.kind == "images" else None
    return run_stats(input=cfg.input, kind=cfg.kind, encoder_factory=factory, num_workers=cfg.num_workers,
                     output_path=cfg.output, ray_address=cfg.ray_address)


def _dist():
    from rae_scale.parallel.dist import init_distributed

    return init_distributed()


def evaluate_fid(cfg: C.EvalJob) -> dict:
    """Sample cfg.num_samples images over all ranks (per-sample seeds) and score them."""
    from rae_scale.eval.features import evaluate_generator
    from rae_scale.generate import load_guide_model, load_rae_for_decoding, load_stage2, make_sample_fn

    info = _dist()
    s = cfg.sample
    model = load_stage2(s, info.device)
    rae = load_rae_for_decoding(s.rae, info.device, s.run.storage_options)
    sample_fn = make_sample_fn(s, model, rae, info.device, load_guide_model(s, info.device))
    os.makedirs(cfg.output, exist_ok=True)
    metrics = evaluate_generator(
        sample_fn, num_samples=cfg.num_samples, batch_size=cfg.batch_size, label_sampling=cfg.label_sampling,
        num_classes=s.dit.num_classes, seed=s.seed, rank=info.rank, world_size=info.world_size,
        progress_dir=os.path.join(cfg.output, "progress"),
        save_png_dir=os.path.join(cfg.output, "png") if cfg.save_png else None,
        save_npz=os.path.join(cfg.output, "samples.npz") if cfg.save_npz else None,
        reference=cfg.reference, results_path=os.path.join(cfg.output, "results.json"),
        metadata={"config": C.to_dict(cfg), "checkpoint": s.checkpoint,
                  "sampler": dataclasses.asdict(s.sampler), "guidance": dataclasses.asdict(s.guidance)})
    if info.rank == 0:
        log.info("evaluation results written to %s", os.path.join(cfg.output, "results.json"))
    return metrics


def evaluate_recon(cfg: C.EvalJob) -> dict:
    """rFID, PSNR and SSIM of the stage-1 model (EMA decoder) over cfg.data_url."""
    from rae_scale.data.loader import build_image_loader
    from rae_scale.eval.recon import evaluate_reconstruction
    from rae_scale.generate import load_rae_for_decoding

    info = _dist()
    if not cfg.data_url:
        raise C.ConfigError("evaluate recon needs data_url= (image shards to reconstruct)")
    rae = load_rae_for_decoding(cfg.sample.rae, info.device, cfg.sample.run.storage_options)
    loader = build_image_loader(cfg.data_url, batch_size=cfg.batch_size, rank=info.rank,
                                world_size=info.world_size, seed=0, shuffle=False, hflip=False, drop_last=False)

    @torch.no_grad()
    def reconstruct(x):
        return rae.decode(rae.encode(x.to(info.device)).latent).sample.clamp(0, 1)

    os.makedirs(cfg.output, exist_ok=True)
    return evaluate_reconstruction(loader, reconstruct, num_samples=cfg.num_samples, reference=cfg.reference,
                                   rank=info.rank, world_size=info.world_size,
                                   results_path=os.path.join(cfg.output, "results.json"))
