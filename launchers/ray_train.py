"""Training under Ray Train: `python -m launchers.ray_train [options] CONFIG [key=value ...]`.

Meant as a Ray job's entrypoint (`ray job submit -- python -m launchers.ray_train ...`). A
TorchTrainer starts the workers and their process group; each worker runs the same training main
as the CLI, in-process, which joins that group (RANK, WORLD_SIZE, ... are set by Ray). When a worker
dies, FailureConfig restarts the whole group and the training code resumes from the newest committed
checkpoint in run.dir, which therefore has to be storage every node reaches (shared disk or s3://).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from rae_scale.config import redact
from rae_scale.logs import RedactingFormatter
from rae_scale.storage import is_remote

log = logging.getLogger(__name__)

DEFAULT_ENTRY = "rae_scale.commands.cli:main"
STAGES = ("stage1", "stage2")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise SystemExit(f"{name}={value!r} is not an integer") from None


def resolve_run_dir(config: str | None, overrides: Sequence[str]) -> str:
    """run.dir as the trainer will see it: the last override, else the YAML's, else runs/default."""
    for item in reversed(list(overrides)):
        key, _, value = item.partition("=")
        if key.strip() == "run.dir":
            return value
    if config and Path(config).is_file():
        import yaml

        data = yaml.safe_load(Path(config).read_text()) or {}
        run = data.get("run") or {}
        if isinstance(run, dict) and run.get("dir"):
            return str(run["dir"])
    return "runs/default"


def absolute_args(config: str | None, overrides: Sequence[str]) -> tuple[str | None, list[str], str]:
    """Make CONFIG and a local run.dir absolute: Ray workers do not run in the driver's directory."""
    run_dir = resolve_run_dir(config, overrides)
    if not is_remote(run_dir):
        run_dir = str(Path(run_dir.removeprefix("file://")).expanduser().resolve())
    config = str(Path(config).resolve()) if config and Path(config).exists() else config
    overrides = [o for o in overrides if o.partition("=")[0].strip() != "run.dir"] + [f"run.dir={run_dir}"]
    return config, overrides, run_dir


def train_worker(loop_config: dict) -> None:
    """Ray Train worker: call `entry(argv)` in this process; a non-zero return fails the attempt."""
    module_name, _, func_name = loop_config["entry"].partition(":")
    if loop_config.get("pythonpath"):
        sys.path[:0] = [p for p in loop_config["pythonpath"] if p not in sys.path]
    func = getattr(importlib.import_module(module_name), func_name or "main")
    try:
        code = func(list(loop_config["argv"]))
    except SystemExit as exc:  # a CLI main may exit instead of returning
        code = exc.code
    if code not in (0, None):
        raise RuntimeError(f"{loop_config['entry']} {shlex.join(redact(loop_config['argv']))} "
                           f"returned exit code {code}")


def build_trainer(*, entry: str, argv: Sequence[str], num_workers: int, use_gpu: bool, cpus_per_worker: float,
                  max_failures: int, storage_path: str, name: str, pythonpath: Sequence[str] = ()):
    """The TorchTrainer that runs `entry(argv)` on `num_workers` workers."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if max_failures < -1:
        raise ValueError(f"max_failures must be >= -1 (-1 = retry forever), got {max_failures}")
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_worker,
        train_loop_config={"entry": entry, "argv": list(argv), "pythonpath": list(pythonpath)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launchers.ray_train", description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=STAGES, default=os.environ.get("RAE_SCALE_STAGE", "stage2"))
    p.add_argument("--num-workers", type=int, default=_env_int("RAE_SCALE_RAY_NUM_WORKERS", 2))
    p.add_argument("--use-gpu", action="store_true", default=os.environ.get("RAE_SCALE_RAY_USE_GPU") == "1")
    p.add_argument("--cpus-per-worker", type=float, default=float(os.environ.get("RAE_SCALE_RAY_CPUS_PER_WORKER", 1)))
    p.add_argument("--max-failures", type=int, default=_env_int("RAE_SCALE_RAY_MAX_FAILURES", 3),
                   help="worker-group restarts before giving up (-1: forever)")
    p.add_argument("--storage-path", default=os.environ.get("RAE_SCALE_RAY_STORAGE"),
                   help="Ray Train storage (default: run.dir)")
    p.add_argument("--name", default="ray_train", help="Ray Train run name (a folder under the storage)")
    p.add_argument("--entry", default=DEFAULT_ENTRY,
                   help="MODULE:FUNCTION called with the argv list; rae_scale.commands.cli:main gets 'train STAGE' first")
    p.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [key=value ...]")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    items = list(args.config_and_overrides)
    config = items.pop(0) if items and "=" not in items[0] else None
    config, overrides, run_dir = absolute_args(config, items)
    prefix = ["train", args.stage] if args.entry == DEFAULT_ENTRY else []
    worker_argv = [*prefix, *([config] if config else []), *overrides]
    storage = args.storage_path or run_dir
    if not is_remote(storage):
        storage = str(Path(storage).resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(entry=args.entry, argv=worker_argv, num_workers=args.num_workers,
                            use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                            max_failures=args.max_failures, storage_path=storage, name=args.name,
                            pythonpath=[str(Path.cwd())])
    log.info("Ray Train: %d worker(s), entry %s %s", args.num_workers, args.entry, shlex.join(redact(worker_argv)))
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError once max_failures is spent
        log.error("Ray Train run failed: %s", exc)
        return 1
    if getattr(result, "error", None):
        log.error("Ray Train run failed: %s", result.error)
        return 1
    return 0


if __name__ == "__main__":
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("[launchers.ray_train] %(message)s"))  # it echoes the workers' argv
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    sys.exit(main())
