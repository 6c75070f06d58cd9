"""Helpers for tests that drive the training loops through the real CLI (`rae-scale train`).

Every run is a real `python -m rae_scale.commands.cli train` process (2 gloo ranks where asked) on the tiny
configs; the tiny dataset is built once per session (the `tiny_data` fixture in tests/conftest.py
calls build_tiny_data). `reference_run` memoises uninterrupted runs for the whole session, so test
files that compare against the same reference (single process, 5 steps) pay for it once.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
PREEMPTED = 75  # rae_scale.checkpoint.preemption.EXIT_CODE_PREEMPTED

# The session's shared runs: tests that use these override lists through reference_run / resumed_run
# pay for each run once (tests/distributed/test_loop_reference.py holds their recorded numbers).
STAGE2_5_STEPS = ["training.max_steps=5", "checkpoint.every_steps=1000"]
# GAN loss on from step 3, discriminator updates from step 2 (112 steps per epoch at batch 16)
STAGE1_GAN_4_STEPS = ["training.max_steps=4", "checkpoint.every_steps=1000", "gan.disc_start_epoch=0.02",
                      "gan.disc_update_start_epoch=0.01", "gan.diffaug_prob=0.0"]
STAGE1_GAN_6_STEPS = ["training.max_steps=6", "checkpoint.every_steps=1000", "gan.disc_start_epoch=0.02",
                      "gan.disc_update_start_epoch=0.01"]  # DiffAug on
FSDP = ["parallel.strategy=fsdp"]
ZERO2 = ["parallel.strategy=deepspeed", "parallel.zero_stage=2"]


def build_tiny_data(root: Path) -> Path:
    """Digits shards, a random encoder, latents and stats under root, built by the real pipeline jobs
    (prepare, cache-latents, stats) in this process: the same bytes as on Ray (tests/integration covers
    the Ray jobs, and test_train_t2i a training run that builds its data), without a Ray start."""
    from rae_scale import config as C

    from data_pipeline.tiny import ensure_tiny_data

    cfg = C.load_config(C.Stage2Job, str(REPO / "configs/stage2/tiny_cpu.yaml"), data_overrides(root))
    ensure_tiny_data(cfg, stage="stage2", num_workers=0)
    return root


def data_overrides(root: Path) -> list[str]:
    return [f"data.url={root / 'shards'}", f"data.latents_url={root / 'latents'}",
            f"rae.encoder.pretrained={root / 'encoder'}", f"rae.stats_path={root / 'stats.safetensors'}"]


def train_cmd(stage: str, overrides: list[str], nproc: int = 1, config: str = "tiny_cpu") -> list[str]:
    """The CLI command of one run of configs/<stage>/<config>.yaml (tiny_cpu unless named)."""
    return [sys.executable, "-m", "rae_scale.commands.cli", "train", stage, str(REPO / f"configs/{stage}/{config}.yaml"),
            *overrides, f"parallel.nproc={nproc}", "logging.every_steps=1", "logging.sample_every_steps=1000"]


def train_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", RAE_SCALE_PROGRESS="0")


def run_train(stage: str, overrides: list[str], nproc: int = 1, timeout: float = 900, config: str = "tiny_cpu") -> int:
    """Run one training job to its end; returns the exit code (output printed when it is an error)."""
    proc = subprocess.run(train_cmd(stage, overrides, nproc, config), cwd=REPO, env=train_env(), timeout=timeout,
                          capture_output=True, text=True)
    if proc.returncode not in (0, PREEMPTED):
        print(proc.stdout[-3000:], proc.stderr[-6000:])
    return proc.returncode


_REFERENCE_RUNS: dict[tuple, Path] = {}


def reference_run(data_root: Path, stage: str, overrides: list[str], nproc: int = 1, config: str = "tiny_cpu") -> Path:
    """The run folder of an uninterrupted run with these overrides, run once per test session."""
    key = (str(data_root), stage, config, tuple(overrides), nproc)
    if key not in _REFERENCE_RUNS:
        run_dir = Path(tempfile.mkdtemp(prefix=f"ref_{stage}_", dir=data_root))
        assert run_train(stage, data_overrides(data_root) + overrides + [f"run.dir={run_dir}"], nproc,
                         config=config) == 0
        _REFERENCE_RUNS[key] = run_dir
    return _REFERENCE_RUNS[key]


_RESUMED_RUNS: dict[tuple, tuple[Path, int]] = {}


def resumed_run(data_root: Path, stage: str, overrides: list[str], nproc: int, after_step: int,
                config: str = "tiny_cpu") -> tuple[Path, int]:
    """(run folder, step it was preempted at) of a run SIGTERMed after after_step and resumed to its end
    (preempt_then_resume), run once per test session."""
    key = (str(data_root), stage, config, tuple(overrides), nproc, after_step)
    if key not in _RESUMED_RUNS:
        run_dir = Path(tempfile.mkdtemp(prefix=f"resumed_{stage}_", dir=data_root))
        saved_at = preempt_then_resume(stage, data_overrides(data_root) + overrides, run_dir, nproc, after_step,
                                       config=config)
        _RESUMED_RUNS[key] = (run_dir, saved_at)
    return _RESUMED_RUNS[key]


def step_metric(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """{step: value} of one metrics.jsonl column (full float precision)."""
    from rae_scale.train.metrics import read_metrics

    return {r["step"]: r[key] for r in read_metrics(str(run_dir))}


def final_model(run_dir: Path, step: int) -> dict:
    """Model and EMA weights of a DCP (ddp / fsdp) checkpoint, consolidated in this process; of a
    stage-1 checkpoint also the discriminator's trained heads (with their spectral-norm buffers)."""
    from rae_scale.checkpoint import consolidate

    state = consolidate(str(run_dir / "checkpoints" / f"step-{step:08d}"))
    return {"model": state["model"], "ema": state["ema"], **_discriminator(state)}


def _discriminator(state: dict) -> dict:
    """{"disc": heads} of a consolidated stage-1 checkpoint ({} for stage 2: it has no discriminator)."""
    return {"disc": state["disc_model"]} if "disc_model" in state else {}


def final_model_deepspeed(run_dir: Path, step: int) -> dict:
    """fp32 master weights (DeepSpeed's own zero_to_fp32 consolidation of the ZeRO partitions) and
    the EMA the strategy stores in the client state, of a DeepSpeed checkpoint written by the loop;
    of a stage-1 checkpoint also the discriminator (plain DDP, in the step's DCP state)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from rae_scale.checkpoint import consolidate

    step_dir = run_dir / "checkpoints" / f"step-{step:08d}"
    native = step_dir / "deepspeed"
    model = get_fp32_state_dict_from_zero_checkpoint(str(native), tag="native")
    client = torch.load(native / "native" / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    return {"model": dict(model), "ema": client["ema"], **_discriminator(consolidate(str(step_dir)))}


def assert_close(a: dict[int, float], b: dict[int, float], rel: float, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: steps differ {sorted(a)} vs {sorted(b)}"
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), f"{what}: step {step}: {a[step]} vs {b[step]}"


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys(), f"steps differ {sorted(a)} vs {sorted(b)}"
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


def flat(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested state dicts -> {dotted name: tensor} (non-tensor leaves dropped)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys(), f"{what}: different tensors {sorted(fa.keys() ^ fb.keys())[:5]}"
    for k in fa:
        assert torch.equal(fa[k], fb[k]), f"{what}: {k} differs (max abs {(fa[k] - fb[k]).abs().max()})"


def logged_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl (0 before the first line; a torn last line is skipped)."""
    from rae_scale.train.metrics import read_metrics

    return max((r["step"] for r in read_metrics(str(run_dir)) if "step" in r), default=0)


def preempt_then_resume(stage: str, overrides: list[str], run_dir: Path, nproc: int, after_step: int,
                        resume_nproc: int | None = None, config: str = "tiny_cpu") -> int:
    """Start a run, SIGTERM it once it has logged after_step, expect exit 75, then resume to the end
    (on resume_nproc ranks when given: an elastic restart). Returns the step the preempted run saved at
    (its last logged step: logging.every_steps=1), after checking that the second run resumed from it:
    a run that started over from step 0 would repeat the uninterrupted one just as exactly."""
    proc = subprocess.Popen(train_cmd(stage, overrides + [f"run.dir={run_dir}"], nproc, config), cwd=REPO,
                            env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if logged_step(run_dir) >= after_step:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == PREEMPTED, f"expected the preemption exit code 75, got {proc.returncode}\n{err[-4000:]}"
    saved_at = logged_step(run_dir)
    resume = subprocess.run(train_cmd(stage, overrides + [f"run.dir={run_dir}"], resume_nproc or nproc, config), cwd=REPO,
                            env=train_env(), capture_output=True, text=True, timeout=900)
    assert resume.returncode == 0, f"the resumed run failed ({resume.returncode})\n{resume.stderr[-6000:]}"
    resumed = re.search(r"resumed from \S*step-(\d+) at step (\d+)", resume.stderr)
    assert resumed and int(resumed.group(1)) == int(resumed.group(2)) == saved_at, \
        f"the second run did not resume from step {saved_at}\n{resume.stderr[-4000:]}"
    return saved_at
