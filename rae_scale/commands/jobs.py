"""Config -> library calls for each job: latent caching, statistics, training (local ranks or this
process) and evaluation. The CLI and the quickstart call these; Ray launchers submit the same CLI
commands. torch is imported inside the jobs: a launcher that only spawns local ranks never loads it."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

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


def run_cache_text_job(cfg) -> dict:
    """`cache-text` (config.schema.CacheTextJob): captions of prepared shards -> text-encoder tokens."""
    from data_pipeline.cache_text import run_cache_text

    if not cfg.input or not cfg.output:
        raise C.ConfigError("cache-text needs input= (prepared shards with captions) and output= (text cache)")
    import contextlib

    from data_pipeline.ray_utils import ray_session

    te = cfg.text_encoder
    # tiny configs: one Ray instance for building their inputs and encoding (none when num_workers=0)
    shared = cfg.build_if_missing and cfg.num_workers != 0
    with ray_session(cfg.ray_address) if shared else contextlib.nullcontext():
        if cfg.build_if_missing:  # tiny configs: the captioned digits and a random Qwen3, built once
            from data_pipeline.tiny_captions import ensure_tiny_text

            ensure_tiny_text(cfg, num_workers=cfg.num_workers)
        return run_cache_text(input=cfg.input, output=cfg.output, pretrained=te.pretrained,
                              max_length=te.max_length, batch_size=cfg.batch_size, dtype=cfg.dtype,
                              num_workers=cfg.num_workers, ray_address=cfg.ray_address)


def run_stats_job(cfg: C.StatsJob) -> dict:
    from data_pipeline.stats import run_stats
    from data_pipeline.tiny import encoder_factory

    if not cfg.input or not cfg.output:
        raise C.ConfigError("stats needs input= (latent cache or image shards) and output= (stats file)")
    factory = encoder_factory(cfg.rae.encoder) if cfg.kind == "images" else None
    return run_stats(input=cfg.input, kind=cfg.kind, encoder_factory=factory, num_workers=cfg.num_workers,
                     output_path=cfg.output, ray_address=cfg.ray_address)


def run_train_job(stage: str, cfg, rank_argv: list[str]) -> int:
    """Train one stage: in this process when it already is a rank or cfg.parallel.nproc is 1, else as
    cfg.parallel.nproc local ranks, each running `rae-scale <rank_argv>` (the same job, read again)."""
    from rae_scale.parallel.launch import inside_distributed_env, spawn_local

    if cfg.data.build_if_missing:
        # the tiny configs build their dataset on first use (once, before any rank starts)
        from data_pipeline.tiny import ensure_tiny_data

        ensure_tiny_data(cfg, stage=stage)
    if cfg.parallel.nproc > 1 and not inside_distributed_env():
        return spawn_local(cfg.parallel.nproc, ["-m", "rae_scale.commands.cli", *rank_argv])
    if stage == "stage1":
        from rae_scale.train.stage1 import main as train_main
    else:
        from rae_scale.train.stage2 import main as train_main
    return int(train_main(cfg) or 0)


def _dist():
    from rae_scale.parallel.dist import init_distributed

    return init_distributed()


UNIT_SIZE = 1000  # samples per resumable work unit of `evaluate fid`


def _inception_identity(weights: str | None) -> dict:
    """Which Inception featurises: the pinned TF-2015 default (same digest everywhere) or a file."""
    from rae_scale.eval.inception import DEFAULT_WEIGHTS_SHA1, WEIGHTS_ENV
    from rae_scale.eval.spec import source_identity

    path = weights or os.environ.get(WEIGHTS_ENV)
    return {"default_sha1": DEFAULT_WEIGHTS_SHA1} if not path else {"file": source_identity(path)}


def fid_spec(cfg: C.EvalJob, extractors: dict | None = None) -> dict:
    """The full sampling specification of an `evaluate fid` job (see eval.spec.sampling_spec): weights
    (and whether EMA), sampler, shift, guidance, precision; the samples drawn (number, seed, labels);
    what scores them: the reference with its content hash, the Inception and every feature space."""
    from rae_scale.eval.spec import sampling_spec, source_identity
    from rae_scale.eval.spaces import extractors_identity

    spec = sampling_spec(cfg.sample)
    ckpt = spec["checkpoint"]
    spec["weights"] = "random" if ckpt == "random" else ckpt.get("weights") or "as stored in the file"
    spec["samples"] = {"num_samples": cfg.num_samples, "seed": cfg.sample.seed, "label_sampling": cfg.label_sampling,
                       "num_classes": cfg.sample.dit.num_classes}
    spec["reference"] = source_identity(cfg.reference, cfg.sample.run.storage_options) if cfg.reference else None
    if spec["reference"] is not None and os.path.exists(cfg.reference):
        from rae_scale.eval.reference import content_hash

        spec["reference"]["sha256"] = content_hash(cfg.reference)
    spec["inception"] = _inception_identity(cfg.inception_weights)
    spec["spaces"] = {"names": list(cfg.spaces), "extractors": extractors_identity(extractors or {}),
                      "mind": {"seed": cfg.mind_seed} if cfg.mind else None}
    return spec


def eval_job_from_results(path: str, output: str | None = None) -> tuple[C.EvalJob, dict]:
    """The `evaluate fid` job that wrote results JSON `path`, pinned to the checkpoint versions it
    recorded, writing to `output` (default: a `rerun` folder beside the file); and its recorded spec."""
    try:
        doc = json.loads(open(path).read())
    except (OSError, ValueError) as exc:
        raise C.ConfigError(f"--from-results {path}: not a readable JSON file ({exc})") from None
    config, spec = (doc.get("metadata") or {}).get("config"), doc.get("spec")
    if not isinstance(config, dict) or not isinstance(spec, dict) or "sample" not in config:
        raise C.ConfigError(f"--from-results {path}: not a results JSON of `evaluate fid` (it needs metadata.config "
                            "and spec)")
    cfg = C.from_dict(C.EvalJob, config)
    cfg.sample = _pinned(cfg.sample, spec)
    cfg.output = output or os.path.join(os.path.dirname(os.path.abspath(path)), "rerun")
    return cfg, spec


def _pinned(s: C.SampleJob, spec: dict) -> C.SampleJob:
    """The sample job with run folders replaced by the step folders the spec resolved them to, so the
    weights loaded are the ones recorded even if training commits a newer step meanwhile."""
    def step_of(identity, path):
        return identity["path"] if isinstance(identity, dict) and identity.get("step") is not None else path

    if s.checkpoint:
        s = dataclasses.replace(s, checkpoint=step_of(spec["checkpoint"], s.checkpoint))
    if s.rae.decoder_checkpoint:
        s = dataclasses.replace(s, rae=dataclasses.replace(
            s.rae, decoder_checkpoint=step_of(spec["decoder"], s.rae.decoder_checkpoint)))
    return s


def evaluate_fid(cfg: C.EvalJob, *, allow_random_weights: bool = False, expected_spec: dict | None = None) -> dict:
    """Sample cfg.num_samples images over all ranks (per-sample seeds) and score them.

    The output's progress folder is reused only by the same sampling specification (checkpoint
    version, sampler, guidance, seeds, labels, reference, spaces, ...); another one is refused up
    front. `expected_spec` (a rerun from a results JSON): refuse unless the spec is exactly that one.
    """
    from rae_scale.eval.features import ProgressMismatchError, claim_progress, evaluate_generator, progress_meta
    from rae_scale.eval.inception import build_inception
    from rae_scale.commands.generate import load_guide_model, load_rae_for_decoding, load_stage2
    from rae_scale.diffusion.sample_fn import make_sample_fn
    from rae_scale.commands.generate import require_trained_weights
    from rae_scale.parallel.dist import broadcast_object
    from rae_scale.eval.spaces import build_extractors

    s = cfg.sample
    require_trained_weights(s, "evaluate fid", prefix="sample.", allow_random_weights=allow_random_weights)
    info = _dist()
    try:
        extractors = build_extractors(cfg.spaces, cfg.extractors, cfg.extractor_dir, device=info.device)
    except (ValueError, FileNotFoundError) as exc:
        raise C.ConfigError(str(exc)) from None
    # rank 0 resolves the weights to one checkpoint version for all ranks; its error stops every rank
    spec, error = None, None
    if info.rank == 0:
        try:
            spec = fid_spec(cfg, extractors)
            if expected_spec is not None:
                _check_rerun(expected_spec, spec)
        except (FileNotFoundError, C.ConfigError) as exc:
            error = str(exc)
    spec, error = broadcast_object((spec, error))
    if error:
        raise (C.ConfigError if error.startswith("--from-results") else FileNotFoundError)(error)
    progress_dir = os.path.join(cfg.output, "progress")
    meta = progress_meta(num_samples=cfg.num_samples, unit_size=UNIT_SIZE, seed=s.seed,
                         label_sampling=cfg.label_sampling, num_classes=s.dit.num_classes, spec=spec)
    try:
        claim_progress(progress_dir, meta, info.rank, info.world_size)  # before any model is loaded
    except ProgressMismatchError as exc:
        raise C.ConfigError(str(exc)) from None
    s = _pinned(s, spec)
    model = load_stage2(s, info.device)
    rae = load_rae_for_decoding(s.rae, info.device, s.run.storage_options)
    sample_fn = make_sample_fn(s, model, rae, info.device, load_guide_model(s, info.device))
    metrics = evaluate_generator(
        sample_fn, num_samples=cfg.num_samples, batch_size=cfg.batch_size, label_sampling=cfg.label_sampling,
        num_classes=s.dit.num_classes, seed=s.seed, rank=info.rank, world_size=info.world_size,
        progress_dir=progress_dir, unit_size=UNIT_SIZE,
        inception=build_inception(cfg.inception_weights, device=info.device),
        save_png_dir=os.path.join(cfg.output, "png") if cfg.save_png else None,
        save_npz=os.path.join(cfg.output, "samples.npz") if cfg.save_npz else None,
        reference=cfg.reference, results_path=os.path.join(cfg.output, "results.json"), spec=spec,
        spaces=cfg.spaces, extractors=extractors, mind=cfg.mind, mind_seed=cfg.mind_seed,
        metadata={"config": C.to_dict(cfg), "checkpoint": s.checkpoint,
                  "sampler": dataclasses.asdict(s.sampler), "guidance": dataclasses.asdict(s.guidance)})
    if info.rank == 0:
        log.info("evaluation results written to %s", os.path.join(cfg.output, "results.json"))
    return metrics


def _check_rerun(expected: dict, spec: dict) -> None:
    """A rerun from a results JSON must sample and score exactly as recorded."""
    from rae_scale.eval.features import _diff

    diffs = _diff(json.loads(json.dumps(expected, default=str)), json.loads(json.dumps(spec, default=str)))
    if diffs:
        shown = "; ".join(f"{k}: recorded {a!r}, now {b!r}" for k, a, b in diffs[:4])
        raise C.ConfigError(f"--from-results cannot re-run exactly: {shown}")


def prompts_sha256(prompts: list[str]) -> str:
    """sha256 of a prompt list (its JSON, UTF-8): which prompts an evaluation sampled, in which order."""
    import hashlib

    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


def t2i_spec(cfg: C.EvalJob, prompts: list[str]) -> dict:
    """The full sampling specification of an `evaluate t2i` job (see fid_spec): the generator
    (eval.spec.sampling_spec, text encoder included), the samples (number, seed, prompts by count and
    hash), the reference and the Inception. The CLIP model is not part of it: it scores finished
    samples, so another CLIP model reuses the work units."""
    from rae_scale.eval.spec import sampling_spec, source_identity

    spec = sampling_spec(cfg.sample)
    ckpt = spec["checkpoint"]
    spec["weights"] = "random" if ckpt == "random" else ckpt.get("weights") or "as stored in the file"
    spec["samples"] = {"num_samples": cfg.num_samples, "seed": cfg.sample.seed, "label_sampling": "equal",
                       "num_prompts": len(prompts), "prompts_sha256": prompts_sha256(prompts)}
    spec["reference"] = source_identity(cfg.reference, cfg.sample.run.storage_options) if cfg.reference else None
    if spec["reference"] is not None and os.path.exists(cfg.reference):
        from rae_scale.eval.reference import content_hash

        spec["reference"]["sha256"] = content_hash(cfg.reference)
    spec["inception"] = _inception_identity(cfg.inception_weights)
    return spec


def _check_t2i_job(cfg: C.EvalJob) -> list[str]:
    """The prompts of an `evaluate t2i` job, after the checks that need no model (one-line errors)."""
    from rae_scale.commands.generate import job_prompts
    from rae_scale.eval.clip_score import check_available

    s = cfg.sample
    if s.dit.condition_type != "text":
        raise C.ConfigError("evaluate t2i samples from prompts, but sample.dit.condition_type is "
                            f"{s.dit.condition_type!r}; allowed: text (a class-conditional model: evaluate fid)")
    if not cfg.clip_model:
        raise C.ConfigError("evaluate t2i scores with a CLIP model: set config key 'clip_model' (--clip-model DIR: "
                            "a transformers CLIPModel folder, or a hub name in the local cache)")
    if cfg.label_sampling != "equal":
        raise C.ConfigError(f"evaluate t2i spreads samples equally over the prompts; label_sampling="
                            f"{cfg.label_sampling} is not allowed (allowed: equal)")
    if list(cfg.spaces) != ["inception"]:
        raise C.ConfigError(f"evaluate t2i scores FID in the inception space only; spaces={list(cfg.spaces)} is "
                            "not allowed (allowed: [inception]; the other spaces: evaluate fid)")
    prompts = job_prompts(s)
    if cfg.num_samples < len(prompts):
        raise C.ConfigError(f"num_samples={cfg.num_samples} is fewer than the {len(prompts)} prompts; allowed: at "
                            "least one sample per prompt (num_samples is the total, spread equally over the prompts)")
    check_available(cfg.clip_model)
    return prompts


def evaluate_t2i(cfg: C.EvalJob, *, allow_random_weights: bool = False) -> dict:
    """`evaluate t2i`: cfg.num_samples images spread equally over the prompts (sample.prompts and
    sample.prompts_file), sampled over all ranks in resumable work units, then CLIP score (overall and
    per prompt) and, with cfg.reference, FID. Writes samples.npz (arr_0 images, arr_1 prompt index) and
    results.json (metrics, prompts and their hash, samples per prompt, the CLIP model, the spec).

    The evaluation engine sees prompts as class labels: sample i's "label" is its prompt's index
    (num_classes = number of prompts, label_sampling equal), so seeds, units and resume are those of
    evaluate fid. The CLIP score is computed on rank 0 from the npz.
    """
    from rae_scale.commands.generate import (load_guide_model, load_rae_for_decoding, load_stage2,
                                             load_text_encoder_for, require_trained_weights)
    from rae_scale.diffusion.sample_fn import make_sample_fn
    from rae_scale.eval.clip_score import load_clip_scorer, score_npz
    from rae_scale.eval.features import ProgressMismatchError, claim_progress, evaluate_generator, progress_meta
    from rae_scale.eval.inception import build_inception
    from rae_scale.parallel.dist import broadcast_object

    prompts = _check_t2i_job(cfg)
    s = cfg.sample
    require_trained_weights(s, "evaluate t2i", prefix="sample.", allow_random_weights=allow_random_weights)
    info = _dist()
    unit_size = UNIT_SIZE
    # rank 0 resolves the weights to one version and loads the CLIP model before any sampling: a bad
    # folder fails now, not after hours of sampling; its error stops every rank
    spec, scorer, error = None, None, None
    if info.rank == 0:
        try:
            spec = t2i_spec(cfg, prompts)
            scorer = load_clip_scorer(cfg.clip_model, info.device)
        except (FileNotFoundError, ValueError) as exc:
            error = (isinstance(exc, FileNotFoundError), str(exc))
    spec, error = broadcast_object((spec, error))
    if error:
        raise (FileNotFoundError if error[0] else C.ConfigError)(error[1])
    progress_dir = os.path.join(cfg.output, "progress")
    meta = progress_meta(num_samples=cfg.num_samples, unit_size=unit_size, seed=s.seed, label_sampling="equal",
                         num_classes=len(prompts), spec=spec)
    try:
        claim_progress(progress_dir, meta, info.rank, info.world_size)  # before any model is loaded
    except ProgressMismatchError as exc:
        raise C.ConfigError(str(exc)) from None
    s = _pinned(s, spec)
    text_encoder = load_text_encoder_for(s, info.device)
    model = load_stage2(s, info.device)
    rae = load_rae_for_decoding(s.rae, info.device, s.run.storage_options)
    sample_prompts = make_sample_fn(s, model, rae, info.device, load_guide_model(s, info.device),
                                    text_encoder=text_encoder)

    def sample_fn(labels, seeds):  # the engine's labels are prompt indices
        return sample_prompts([prompts[int(i)] for i in labels], seeds)

    npz = os.path.join(cfg.output, "samples.npz")
    results_path = os.path.join(cfg.output, "results.json")
    metrics = evaluate_generator(
        sample_fn, num_samples=cfg.num_samples, batch_size=cfg.batch_size, label_sampling="equal",
        num_classes=len(prompts), seed=s.seed, rank=info.rank, world_size=info.world_size,
        progress_dir=progress_dir, unit_size=unit_size,
        inception=build_inception(cfg.inception_weights, device=info.device),
        save_png_dir=os.path.join(cfg.output, "png") if cfg.save_png else None, save_npz=npz,
        reference=cfg.reference, results_path=results_path, spec=spec,
        metadata={"config": C.to_dict(cfg), "checkpoint": s.checkpoint,
                  "sampler": dataclasses.asdict(s.sampler), "guidance": dataclasses.asdict(s.guidance)})
    clip = None
    if info.rank == 0:
        scored = score_npz(scorer, npz, prompts, batch_size=cfg.batch_size)
        clip = {"clip_score": scored["clip_score"], "per_prompt": scored["per_prompt"]}
        _write_t2i_results(results_path, clip, prompts, scorer.identity())
        log.info("CLIP score %.4f over %d samples of %d prompts; results written to %s", clip["clip_score"],
                 cfg.num_samples, len(prompts), results_path)
    clip = broadcast_object(clip)
    return {**metrics, "clip_score": clip["clip_score"],
            "clip_score_per_prompt": [p["clip_score"] for p in clip["per_prompt"]]}


def _write_t2i_results(path: str, clip: dict, prompts: list[str], clip_identity: dict) -> None:
    """Add the CLIP score to the results JSON evaluate_generator wrote: metrics.clip_score, per prompt
    (prompt, score, samples), the prompts with their hash and the CLIP model (atomic rewrite)."""
    with open(path) as f:
        doc = json.load(f)
    doc["metrics"]["clip_score"] = clip["clip_score"]
    doc["per_prompt"] = clip["per_prompt"]
    doc["prompts"] = {"texts": list(prompts), "sha256": prompts_sha256(prompts),
                      "num_samples_per_prompt": [p["num_samples"] for p in clip["per_prompt"]]}
    doc["clip_model"] = clip_identity
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def evaluate_recon(cfg: C.EvalJob, *, allow_random_weights: bool = False) -> dict:
    """rFID, PSNR and SSIM of the stage-1 model (EMA decoder) over cfg.data_url."""
    from rae_scale.data.loader import build_image_loader
    from rae_scale.eval.inception import build_inception
    from rae_scale.eval.recon import evaluate_reconstruction
    from rae_scale.commands.generate import load_rae_for_decoding, require_trained_weights

    if not cfg.data_url:
        raise C.ConfigError("evaluate recon needs data_url= (image shards to reconstruct)")
    require_trained_weights(cfg.sample, "evaluate recon", stage2=False, prefix="sample.", checkpoint_is_decoder=True,
                            allow_random_weights=allow_random_weights)
    info = _dist()
    rae = load_rae_for_decoding(cfg.sample.rae, info.device, cfg.sample.run.storage_options, with_encoder=True)
    loader = build_image_loader(cfg.data_url, batch_size=cfg.batch_size, rank=info.rank,
                                world_size=info.world_size, seed=0, shuffle=False, hflip=False, drop_last=False)

    import torch

    @torch.no_grad()
    def reconstruct(x):
        return rae.decode(rae.encode(x.to(info.device)).latent).sample.clamp(0, 1)

    os.makedirs(cfg.output, exist_ok=True)
    return evaluate_reconstruction(loader, reconstruct, num_samples=cfg.num_samples, reference=cfg.reference,
                                   rank=info.rank, world_size=info.world_size,
                                   inception=build_inception(cfg.inception_weights, device=info.device),
                                   results_path=os.path.join(cfg.output, "results.json"))
