"""Render the sbatch templates in slurm/ for one job and submit them with sbatch.

Training and evaluation run one torchrun agent per node (launchers.local, started by srun);
prepare and cache-latents start a Ray cluster over the allocation. Every script is `--requeue`,
gets USR2 `signal_seconds` before its time limit, passes it to the ranks, and requeues itself when
they exit with the preemption code 75.
"""
from __future__ import annotations

import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from launchers.render import render_template
from rae_scale.config import redact

log = logging.getLogger(__name__)

# job -> (template, python arguments placed before CONFIG [overrides])
JOBS: dict[str, tuple[str, tuple[str, ...]]] = {
    "stage1": ("stage1.sbatch", ("-m", "rae_scale.commands.cli", "train", "stage1")),
    "stage2": ("stage2.sbatch", ("-m", "rae_scale.commands.cli", "train", "stage2")),
    "evaluate": ("evaluate.sbatch", ("-m", "rae_scale.commands.cli", "evaluate", "fid")),
    "prepare": ("prepare.sbatch", ("-m", "rae_scale.commands.cli", "prepare")),
    "cache-latents": ("prepare.sbatch", ("-m", "rae_scale.commands.cli", "cache-latents")),
}
EVAL_KINDS = ("fid", "recon", "folders")
# Slurm's --time spellings: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|"
                   r"UNLIMITED|INFINITE)$")
_OUTPUT = re.compile(r"^#SBATCH\s+--output=(\S+)", re.MULTILINE)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def sbatch_header(*, job_name: str, nodes: int, gpus_per_node: int, cpus_per_task: int, partition: str | None,
                  time: str, signal_seconds: int, log_dir: str, extra_sbatch: Sequence[str] = ()) -> str:
    """The #SBATCH lines: one task (agent) per node, requeue, early USR2, one appended log per job."""
    _check(bool(job_name) and not re.search(r"\s", job_name),
           f"job_name must be a non-empty word without spaces, got {job_name!r}")
    _check(nodes >= 1, f"nodes must be >= 1, got {nodes}")
    _check(gpus_per_node >= 0, f"gpus_per_node must be >= 0, got {gpus_per_node}")
    _check(cpus_per_task >= 1, f"cpus_per_task must be >= 1, got {cpus_per_task}")
    _check(bool(_TIME.match(str(time))),
           f"time {time!r} is not a Slurm time; allowed: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS")
    _check(0 <= signal_seconds <= 65535, f"signal_seconds must be in [0, 65535], got {signal_seconds}")
    for opt in extra_sbatch:
        _check(opt.startswith("--") and "\n" not in opt,
               f"extra_sbatch entries must be single long options like '--account=X', got {opt!r}")
    lines = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1",
             f"--cpus-per-task={cpus_per_task}"]
    if gpus_per_node:
        lines.append(f"--gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"--partition={partition}")
    lines += [f"--time={time}", "--requeue"]
    if signal_seconds:
        lines.append(f"--signal=B:USR2@{signal_seconds}")
    log_path = Path(log_dir).expanduser().resolve() / "%x-%j.log"
    lines += [f"--output={log_path}", "--open-mode=append", *extra_sbatch]
    return "\n".join(f"#SBATCH {line}" for line in lines)


def render_sbatch(job: str, *, config: str | None, overrides: Sequence[str], nodes: int, gpus_per_node: int,
                  cpus_per_task: int, partition: str | None, time: str, signal_seconds: int, job_name: str,
                  log_dir: str, extra_sbatch: Sequence[str] = (), nproc_per_node: int | None = None,
                  entry: Sequence[str] | None = None, workdir: str | None = None,
                  python: str | None = None) -> str:
    """The batch script for `job` (stage1, stage2, evaluate, prepare, cache-latents).

    The ranks run `python <entry> CONFIG <overrides>`; entry defaults to the job's rae-scale
    subcommand (JOBS). nproc_per_node defaults to gpus_per_node (1 on CPU nodes). workdir (default:
    the current directory) and python (default: this interpreter) must exist on the compute nodes.
    """
    if job not in JOBS:
        raise ValueError(f"unknown Slurm job '{job}'; allowed: {', '.join(JOBS)}")
    template, default_entry = JOBS[job]
    for item in overrides:
        _check("=" in item, f"override {item!r} is not key=value")
    nproc = nproc_per_node if nproc_per_node is not None else max(1, gpus_per_node)
    _check(nproc >= 1, f"nproc_per_node must be >= 1, got {nproc}")
    program = [*(entry or default_entry), *([config] if config else []), *overrides]
    values = {
        "sbatch_header": sbatch_header(job_name=job_name, nodes=nodes, gpus_per_node=gpus_per_node,
                                       cpus_per_task=cpus_per_task, partition=partition, time=time,
                                       signal_seconds=signal_seconds, log_dir=log_dir,
                                       extra_sbatch=extra_sbatch),
        "signal_seconds": signal_seconds,
        "workdir": shlex.quote(str(Path(workdir or Path.cwd()).resolve())),
        "python": shlex.quote(python or sys.executable),
        "program": shlex.join(program),
    }
    if template == "prepare.sbatch":
        values["gpus_per_node"] = gpus_per_node
    else:
        values["nproc_per_node"] = nproc
        values["omp_threads"] = max(1, cpus_per_task // nproc)
    return render_template(template, values)


def submit_sbatch(script_text: str, *, dry_run: bool = False) -> str | None:
    """Submit the script with `sbatch --parsable` and return the job id; dry_run prints it instead."""
    if dry_run:
        sys.stdout.write(script_text)
        return None
    for out in _OUTPUT.findall(script_text):  # Slurm does not create the log folder itself
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["sbatch", "--parsable"], input=script_text, capture_output=True, text=True,
                              check=False)
    except FileNotFoundError:
        raise RuntimeError("sbatch not found on PATH: run this on a Slurm login node "
                           "(or use `rae-scale launch local` / `launch ray`)") from None
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    log.info("submitted Slurm job %s", job_id)
    return job_id


def split_job_args(job: str, job_args: Sequence[str]) -> tuple[str, list[str], str | None, list[str]]:
    """`rae-scale launch slurm` arguments -> (template job, entry, config, overrides).

    train: `stage1|stage2 [CONFIG] [k=v ...]`; evaluate: `[fid|recon|folders] [CONFIG] [k=v ...]`;
    prepare / cache-latents: `[CONFIG] [k=v ...]`.
    """
    args = list(job_args)
    if job == "train":
        if not args or args[0] not in ("stage1", "stage2"):
            raise ValueError("launch slurm --job train needs the stage first: stage1 or stage2")
        job = args.pop(0)
    if job not in JOBS:
        raise ValueError(f"unknown job '{job}'; allowed: train, evaluate, prepare, cache-latents")
    entry = list(JOBS[job][1])
    if job == "evaluate" and args and args[0] in EVAL_KINDS:
        entry[-1] = args.pop(0)
    config = args.pop(0) if args and "=" not in args[0] else None
    return job, entry, config, args


def launch_slurm(cfg, job_args: Sequence[str], *, dry_run: bool = False, job: str = "train") -> int:
    """`rae-scale launch slurm`: render the script for `job` from a LaunchJob config and submit it."""
    name, entry, config, overrides = split_job_args(job, job_args)
    if dry_run:  # the printout is for reading: secrets (storage keys, user:pass@ URLs) show as ***
        shown = redact(overrides)
        if shown != overrides:
            print("rae-scale: secret values are shown as *** in this printout; a submitted script carries them",
                  file=sys.stderr)
        overrides = shown
    script = render_sbatch(name, config=config, overrides=overrides, nodes=cfg.nodes,
                           gpus_per_node=cfg.gpus_per_node, cpus_per_task=cfg.cpus_per_task,
                           partition=cfg.partition, time=cfg.time, signal_seconds=cfg.signal_seconds,
                           job_name=cfg.job_name, log_dir=cfg.log_dir, entry=entry)
    job_id = submit_sbatch(script, dry_run=dry_run)
    if job_id is not None:
        print(f"submitted Slurm job {job_id}; log: {Path(cfg.log_dir).resolve()}/{cfg.job_name}-{job_id}.log")
    return 0
