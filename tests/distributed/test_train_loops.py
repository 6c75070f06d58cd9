"""The two training loops through the real CLI: strategies agree with a single process, a preempted
run resumes exactly, the loss goes down, and batch-size mistakes are clear errors.

Every run is a real `rae-scale train` process (2 gloo ranks where asked) on the tiny configs; the
dataset is built once per session under a temporary folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Digits shards, a random encoder, latents and stats, built by the real pipeline once."""
    root = tmp_path_factory.mktemp("tiny")
    overrides = _data_overrides(root)
    code = _run("stage2", overrides + [f"run.dir={root / 'warmup'}", "training.max_steps=1"])
    assert code == 0
    return root


def _data_overrides(root: Path) -> list[str]:
    return [f"data.url={root / 'shards'}", f"data.latents_url={root / 'latents'}",
            f"rae.encoder.pretrained={root / 'encoder'}", f"rae.stats_path={root / 'stats.safetensors'}"]


def _cmd(stage: str, overrides: list[str], nproc: int = 1) -> list[str]:
    return [sys.executable, "-m", "rae_scale.cli", "train", stage, str(REPO / f"configs/{stage}/tiny_cpu.yaml"),
            *overrides, f"parallel.nproc={nproc}", "logging.every_steps=1", "logging.sample_every_steps=1000"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", RAE_SCALE_PROGRESS="0")


def _run(stage: str, overrides: list[str], nproc: int = 1, timeout: float = 600) -> int:
    proc = subprocess.run(_cmd(stage, overrides, nproc), cwd=REPO, env=_env(), timeout=timeout,
                          capture_output=True, text=True)
    if proc.returncode not in (0, 75):
        print(proc.stdout[-3000:], proc.stderr[-6000:])
    return proc.returncode


def _losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r[key] for r in rows}


def _final_model(run_dir: Path, step: int) -> dict:
    from rae_scale.checkpoint import consolidate

    state = consolidate(str(run_dir / "checkpoints" / f"step-{step:08d}"))
    return {"model": state["model"], "ema": state["ema"]}


def _assert_close(a: dict[int, float], b: dict[int, float], rel: float, what: str):
    assert a.keys() == b.keys(), f"{what}: steps differ {sorted(a)} vs {sorted(b)}"
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), f"{what}: step {step}: {a[step]} vs {b[step]}"


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


def test_stage2_single_ddp_fsdp_agree(tiny_data, tmp_path):
    common = _data_overrides(tiny_data) + ["training.max_steps=5", "checkpoint.every_steps=1000"]
    runs = {"single": (1, "ddp"), "ddp": (2, "ddp"), "fsdp": (2, "fsdp")}
    losses = {}
    for name, (nproc, strategy) in runs.items():
        assert _run("stage2", common + [f"run.dir={tmp_path / name}", f"parallel.strategy={strategy}"], nproc) == 0
        losses[name] = _losses(tmp_path / name)
    assert len(losses["single"]) == 5
    for name in ("ddp", "fsdp"):
        _assert_close(losses[name], losses["single"], 1e-5, f"stage 2 {name} vs single process")
    # accumulation 2 x B/2 on one rank is the same global batch
    assert _run("stage2", common + [f"run.dir={tmp_path / 'accum'}", "training.grad_accum_steps=2"], 1) == 0
    _assert_close(_losses(tmp_path / "accum"), losses["single"], 1e-5, "accumulation 2 x B/2 vs 1 x B")


def test_stage1_with_gan_single_vs_ddp(tiny_data, tmp_path):
    common = _data_overrides(tiny_data) + ["training.max_steps=4", "checkpoint.every_steps=1000",
                                           "gan.disc_start_epoch=0.02", "gan.disc_update_start_epoch=0.01",
                                           "gan.diffaug_prob=0.0"]
    assert _run("stage1", common + [f"run.dir={tmp_path / 'single'}"], 1) == 0
    assert _run("stage1", common + [f"run.dir={tmp_path / 'ddp'}"], 2) == 0
    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert _losses(tmp_path / "single", "gan_active")[4] == 1
    _assert_close(ddp, single, 1e-5, "stage 1 (GAN on) ddp vs single")
    _assert_close(_losses(tmp_path / "ddp", "loss_disc"), _losses(tmp_path / "single", "loss_disc"), 1e-5,
                  "discriminator loss ddp vs single")


def _preempt_then_resume(stage: str, overrides: list[str], run_dir: Path, nproc: int, after_step: int) -> None:
    """Start a run, send SIGTERM once it has logged after_step, expect exit 75, then resume to the end."""
    proc = subprocess.Popen(_cmd(stage, overrides + [f"run.dir={run_dir}"], nproc), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(x)["step"] >= after_step
                                    for x in metrics.read_text().splitlines() if x.strip()):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, f"expected the preemption exit code 75, got {proc.returncode}\n{err[-4000:]}"
    assert _run(stage, overrides + [f"run.dir={run_dir}"], nproc) == 0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_stage2_preempted_run_resumes_exactly(tiny_data, tmp_path, strategy):
    common = _data_overrides(tiny_data) + ["training.max_steps=10", "checkpoint.every_steps=1000",
                                           f"parallel.strategy={strategy}"]
    assert _run("stage2", common + [f"run.dir={tmp_path / 'straight'}"], 2) == 0
    _preempt_then_resume("stage2", common, tmp_path / "resumed", 2, after_step=3)
    a, b = _losses(tmp_path / "resumed"), _losses(tmp_path / "straight")
    assert a == b, "per-step losses after resume differ from the uninterrupted run"
    wa, wb = _flat(_final_model(tmp_path / "resumed", 10)), _flat(_final_model(tmp_path / "straight", 10))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"final weight {k} differs after resume"


def test_stage1_gan_preempted_run_resumes_exactly(tiny_data, tmp_path):
    common = _data_overrides(tiny_data) + ["training.max_steps=8", "checkpoint.every_steps=1000",
                                           "gan.disc_start_epoch=0.02", "gan.disc_update_start_epoch=0.01"]
    assert _run("stage1", common + [f"run.dir={tmp_path / 'straight'}"], 1) == 0
    _preempt_then_resume("stage1", common, tmp_path / "resumed", 1, after_step=3)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    assert _losses(tmp_path / "resumed", "loss_disc") == _losses(tmp_path / "straight", "loss_disc")


def test_stage2_loss_goes_down(tiny_data, tmp_path):
    overrides = _data_overrides(tiny_data) + [f"run.dir={tmp_path / 'run'}", "training.max_steps=150",
                                              "checkpoint.every_steps=1000"]
    assert _run("stage2", overrides, 1) == 0
    losses = _losses(tmp_path / "run")
    first = sum(losses[s] for s in range(1, 11)) / 10
    last = sum(losses[s] for s in range(141, 151)) / 10
    assert last < 0.8 * first, f"stage-2 loss did not go down: first 10 steps {first:.4f}, last 10 {last:.4f}"


def test_batch_that_does_not_divide_is_a_clear_error(tiny_data, tmp_path):
    proc = subprocess.run(_cmd("stage2", _data_overrides(tiny_data) + [f"run.dir={tmp_path}",
                                                                        "training.global_batch_size=33",
                                                                        "training.grad_accum_steps=2"]),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "training.global_batch_size=33 is not divisible by grad_accum_steps x world size" in proc.stderr
    assert "Traceback" not in proc.stderr
