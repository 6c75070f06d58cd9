"""The real stage-2 trainer as the launcher integration tests (Slurm, Ray, multi-node torchrun) run it.

`rae_scale.commands.cli train stage2 configs/stage2/tiny_cpu.yaml` on the session's tiny digits dataset
(built once through the real pipeline for every training test: the `tiny_data` fixture),
and readers for what a run leaves in its run.dir: metrics.jsonl (one line per step with
logging.every_steps=1), committed checkpoints (checkpoints/step-XXXXXXXX/ holding COMMITTED) and
their metadata.json (step, world_size, ...). The loop seeds every per-sample draw by (seed, step,
sample index), so its losses do not depend on the world size and a resumed run repeats an
uninterrupted one.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PROGRAM = ("-m", "rae_scale.commands.cli", "train", "stage2")
CONFIG = "configs/stage2/tiny_cpu.yaml"
# A run that has to be preempted mid-way decodes a sample grid (20-step ODE + RAE decoder) after every
# step: real work that makes each step last long enough for a signal to land before the end, without
# touching the training numbers (the grid uses the EMA weights and its own seeded noise).
SLOW = ("logging.sample_every_steps=1",)
_RESUMED = re.compile(r"resumed from \S+ at step (\d+)")
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def data_overrides(root: Path) -> list[str]:
    return [f"data.url={root / 'shards'}", f"data.latents_url={root / 'latents'}",
            f"rae.encoder.pretrained={root / 'encoder'}", f"rae.stats_path={root / 'stats.safetensors'}"]


def run_overrides(data_root: Path, run_dir: Path, *, steps: int, every: int) -> list[str]:
    """A run of `steps` steps with a checkpoint every `every` steps, all kept, and every step logged."""
    return [*data_overrides(data_root), f"run.dir={run_dir}", f"training.max_steps={steps}",
            f"checkpoint.every_steps={every}", "checkpoint.keep_last=1000", "logging.every_steps=1",
            "logging.sample_every_steps=100000"]


def train_env() -> dict[str, str]:
    """This environment without a launcher's rank variables, one thread per rank, no progress bar."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", RAE_SCALE_PROGRESS="0", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p))
    return env


def read_losses(run_dir: str | os.PathLike) -> dict[int, float]:
    """step -> global mean loss from metrics.jsonl (a resumed run rewrote the lines after its checkpoint)."""
    from rae_scale.train.metrics import read_metrics

    return {row["step"]: row["loss"] for row in read_metrics(str(run_dir)) if "loss" in row}


def committed_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the checkpoints that count: those whose COMMITTED marker is written."""
    folders = (Path(run_dir) / "checkpoints").glob("step-*/COMMITTED")
    return sorted(int(p.parent.name.removeprefix("step-")) for p in folders)


def checkpoint_meta(run_dir: str | os.PathLike, step: int) -> dict:
    return json.loads((Path(run_dir) / "checkpoints" / f"step-{step:08d}" / "metadata.json").read_text())


def resumed_at(log_text: str) -> list[int]:
    """The steps of the loop's "resumed from ... at step N" lines, in order."""
    return [int(m) for m in _RESUMED.findall(log_text)]


def assert_same_trajectory(got: dict[int, float], want: dict[int, float], rel: float = 1e-5) -> None:
    assert sorted(got) == sorted(want) == list(range(1, len(want) + 1)), (sorted(got), sorted(want))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=rel), (step, got[step], loss)


@pytest.fixture(scope="session")
def tiny_stage2_data(tiny_data) -> Path:
    """The session's one tiny digits dataset (shards, seeded random encoder, latents, statistics; the
    `tiny_data` fixture of tests/conftest.py), which every training test shares."""
    return tiny_data
