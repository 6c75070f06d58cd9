"""A tiny but real data-parallel training program with the rae_scale training CLI's contract.

Used by the launcher integration tests (Slurm, Ray, multi-node torchrun) until they switch to the
real `rae_scale.cli train stage2 configs/stage2/tiny_cpu.yaml`. Like the real trainer it takes
`CONFIG [key=value ...]`, joins the distributed environment it was started in (torchrun, srun,
Ray Train: RANK, WORLD_SIZE, MASTER_ADDR...; or no environment = one process), saves a checkpoint
every few steps, resumes from the newest one in run.dir, and on SIGUSR2/SIGTERM agrees with the
other ranks on a stop step, saves and exits with 75.

The model is linear regression in float64 trained with SGD + momentum on batches that depend only
on (seed, step), split evenly over the ranks, so the loss trajectory is the same for any world size
up to rounding and resume must reproduce it exactly.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_CODE_PREEMPTED = 75

# ---------------------------------------------------------------------------------------------------
# THE ONE LINE TO SWITCH the launcher tests to the real trainer:
# (python args before CONFIG, CONFIG, overrides that make a run slow enough to be preempted mid-way).
# Real trainer: (("-m", "rae_scale.cli", "train", "stage2"), "configs/stage2/tiny_cpu.yaml", ())
TRAINING = ((str(Path(__file__).resolve()),), str(Path(__file__).with_name("tiny_ddp_train.yaml")), ("train.step_sleep=1.5",))
# ---------------------------------------------------------------------------------------------------

DEFAULTS = {"run": {"dir": "runs/tiny_ddp"},
            "train": {"steps": 12, "save_every": 4, "lr": 0.05, "momentum": 0.9, "seed": 0,
                      "global_batch": 8, "dim": 6, "step_sleep": 0.0}}


def read_losses(run_dir: str | os.PathLike) -> dict[int, float]:
    """step -> global mean loss, as logged by rank 0 (the last entry wins after a resume)."""
    out: dict[int, float] = {}
    path = Path(run_dir) / "losses.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def load_config(argv: list[str]) -> dict:
    """YAML file then dotted key=value overrides, only the keys in DEFAULTS."""
    import yaml

    cfg = json.loads(json.dumps(DEFAULTS))
    items = list(argv)
    if items and "=" not in items[0]:
        loaded = yaml.safe_load(Path(items.pop(0)).read_text()) or {}
        items = [f"{a}.{b}={v}" for a, sect in loaded.items() for b, v in sect.items()] + items
    for item in items:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in cfg or name not in cfg[section]:
            raise SystemExit(f"tiny_ddp_train: unknown override '{item}'")
        default = cfg[section][name]
        cfg[section][name] = type(default)(value) if not isinstance(default, str) else str(value)
    return cfg


def batch_for_step(step: int, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    t = cfg["train"]
    g = torch.Generator().manual_seed(t["seed"] * 100_003 + step)
    x = torch.randn(t["global_batch"], t["dim"], generator=g, dtype=torch.float64)
    w_true = torch.arange(1, t["dim"] + 1, dtype=torch.float64) / t["dim"]
    y = x @ w_true + 0.1 * torch.randn(t["global_batch"], generator=g, dtype=torch.float64)
    return x, y


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _newest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(ckpt_dir.glob("step_*.pt"))
    return done[-1] if done else None


def _save(ckpt_dir: Path, step: int, model, opt) -> None:
    """Rank 0 writes to a temporary name and renames: a checkpoint exists only when complete."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".step_{step:06d}.pt.tmp"
    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict()}, tmp)
    os.replace(tmp, ckpt_dir / f"step_{step:06d}.pt")


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    t = cfg["train"]
    run_dir = Path(cfg["run"]["dir"])
    torch.set_num_threads(1)

    own_group = False
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        own_group = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if t["global_batch"] % world:
        raise SystemExit(f"global_batch {t['global_batch']} is not divisible by world size {world}")

    stop = {"flag": False}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.update(flag=True))

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pids").mkdir(exist_ok=True)
    (run_dir / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))

    torch.manual_seed(t["seed"])
    model = torch.nn.Linear(t["dim"], 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"])
    ckpt_dir = run_dir / "checkpoints"
    start = 0
    if dist.is_initialized():
        dist.barrier()  # nobody reads a checkpoint list while rank 0 of a previous attempt is gone
    newest = _newest_checkpoint(ckpt_dir)
    if newest is not None:
        state = torch.load(newest, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    if rank == 0:
        _append(run_dir / "events.jsonl", {"event": "start", "resume_step": start, "world_size": world,
                                           "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
                                           "pid": os.getpid()})

    per_rank = t["global_batch"] // world
    step = start
    while step < t["steps"]:
        x, y = batch_for_step(step, cfg)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        loss = torch.nn.functional.mse_loss(ddp(x).squeeze(-1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        mean_loss = loss.detach().clone()
        flag = torch.tensor([1.0 if stop["flag"] else 0.0], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(mean_loss)
            mean_loss /= world
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if rank == 0:
            _append(run_dir / "losses.jsonl", {"step": step, "loss": mean_loss.item()})
        preempted = bool(flag.item())
        if rank == 0 and (step % t["save_every"] == 0 or step == t["steps"] or preempted):
            _save(ckpt_dir, step, model, opt)
            if preempted:
                _append(run_dir / "events.jsonl", {"event": "preempted", "step": step})
        if dist.is_initialized():
            dist.barrier()  # nobody exits before the checkpoint is complete
        if preempted:
            if own_group:
                dist.destroy_process_group()
            return EXIT_CODE_PREEMPTED
        if t["step_sleep"]:
            time.sleep(t["step_sleep"])
    if rank == 0:
        _append(run_dir / "events.jsonl", {"event": "done", "step": step})
    if own_group:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
