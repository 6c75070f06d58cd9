"""Training under Ray Train: `python -m launchers.ray_train [options] CONFIG [key=value ...]`.

Meant as a Ray job's entrypoint (`ray job submit -- python -m launchers.ray_train ...`). A
TorchTrainer starts the workers and their process group; each worker runs the same training main
as the CLI, in-process, which joins that group (RANK, WORLD_SIZE, ... are set by Ray). When a worker
dies, FailureConfig restarts the whole group and the training code resumes from the newest committed
checkpoint in run.dir, which therefore has to be storage every node reaches (shared disk or s3://).

Elastic runs (`--min-workers/--max-workers`) use Ray Train V2's `ScalingConfig(num_workers=(min, max))`
(V2 is Ray 2.60's default; RAY_TRAIN_V2_ENABLED=0 turns it off and is refused here): after a loss the
group restarts with as many workers as the cluster has room for, at least min, and the platform lays
the same global batch out over the new world size (micro-batch x accumulation, training/batching.py)
while the data loader's checkpointed position yields the same sequence of global batches. Workers
lost to a node preemption (a drain with reason PREEMPTION: spot reclaims) are charged to
`--max-preemptions`, every other loss to `--max-failures`.
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


def worker_count(num_workers: int, min_workers: int | None = None, max_workers: int | None = None) -> int | tuple[int, int]:
    """Ray Train's num_workers: a fixed int, or (min, max) when either bound is given (max defaults to
    num_workers, min to 1). min == max is a fixed group. Bad bounds raise a one-line ValueError."""
    if min_workers is None and max_workers is None:
        if num_workers < 1:
            raise ValueError(f"--num-workers must be >= 1, got {num_workers}")
        return num_workers
    lo = 1 if min_workers is None else min_workers
    hi = num_workers if max_workers is None else max_workers
    if lo < 1:
        raise ValueError(f"--min-workers must be >= 1, got {lo}")
    if hi < 1:
        raise ValueError(f"--max-workers must be >= 1, got {hi}")
    if lo > hi:
        raise ValueError(f"--min-workers ({lo}) must be <= --max-workers ({hi})")
    return lo if lo == hi else (lo, hi)


def check_elastic_batch(stage: str, config: str | None, overrides: Sequence[str], workers: tuple[int, int]) -> None:
    """Refuse, before anything starts, an elastic range some world size of which cannot hold the run's
    global batch (a restart on that many workers would fail in the loop's batch_layout)."""
    from rae_scale.config import JOBS, load_config
    from rae_scale.train.batching import batch_layout
    from rae_scale.train.errors import TrainingSetupError

    t = load_config(JOBS[stage], config, list(overrides)).training
    bad = []
    for world in range(workers[0], workers[1] + 1):
        try:
            batch_layout(t.global_batch_size, t.micro_batch_size, t.grad_accum_steps, world)
        except TrainingSetupError:
            bad.append(world)
    if bad:
        fixed = "" if t.micro_batch_size is None else " and leave training.micro_batch_size unset"
        raise ValueError(f"training.global_batch_size={t.global_batch_size} with grad_accum_steps="
                         f"{t.grad_accum_steps} cannot be laid out on {', '.join(map(str, bad))} worker(s) of the "
                         f"elastic range {workers[0]}..{workers[1]}; narrow --min-workers/--max-workers{fixed}")


def _check_budget(flag: str, value: int) -> None:
    if value < -1:
        raise ValueError(f"{flag} must be >= -1 (-1 = retry forever, 0 = never), got {value}")


def build_trainer(*, entry: str, argv: Sequence[str], num_workers: int | tuple[int, int], use_gpu: bool,
                  cpus_per_worker: float, max_failures: int, storage_path: str, name: str,
                  pythonpath: Sequence[str] = (), max_preemptions: int = -1, resize_interval_s: float = 60.0):
    """The TorchTrainer that runs `entry(argv)` on `num_workers` workers, or elastically on
    (min, max) of them; worker losses to preemption and to anything else have separate budgets."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if isinstance(num_workers, tuple):
        lo, hi = num_workers
        num_workers = worker_count(hi, lo, hi)
    else:
        num_workers = worker_count(num_workers)
    _check_budget("--max-failures", max_failures)
    _check_budget("--max-preemptions", max_preemptions)
    if resize_interval_s < 0:
        raise ValueError(f"--resize-interval must be >= 0 seconds, got {resize_interval_s}")
    if not _train_v2():
        if isinstance(num_workers, tuple):
            raise ValueError("--min-workers/--max-workers need Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0")
        if max_preemptions != -1:
            raise ValueError("--max-preemptions needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0")
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    scaling = {"elastic_resize_monitor_interval_s": resize_interval_s} if isinstance(num_workers, tuple) else {}
    failures = {"max_preemption_failures": max_preemptions} if _train_v2() else {}
    return TorchTrainer(
        train_worker,
        train_loop_config={"entry": entry, "argv": list(argv), "pythonpath": list(pythonpath)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     **scaling),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures, **failures)),
    )


def _train_v2() -> bool:
    """Whether `ray.train` is Ray Train V2 (Ray 2.60's default), which has elasticity and preemption budgets."""
    from ray.train.v2._internal.constants import is_v2_enabled

    return is_v2_enabled()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launchers.ray_train", description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=STAGES, default=os.environ.get("RAE_SCALE_STAGE", "stage2"))
    p.add_argument("--num-workers", type=int, default=_env_int("RAE_SCALE_RAY_NUM_WORKERS", 2))
    p.add_argument("--use-gpu", action="store_true", default=os.environ.get("RAE_SCALE_RAY_USE_GPU") == "1")
    p.add_argument("--cpus-per-worker", type=float, default=float(os.environ.get("RAE_SCALE_RAY_CPUS_PER_WORKER", 1)))
    p.add_argument("--max-failures", type=int, default=_env_int("RAE_SCALE_RAY_MAX_FAILURES", 3),
                   help="worker-group restarts after failures other than preemption before giving up (-1: forever)")
    p.add_argument("--min-workers", type=int, default=None,
                   help="elastic: the fewest workers the group may restart with (default 1 when --max-workers is set)")
    p.add_argument("--max-workers", type=int, default=None,
                   help="elastic: the most workers the group may run on (default --num-workers when --min-workers is set)")
    p.add_argument("--max-preemptions", type=int, default=_env_int("RAE_SCALE_RAY_MAX_PREEMPTIONS", -1),
                   help="restarts after workers lost to a node preemption, counted apart from --max-failures "
                        "(-1: forever, Ray's default)")
    p.add_argument("--resize-interval", type=float, default=60.0,
                   help="elastic: seconds between checks whether a running group can grow")
    p.add_argument("--storage-path", default=os.environ.get("RAE_SCALE_RAY_STORAGE"),
                   help="Ray Train storage (default: run.dir)")
    p.add_argument("--name", default="ray_train", help="Ray Train run name (a folder under the storage)")
    p.add_argument("--entry", default=DEFAULT_ENTRY,
                   help="MODULE:FUNCTION called with the argv list; rae_scale.commands.cli:main gets 'train STAGE' first")
    p.add_argument("config_and_overrides", nargs="*", metavar="[CONFIG] [key=value ...]")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        workers = worker_count(args.num_workers, args.min_workers, args.max_workers)
        _check_budget("--max-failures", args.max_failures)
        _check_budget("--max-preemptions", args.max_preemptions)
    except ValueError as exc:
        raise SystemExit(f"launchers.ray_train: error: {exc}") from None
    items = list(args.config_and_overrides)
    config = items.pop(0) if items and "=" not in items[0] else None
    config, overrides, run_dir = absolute_args(config, items)
    prefix = ["train", args.stage] if args.entry == DEFAULT_ENTRY else []
    if isinstance(workers, tuple) and args.entry == DEFAULT_ENTRY:
        try:
            check_elastic_batch(args.stage, config, overrides, workers)
        except ValueError as exc:  # ConfigError is one too: a bad key fails here, not on every worker
            raise SystemExit(f"launchers.ray_train: error: {exc}") from None
    worker_argv = [*prefix, *([config] if config else []), *overrides]
    storage = args.storage_path or run_dir
    if not is_remote(storage):
        storage = str(Path(storage).resolve())
        Path(storage).mkdir(parents=True, exist_ok=True)
    try:
        trainer = build_trainer(entry=args.entry, argv=worker_argv, num_workers=workers, use_gpu=args.use_gpu,
                                cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                                max_preemptions=args.max_preemptions, resize_interval_s=args.resize_interval,
                                storage_path=storage, name=args.name, pythonpath=[str(Path.cwd())])
    except ValueError as exc:
        raise SystemExit(f"launchers.ray_train: error: {exc}") from None
    size = f"{workers[0]}..{workers[1]} (elastic)" if isinstance(workers, tuple) else str(workers)
    log.info("Ray Train: %s worker(s), max %d failure(s), max %d preemption(s), entry %s %s", size,
             args.max_failures, args.max_preemptions, args.entry, shlex.join(redact(worker_argv)))
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
