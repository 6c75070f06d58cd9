"""The `rae-scale` command: one subcommand per job.

Every job takes `CONFIG [key=value ...]`: an optional YAML file, then dotted overrides; common
settings are also flags (each flag is only a spelling of one config key). User mistakes print one
line on stderr and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from rae_scale import config as C

log = logging.getLogger("rae_scale")

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input that is not a config key (missing file, wrong combination)."""


# ----------------------------------------------------------------------------- argument helpers


def _split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [k=v ...]`: the first item is the config file unless it is an override."""
    items = list(items)
    if items and "=" not in items[0]:
        return items[0], items[1:]
    for it in items:
        if "=" not in it:
            raise UsageError(f"'{it}' is neither a config file (it must come first) nor a key=value override")
    return None, items


def _flag_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Turn the flags that were given into `key=value` overrides (flags win over the YAML)."""
    out = []
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = json.dumps(list(value))
        out.append(f"{key}={value}")
    return out


def load_job(job: str, args: argparse.Namespace, flags: dict[str, str] | None = None):
    """Resolve a job config from `args.config_and_overrides` and the flags in `flags`."""
    path, overrides = _split_config_and_overrides(getattr(args, "config_and_overrides", []) or [])
    overrides = overrides + _flag_overrides(args, flags or {})
    cfg = C.load_config(C.JOBS[job], path, overrides)
    _share_endpoint(cfg)
    return cfg


def _share_endpoint(cfg) -> None:
    """An S3 endpoint set in run.storage_options reaches data readers and streaming too (before any
    rank or worker starts): rae_scale.storage's endpoint rule."""
    from rae_scale.storage import share_endpoint

    run = getattr(cfg, "run", None) or getattr(getattr(cfg, "sample", None), "run", None)
    if run is not None:
        share_endpoint(getattr(run, "storage_options", None))


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="optional YAML config, then dotted overrides such as training.max_steps=100")


def _add_random_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-random-weights", dest="allow_random_weights", action="store_true",
                   help="run even where the decoder / stage-2 model has no weights source (random weights)")


def _add_spaces_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spaces", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                   help="feature spaces to score, comma-separated: inception,convnext,dinov2,mae,siglip,clip "
                        "(all six: FD_r^6) [spaces]")
    p.add_argument("--mind", action="store_true", default=None, help="also MIND per space [mind]")
    p.add_argument("--extractor-dir", dest="extractor_dir",
                   help="folder with one transformers folder per space (convnext/, dinov2/, ...) [extractor_dir]")


def _parse_int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


# ----------------------------------------------------------------------------- handlers


def cmd_config(args) -> int:
    if args.config_cmd == "show":
        job = args.job.replace("-", "_")
        cfg = load_job(job, args)
        sys.stdout.write(f"# job: {job}\n" + C.to_yaml(cfg))
        return 0
    if args.config_cmd == "import-upstream":
        from rae_scale.interop.upstream_config import import_upstream_config

        result = import_upstream_config(args.upstream_yaml)
        text = f"# imported from {args.upstream_yaml} as a '{result.job}' job\n"
        for line in result.dropped_with_reasons():
            text += f"# dropped (no rae_scale equivalent): {line}\n"
        for note in result.notes:  # corrections and assumed values
            text += f"# note: {note}\n"
            print(f"note: {note}", file=sys.stderr)
        text += C.to_yaml(result.config)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text)
            log.info("wrote %s (%s job); %d field(s) dropped", args.output, result.job, len(result.dropped))
        else:
            sys.stdout.write(text)
        for line in result.dropped_with_reasons():
            print(f"dropped: {line}", file=sys.stderr)
        return 0
    raise UsageError("config needs a subcommand: show or import-upstream")


# prepare's flags: argparse attribute -> PrepareJob key
PREPARE_FLAGS = {"input": "input", "output": "output", "resolution": "resolution", "format": "format",
                 "image_format": "image_format", "ray_address": "ray_address", "input_format": "input_format",
                 "source_name": "source_name", "keep_uncaptioned": "keep_uncaptioned",
                 "captions_file": "captions_file"}


def cmd_prepare(args) -> int:
    cfg = load_job("prepare", args, PREPARE_FLAGS)
    if not cfg.input or not cfg.output:
        raise UsageError("prepare needs --input SRC and --output DST (or input=/output= in the config)")
    if "://" not in cfg.input and not Path(cfg.input).is_dir():  # say so before Ray and torch are imported
        raise FileNotFoundError(f"input {cfg.input!r} is not a folder (expected an ImageNet-style class-folder "
                                "tree, a flat folder plus labels_file, or a folder of webdataset .tar files)")
    from data_pipeline.prepare import run_prepare

    try:
        manifest = run_prepare(input=cfg.input, output=cfg.output, resolution=cfg.resolution, format=cfg.format,
                               image_format=cfg.image_format, jpeg_quality=cfg.jpeg_quality,
                               labels_file=cfg.labels_file, shard_size_bytes=cfg.shard_size_mb << 20,
                               num_workers=cfg.num_workers, ray_address=cfg.ray_address, overwrite=cfg.overwrite,
                               input_format=cfg.input_format, source_name=cfg.source_name,
                               keep_uncaptioned=cfg.keep_uncaptioned, captions_file=cfg.captions_file)
    except ValueError as exc:  # prepare's word on its input (no class folders, a labels line, another run's output)
        if hasattr(exc, "cause"):  # raised inside a Ray task: not input validation, keep the traceback
            raise
        raise UsageError(str(exc)) from exc
    summary = {k: manifest[k] for k in ("num_samples", "num_skipped", "empty_classes", "input_format",
                                        "counts_per_source", "num_captioned", "num_missing_captions")
               if k in manifest}
    print(json.dumps(C.redact({**summary, "output": cfg.output}), default=str))
    return 0


def cmd_cache_latents(args) -> int:
    cfg = load_job("cache_latents", args, {"input": "input", "output": "output", "ray_address": "ray_address"})
    from rae_scale.commands.jobs import run_cache_latents_job

    run_cache_latents_job(cfg)
    return 0


def cmd_cache_text(args) -> int:
    cfg = load_job("cache_text", args, {"input": "input", "output": "output", "ray_address": "ray_address"})
    from rae_scale.commands.jobs import run_cache_text_job

    try:
        info = run_cache_text_job(cfg)
    except ValueError as exc:  # the job's word on its input (no caption column, another cache's output)
        if hasattr(exc, "cause"):  # raised inside a Ray task: not input validation, keep the traceback
            raise
        raise UsageError(str(exc)) from exc
    print(json.dumps(C.redact({**info, "output": cfg.output}), default=str))
    return 0


def cmd_stats(args) -> int:
    cfg = load_job("stats", args, {"input": "input", "output": "output", "kind": "kind"})
    from rae_scale.commands.jobs import run_stats_job

    run_stats_job(cfg)
    return 0


_TRAIN_FLAGS = {"run_dir": "run.dir", "max_steps": "training.max_steps", "strategy": "parallel.strategy",
                "precision": "parallel.precision", "nproc": "parallel.nproc"}


def cmd_train(args) -> int:
    stage = args.stage
    cfg = load_job(stage, args, _TRAIN_FLAGS)
    from rae_scale.commands.jobs import run_train_job

    rank_argv = ["train", stage, *args.config_and_overrides, *_flag_overrides(args, _TRAIN_FLAGS)]
    return run_train_job(stage, cfg, rank_argv)


def cmd_generate(args) -> int:
    flags = {"checkpoint": "checkpoint", "class_ids": "class_ids", "num_samples": "num_samples",
             "cfg_scale": "guidance.scale", "ig_scale": "guidance.ig_scale", "num_steps": "sampler.num_steps",
             "mode": "sampler.mode", "prompts": "prompts", "prompts_file": "prompts_file",
             "seed": "seed", "output": "output"}
    extra = []
    if args.guidance is not None:
        extra.append(f"guidance.method={args.guidance}")
    else:  # a scale other than 1 turns its guidance on
        cfg_on = args.cfg_scale is not None and args.cfg_scale != 1.0
        ig_on = args.ig_scale is not None and args.ig_scale != 1.0
        if cfg_on or ig_on:
            extra.append("guidance.method=" + ("ig_cfg" if cfg_on and ig_on else "ig" if ig_on else "cfg"))
    args.config_and_overrides = list(args.config_and_overrides) + extra
    cfg = load_job("sample", args, flags)
    from rae_scale.commands.generate import generate

    out = generate(cfg, allow_random_weights=args.allow_random_weights)
    print(json.dumps(out, default=str))
    return 0


def cmd_reconstruct(args) -> int:
    # --checkpoint names the stage-1 decoder here (a stage-1 run, safetensors or upstream .pt)
    cfg = load_job("sample", args, {"checkpoint": "rae.decoder_checkpoint", "output": "output"})
    if not Path(args.image).is_file():
        raise UsageError(f"--image {args.image!r} is not a file")
    from rae_scale.commands.generate import reconstruct_image

    out = reconstruct_image(cfg, args.image, allow_random_weights=args.allow_random_weights)
    print(json.dumps(out, default=str))
    return 0


# evaluate t2i's flags: argparse attribute -> EvalJob key
_T2I_FLAGS = {"checkpoint": "sample.checkpoint", "prompts": "sample.prompts", "prompts_file": "sample.prompts_file",
              "clip_model": "clip_model", "num_samples": "num_samples", "batch_size": "batch_size",
              "cfg_scale": "sample.guidance.scale", "num_steps": "sample.sampler.num_steps", "seed": "sample.seed",
              "reference": "reference", "output": "output"}


def _is_eval_yaml(path: str) -> bool:
    """Whether a config file is an evaluate job (its generator under `sample`) rather than a generator
    config (stage-2 training YAML, a run's config.yaml, a sample job); unreadable: left to load_config."""
    import dataclasses

    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return True
    generator = {f.name for f in dataclasses.fields(C.GeneratorSections)}
    return not isinstance(data, dict) or "sample" in data or not (set(data) & generator)


def _load_eval_job(args, flags: dict[str, str], extra: list[str]) -> C.EvalJob:
    """An evaluate job from an evaluate YAML, or from a generator YAML whose sections become `sample`
    (training-only sections dropped); `sample.` overrides and flags act on that generator."""
    path, overrides = _split_config_and_overrides(getattr(args, "config_and_overrides", []) or [])
    overrides = overrides + extra + _flag_overrides(args, flags)
    if path is None or _is_eval_yaml(path):
        cfg = C.load_config(C.EvalJob, path, overrides)
    else:
        cfg = C.load_config(C.EvalJob, None, [o for o in overrides if not o.startswith("sample.")])
        cfg.sample = C.load_config(C.SampleJob, path, [o[len("sample."):] for o in overrides
                                                       if o.startswith("sample.")])
    _share_endpoint(cfg)
    return cfg


def cmd_evaluate_t2i(args) -> int:
    # a CFG scale other than 1 turns classifier-free guidance on, as in generate
    extra = ["sample.guidance.method=cfg"] if args.cfg_scale is not None and args.cfg_scale != 1.0 else []
    cfg = _load_eval_job(args, _T2I_FLAGS, extra)
    from rae_scale.commands.jobs import evaluate_t2i

    result = evaluate_t2i(cfg, allow_random_weights=args.allow_random_weights)
    print(json.dumps(result, default=str))
    return 0


def cmd_evaluate(args) -> int:
    if args.eval_cmd == "t2i":
        return cmd_evaluate_t2i(args)
    if args.eval_cmd == "folders":
        from rae_scale.eval.reference import compare_folders

        from rae_scale.eval.spaces import build_extractors, parse_spaces

        inception = None
        if args.inception_weights:
            from rae_scale.eval.inception import build_inception

            inception = build_inception(args.inception_weights)
        try:
            spaces = parse_spaces(args.spaces) if args.spaces else None
            extractors = build_extractors(spaces, folder=args.extractor_dir) if spaces else None
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(str(exc)) from None
        result = compare_folders(args.a, args.b, pr=args.pr, inception=inception, spaces=spaces,
                                 extractors=extractors, mind=bool(args.mind))
        print(json.dumps(result))
        return 0
    flags = {"num_samples": "num_samples", "label_sampling": "label_sampling", "output": "output",
             "reference": "reference", "batch_size": "batch_size",
             # fid: the stage-2 model; recon: the stage-1 decoder
             "checkpoint": "sample.checkpoint" if args.eval_cmd == "fid" else "sample.rae.decoder_checkpoint"}
    if args.eval_cmd == "fid":
        flags.update(spaces="spaces", mind="mind", extractor_dir="extractor_dir")
    expected_spec = None
    if getattr(args, "from_results", None):
        given = [k for k in ("num_samples", "label_sampling", "reference", "batch_size", "checkpoint", "spaces",
                             "mind", "extractor_dir") if getattr(args, k, None) is not None]
        if args.config_and_overrides or given:
            raise UsageError("--from-results re-runs exactly what the results JSON recorded; only --output "
                             f"(and --allow-random-weights) may go with it, got {args.config_and_overrides + given}")
        from rae_scale.commands.jobs import eval_job_from_results

        cfg, expected_spec = eval_job_from_results(args.from_results, args.output)
    else:
        cfg = load_job("evaluate", args, flags)
    from rae_scale.commands.jobs import evaluate_fid, evaluate_recon

    job = evaluate_fid if args.eval_cmd == "fid" else evaluate_recon
    kw = {"expected_spec": expected_spec} if expected_spec is not None else {}
    result = job(cfg, allow_random_weights=args.allow_random_weights, **kw)
    print(json.dumps(result, default=str))
    return 0


def cmd_launch(args) -> int:
    flags = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "partition": "partition", "time": "time",
             "address": "ray_address", "cpus_per_task": "cpus_per_task", "job_name": "job_name",
             "min_workers": "min_workers", "max_workers": "max_workers", "max_failures": "max_failures",
             "max_preemptions": "max_preemptions"}
    target = args.target
    # flags may also come after the target (`launch slurm stage2 CFG --nodes 4`): pick them out
    late = argparse.ArgumentParser(add_help=False)
    for flag, dest, typ in (("--nodes", "nodes", int), ("--gpus-per-node", "gpus_per_node", int),
                            ("--cpus-per-task", "cpus_per_task", int), ("--partition", "partition", str),
                            ("--time", "time", str), ("--job-name", "job_name", str), ("--address", "address", str),
                            ("--nproc", "nproc", int), ("--job", "job", str), ("--min-workers", "min_workers", int),
                            ("--max-workers", "max_workers", int), ("--max-failures", "max_failures", int),
                            ("--max-preemptions", "max_preemptions", int)):
        late.add_argument(flag, dest=dest, type=typ, default=None)
    late.add_argument("--dry-run", dest="dry_run", action="store_true", default=None)
    late.add_argument("--no-follow", dest="no_follow", action="store_true", default=None)
    late_args, job_args = late.parse_known_args(list(args.job_args))
    for key, value in vars(late_args).items():
        if value is not None:
            setattr(args, key, value)
    cfg = C.load_config(C.LaunchJob, None, _flag_overrides(args, flags))
    try:
        if target == "local":
            from launchers.local import run_local

            return run_local(args.nproc, ["train", *job_args] if job_args and job_args[0] in ("stage1", "stage2")
                             else job_args)
        if target == "slurm":
            from launchers.slurm import launch_slurm

            return launch_slurm(cfg, job_args, dry_run=args.dry_run, job=args.job)
        if target == "ray":
            from launchers.ray_jobs import launch_ray

            return launch_ray(cfg, job_args, job=args.job, follow_logs=not args.no_follow)
    except ValueError as exc:  # the launchers' word on bad input
        raise UsageError(str(exc)) from None
    raise UsageError(f"unknown launch target '{target}'; allowed: local, slurm, ray")


def cmd_convert(args) -> int:
    from rae_scale.commands.convert import convert

    out = convert(args.kind, args.source, args.output, dtype=args.dtype, config=args.config)
    print(json.dumps(C.redact(out), default=str))
    return 0


def cmd_plan(args) -> int:
    from rae_scale.commands.plan import main_plan

    cfg = load_job(args.job, args)
    try:
        text = main_plan(args.job, cfg, as_json=args.json, gpus=args.gpus, gpu=args.gpu, gpu_memory=args.gpu_memory,
                         mfu=args.mfu, dataset_size=args.dataset_size, gpus_per_node=args.gpus_per_node)
    except ValueError as exc:  # the planner's word on bad input or a job that fits nowhere
        raise UsageError(str(exc)) from None
    print(text)
    return 0


def cmd_quickstart(args) -> int:
    from rae_scale.commands.quickstart import run_quickstart

    return int(run_quickstart(out_dir=args.out, reduced=args.reduced, nproc=args.nproc) or 0)


def cmd_sweep(args) -> int:
    from rae_scale.commands.sweep import run_sweep

    path, overrides = _split_config_and_overrides(args.config_and_overrides or [])
    out = run_sweep(args.stage, path, overrides, args.grid, grid_file=args.grid_file, output=args.output,
                    ray_address=args.ray_address, max_concurrent=args.max_concurrent,
                    ranks_per_trial=args.ranks_per_trial, cpus_per_trial=args.cpus_per_trial,
                    gpus_per_trial=args.gpus_per_trial, scheduler=args.scheduler, metric=args.metric, mode=args.mode,
                    max_trials=args.max_trials, allow_large=args.allow_large)
    print(json.dumps({k: out[k] for k in ("sweep", "report", "results", "best", "statuses")}))
    return out["exit_code"]


def cmd_report(args) -> int:
    if args.report_cmd == "fid":
        from rae_scale.train.fid_curve import write_fid_curve
        from rae_scale.train.metrics import METRICS_FILE

        out = write_fid_curve(args.run_dir, args.output)
        if out is None:
            raise UsageError(f"{args.run_dir}: {METRICS_FILE} has no online FID rows (eval_fid); they come from "
                             "a stage-2 run with eval.every_steps > 0")
        log.info("FID against epochs written to %s (numbers in %s)", out["png"], out["csv"])
        print(json.dumps(out))
        return 0
    raise UsageError("report needs a subcommand: fid")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rae-scale", description="Train and evaluate RAE + DiT-DH at cluster scale.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of user errors too (allowed anywhere on the command line)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("prepare", help="image folder or webdataset tars -> MDS / webdataset shards (Ray job)")
    _add_config_args(q)
    q.add_argument("--input", help="ImageNet-style class folders, flat folder, or a folder of webdataset tars "
                                   "(path or URL) [input]")
    q.add_argument("--output", help="shard destination (path or URL) [output]")
    q.add_argument("--resolution", type=int, help="ADM center-crop size, e.g. 256 or 512 [resolution]")
    q.add_argument("--format", choices=["mds", "wds"], help="shard format [format]")
    q.add_argument("--image-format", dest="image_format", choices=["jpeg", "png"], help="[image_format]")
    q.add_argument("--input-format", dest="input_format", choices=["auto", "folder", "wds"],
                   help="folder: class folders or flat folder + labels_file; wds: webdataset tars (BLIP3o layout: "
                        "<key>.jpg|png|webp + <key>.txt|json); auto (default): wds when the input holds .tar files "
                        "and no images [input_format]")
    q.add_argument("--source-name", dest="source_name",
                   help="the shards' source column (default: the input folder's name; tars: each tar's folder) "
                        "[source_name]")
    q.add_argument("--captions-file", dest="captions_file",
                   help="folder input: each image's caption, as JSON {file: caption}, JSON lines "
                        "{\"file\", \"caption\"} or <file><TAB><caption> lines [captions_file]")
    q.add_argument("--keep-uncaptioned", dest="keep_uncaptioned", action="store_true", default=None,
                   help="wds input: keep samples without a caption (caption \"\") instead of skipping them "
                        "[keep_uncaptioned]")
    q.add_argument("--ray-address", dest="ray_address", help="Ray cluster (default: local instance)")
    q.set_defaults(func=cmd_prepare)

    q = sub.add_parser("cache-latents", help="encode image shards into latent shards (Ray job)")
    _add_config_args(q)
    q.add_argument("--input")
    q.add_argument("--output")
    q.add_argument("--ray-address", dest="ray_address")
    q.set_defaults(func=cmd_cache_latents)

    q = sub.add_parser("cache-text", help="encode the captions of shards into text-encoder tokens (Ray job)")
    _add_config_args(q)
    q.add_argument("--input")
    q.add_argument("--output")
    q.add_argument("--ray-address", dest="ray_address")
    q.set_defaults(func=cmd_cache_text)

    q = sub.add_parser("stats", help="exact per-position latent mean/variance")
    _add_config_args(q)
    q.add_argument("--input")
    q.add_argument("--output")
    q.add_argument("--kind", choices=["latents", "images"])
    q.set_defaults(func=cmd_stats)

    q = sub.add_parser("train", help="train stage 1 (decoder) or stage 2 (DiT-DH)")
    q.add_argument("stage", choices=["stage1", "stage2"])
    _add_config_args(q)
    q.add_argument("--nproc", type=int, help="local ranks to spawn (ignored under torchrun/Slurm/Ray) [parallel.nproc]")
    q.add_argument("--run-dir", dest="run_dir", help="run folder or URL [run.dir]")
    q.add_argument("--max-steps", dest="max_steps", type=int, help="[training.max_steps]")
    q.add_argument("--strategy", choices=["ddp", "fsdp", "deepspeed"], help="[parallel.strategy]")
    q.add_argument("--precision", choices=["fp32", "bf16"], help="[parallel.precision]")
    q.set_defaults(func=cmd_train)

    for name, help_text in (("generate", "class-conditional or prompt-conditioned images from a stage-2 model"),
                            ("sample", "alias of generate")):
        q = sub.add_parser(name, help=help_text)
        _add_config_args(q)
        q.add_argument("--checkpoint", help="rae_scale run/step folder, exported file, or upstream .pt")
        q.add_argument("--class-ids", dest="class_ids", type=_parse_int_list, help="e.g. 207,388")
        q.add_argument("--prompt", dest="prompts", action="append",
                       help="text-to-image: a prompt (repeat the flag for several) [prompts]")
        q.add_argument("--prompts-file", dest="prompts_file", help="text-to-image: one prompt per line [prompts_file]")
        q.add_argument("--num-samples", dest="num_samples", type=int)
        q.add_argument("--cfg-scale", dest="cfg_scale", type=float)
        q.add_argument("--num-steps", dest="num_steps", type=int)
        q.add_argument("--mode", choices=["ode", "sde"])
        q.add_argument("--ig-scale", dest="ig_scale", type=float,
                       help="internal-guidance scale (dit_dh_ig; with --guidance ig or ig_cfg)")
        q.add_argument("--guidance", choices=["none", "cfg", "autoguidance", "ig", "ig_cfg"])
        q.add_argument("--seed", type=int)
        q.add_argument("--output", help="output folder")
        _add_random_weights_arg(q)
        q.set_defaults(func=cmd_generate)

    q = sub.add_parser("reconstruct", help="encode and decode one image, print PSNR")
    _add_config_args(q)
    q.add_argument("--image", required=True)
    q.add_argument("--checkpoint", help="stage-1 decoder: run/step folder (EMA), safetensors or upstream .pt "
                                        "[rae.decoder_checkpoint]")
    q.add_argument("--output")
    _add_random_weights_arg(q)
    q.set_defaults(func=cmd_reconstruct)

    q = sub.add_parser("evaluate", help="FID-50k and friends, spread over workers")
    esub = q.add_subparsers(dest="eval_cmd", metavar="WHAT", required=True)
    e = esub.add_parser("fid", help="sample from a stage-2 model and score FID/sFID/IS/precision/recall")
    _add_config_args(e)
    e.add_argument("--num-samples", dest="num_samples", type=int)
    e.add_argument("--label-sampling", dest="label_sampling", choices=["equal", "random"])
    e.add_argument("--batch-size", dest="batch_size", type=int)
    e.add_argument("--reference", help="ADM reference npz, image folder or shards")
    e.add_argument("--checkpoint", help="stage-2 run/step folder (EMA), exported file or upstream .pt "
                                        "[sample.checkpoint]")
    e.add_argument("--output", help="output folder; its progress/ is resumed only by the same sampling settings")
    _add_spaces_args(e)
    e.add_argument("--from-results", dest="from_results", metavar="FILE",
                   help="re-run exactly the evaluation a results.json recorded (same checkpoint step, sampler, "
                        "seeds, reference, spaces); output goes to --output or a rerun/ folder beside FILE")
    _add_random_weights_arg(e)
    e = esub.add_parser("recon", help="rFID, PSNR, SSIM of a stage-1 model over a dataset")
    _add_config_args(e)
    e.add_argument("--num-samples", dest="num_samples", type=int)
    e.add_argument("--batch-size", dest="batch_size", type=int)
    e.add_argument("--reference")
    e.add_argument("--checkpoint", help="stage-1 decoder: run/step folder (EMA), safetensors or upstream .pt "
                                        "[sample.rae.decoder_checkpoint]")
    e.add_argument("--output")
    _add_random_weights_arg(e)
    e = esub.add_parser("t2i", help="text-to-image: samples for every prompt over all ranks (resumable), CLIP "
                                    "score overall and per prompt, FID with --reference")
    _add_config_args(e)
    e.add_argument("--checkpoint", help="stage-2 run/step folder (EMA), exported file or upstream .pt "
                                        "[sample.checkpoint]")
    e.add_argument("--prompts-file", dest="prompts_file", help="one prompt per line [sample.prompts_file]")
    e.add_argument("--prompt", dest="prompts", action="append",
                   help="a prompt (repeat the flag for several; added before the file's) [sample.prompts]")
    e.add_argument("--clip-model", dest="clip_model",
                   help="transformers CLIPModel folder (save_pretrained) or a hub name in the local cache [clip_model]")
    e.add_argument("--num-samples", dest="num_samples", type=int,
                   help="samples in all, spread equally over the prompts [num_samples]")
    e.add_argument("--batch-size", dest="batch_size", type=int)
    e.add_argument("--cfg-scale", dest="cfg_scale", type=float,
                   help="[sample.guidance.scale]; other than 1 turns CFG on (sample.guidance.method=cfg)")
    e.add_argument("--num-steps", dest="num_steps", type=int, help="[sample.sampler.num_steps]")
    e.add_argument("--seed", type=int, help="[sample.seed]")
    e.add_argument("--reference", help="ADM reference npz, image folder or shards: adds FID [reference]")
    e.add_argument("--output", help="output folder; its progress/ is resumed only by the same sampling settings")
    _add_random_weights_arg(e)
    e = esub.add_parser("folders", help="FID and sFID (FD / FD_r / MIND per feature space with --spaces) "
                                        "between two image folders or npz files")
    e.add_argument("a")
    e.add_argument("b")
    e.add_argument("--pr", action="store_true", help="also precision/recall")
    e.add_argument("--inception-weights", dest="inception_weights")
    _add_spaces_args(e)
    q.set_defaults(func=cmd_evaluate)

    q = sub.add_parser("launch", help="run a job on this machine, on Slurm or on Ray")
    q.add_argument("target", choices=["local", "slurm", "ray"])
    q.add_argument("job_args", nargs=argparse.REMAINDER, metavar="JOB ARGS",
                   help="e.g. stage2 CONFIG key=value ...")
    q.add_argument("--job", default="train", choices=["train", "prepare", "cache-latents", "evaluate"],
                   help="which job the launched script runs (default train)")
    q.add_argument("--nproc", type=int, default=2, help="local: ranks")
    q.add_argument("--nodes", type=int)
    q.add_argument("--gpus-per-node", dest="gpus_per_node", type=int)
    q.add_argument("--cpus-per-task", dest="cpus_per_task", type=int)
    q.add_argument("--partition")
    q.add_argument("--time")
    q.add_argument("--job-name", dest="job_name")
    q.add_argument("--address", help="Ray dashboard/jobs address, e.g. http://127.0.0.1:8265")
    q.add_argument("--dry-run", dest="dry_run", action="store_true", help="slurm: print the script only")
    q.add_argument("--no-follow", dest="no_follow", action="store_true", help="ray: do not stream logs")
    q.add_argument("--min-workers", dest="min_workers", type=int, help="ray: elastic, fewest workers to restart with")
    q.add_argument("--max-workers", dest="max_workers", type=int, help="ray: elastic, most workers")
    q.add_argument("--max-failures", dest="max_failures", type=int, help="ray: restarts after failures (-1: forever)")
    q.add_argument("--max-preemptions", dest="max_preemptions", type=int,
                   help="ray: restarts after node preemptions, counted apart (-1: forever)")
    q.set_defaults(func=cmd_launch)

    q = sub.add_parser("convert", help="checkpoint formats: EMA safetensors, consolidated, diffusers, upstream")
    q.add_argument("kind", choices=["ema-safetensors", "consolidate", "to-diffusers", "from-diffusers",
                                    "to-upstream", "from-upstream"])
    q.add_argument("source")
    q.add_argument("output")
    q.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    q.add_argument("--config", help="job config that describes the model (for formats without one)")
    q.set_defaults(func=cmd_convert)

    q = sub.add_parser("config", help="show a resolved config or import an upstream one")
    csub = q.add_subparsers(dest="config_cmd", metavar="WHAT", required=True)
    c = csub.add_parser("show", help="print the resolved config of a job")
    c.add_argument("job", choices=sorted(j.replace("_", "-") for j in C.JOBS))
    _add_config_args(c)
    c = csub.add_parser("import-upstream", help="convert an upstream RAE YAML into a rae_scale config")
    c.add_argument("upstream_yaml")
    c.add_argument("-o", "--output")
    q.set_defaults(func=cmd_config)

    q = sub.add_parser("plan", help="memory and throughput per strategy / AC / micro-batch; what fits on N GPUs")
    q.add_argument("job", choices=["stage1", "stage2"])
    _add_config_args(q)
    q.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    q.add_argument("--gpu", default="h100", help="accelerator: h100, h200, a100, a100-40, l40s, a10")
    q.add_argument("--gpu-memory", dest="gpu_memory", type=float, help="GiB per GPU (default: the GPU's)")
    q.add_argument("--gpus-per-node", dest="gpus_per_node", type=int, default=8)
    q.add_argument("--mfu", type=float, default=0.35, help="model FLOP utilisation the step time assumes")
    q.add_argument("--dataset-size", dest="dataset_size", type=int, default=1_281_167,
                   help="images per epoch, for epoch-based runs (default ImageNet-1k train)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_plan)

    q = sub.add_parser("quickstart", help="the whole pipeline, tiny, on this machine")
    q.add_argument("--out", default="quickstart_out", help="output folder (default quickstart_out/)")
    q.add_argument("--reduced", action="store_true", help="a shorter run for CI")
    q.add_argument("--nproc", type=int, default=2, help="local ranks of each training stage (1: in this process)")
    q.set_defaults(func=cmd_quickstart)

    q = sub.add_parser("sweep", help="a grid of training runs as Ray Tune trials: resumable, with a report")
    q.add_argument("stage", choices=["stage1", "stage2"])
    _add_config_args(q)
    q.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values (repeat for more keys: the cartesian product)")
    q.add_argument("--grid-file", dest="grid_file", help="YAML: grid (key: [values]), overrides, config, stage, metric")
    q.add_argument("--output", help="sweep folder (default runs/sweeps/<stage>_<config name>); rerun to resume")
    q.add_argument("--ray-address", dest="ray_address", help="Ray cluster (default: a local instance)")
    q.add_argument("--max-concurrent", dest="max_concurrent", type=int, help="trials running at once")
    q.add_argument("--ranks-per-trial", dest="ranks_per_trial", type=int, help="ranks of each trial [parallel.nproc]")
    q.add_argument("--cpus-per-trial", dest="cpus_per_trial", type=float, help="Ray CPUs per trial (default: ranks)")
    q.add_argument("--gpus-per-trial", dest="gpus_per_trial", type=float, default=0.0, help="Ray GPUs per trial")
    q.add_argument("--scheduler", choices=["none", "asha"], help="early stopping on --metric")
    q.add_argument("--metric", help="metrics.jsonl column for the scheduler and the best trial (default loss)")
    q.add_argument("--mode", choices=["min", "max"], help="whether lower or higher --metric is better (default min)")
    q.add_argument("--max-trials", dest="max_trials", type=int, default=64, help="refuse larger grids (default 64)")
    q.add_argument("--allow-large", dest="allow_large", action="store_true", help="run a grid above --max-trials")
    q.set_defaults(func=cmd_sweep)

    q = sub.add_parser("report", help="figures of a finished or running run from its metrics.jsonl")
    rsub = q.add_subparsers(dest="report_cmd", metavar="WHAT", required=True)
    r = rsub.add_parser("fid", help="online FID against epochs (E@FID-k marked) as a PNG and a CSV beside it")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a stage-2 run folder (local or URL) with online FID rows")
    r.add_argument("--output", help="the PNG (default RUN_DIR/fid_vs_epochs.png); the CSV gets its stem")
    q.set_defaults(func=cmd_report)
    return p


_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
# By module, looked up only when it is loaded (else the error cannot be one of them): our own errors
# raised away from the config (a checkpoint that does not load, a diverged loss: the message says what
# to do), and those of the libraries storage goes through that mean a bad URL, endpoint or credentials.
_MODULE_USER_ERRORS = {"rae_scale.checkpoint.manager": ("CheckpointLoadError",),
                       "rae_scale.train.errors": ("NonFiniteLossError",),
                       "botocore.exceptions": ("NoCredentialsError", "PartialCredentialsError",
                                               "EndpointConnectionError", "ParamValidationError")}
_FSSPEC_URL_ERRORS = ("Protocol not known", "Install ")


def _fsspec_url_error(exc: BaseException) -> bool:
    """fsspec's word on a URL whose protocol is unknown or whose filesystem package is missing."""
    if not isinstance(exc, (ValueError, ImportError)) or not str(exc).startswith(_FSSPEC_URL_ERRORS):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}fsspec{os.sep}" in frames[-1].filename


def user_error_message(exc: BaseException) -> str | None:
    """One line for an error the user caused (bad config, missing file, bad URL, unreadable checkpoint),
    or None for anything else: a bug, whose traceback must stay visible."""
    cause = getattr(exc, "cause", None)  # Ray re-raises a task's error wrapped; its own text is a traceback
    root = cause if isinstance(cause, BaseException) else exc
    user = isinstance(root, (C.ConfigError, UsageError, *_FILE_ERRORS)) or _fsspec_url_error(root)
    for module, names in _MODULE_USER_ERRORS.items():
        mod = sys.modules.get(module)
        user = user or (mod is not None and isinstance(root, tuple(getattr(mod, n) for n in names if hasattr(mod, n))))
    if not user:
        return None
    if isinstance(root, OSError) and root.filename is not None and root.strerror:
        text = f"{root.strerror}: {root.filename}" + (f" -> {root.filename2}" if root.filename2 else "")
    else:
        text = str(root) or type(root).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(root).__name__]
    return C.redact(lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else ""))


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`--debug` may stand anywhere on the command line; it is inherited by the processes we start."""
    debug = "--debug" in argv or os.environ.get("RAE_SCALE_DEBUG") == "1"
    if debug:
        os.environ["RAE_SCALE_DEBUG"] = "1"
    return [a for a in argv if a != "--debug"], debug


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argparse, but `key=value` overrides (and the config file) may also follow the flags:
    `train stage2 CFG --nproc 2 training.max_steps=5`. Unknown `--flags` stay argparse's error."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "config_and_overrides") and not any(x.startswith("-") for x in extra):
            args.config_and_overrides = list(args.config_and_overrides or []) + extra
        else:
            parser.error("unrecognized arguments: " + " ".join(C.redact(extra)))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from rae_scale.logs import setup_logging

    own_argv = argv is None
    argv, debug = _pop_debug(list(sys.argv[1:] if own_argv else argv))
    parser = build_parser()
    args = parse_args(parser, argv)
    if own_argv:  # parsed: what libraries record as the command line (wandb, error reports) is redacted
        sys.argv = C.redact(sys.argv)
    setup_logging(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or debug:  # a bug (or --debug): the whole traceback, secrets redacted
            sys.stderr.write(C.redact(traceback.format_exc()))
        if message is None:
            return 1
        print(f"rae-scale: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def entry() -> None:
    """The process entry point (console script and `python -m`): main, then exit.

    gc.freeze() first: the interpreter's last garbage collections walk every object torch,
    transformers and sympy created (seconds per process, paid by every rank of every run); frozen
    objects are skipped. atexit handlers and open files are still run and closed as usual.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
