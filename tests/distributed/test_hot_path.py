"""The training step's hot path (issue 23): one blocking collective per step and no device syncs.

Every collective of torch.distributed that the loops call (the Python API: the loss reduction, the
stop votes, finiteness) is counted per loop step in a real tiny run, by wrapping the functions
before the CLI runs; the gradient traffic of DDP / FSDP2 runs in their own C++ reducers and is not
the harness's. Both stages train one after the other in one counting process (one start-up, not two;
the second run adopts the process group the first one created). The same counter wraps the explicit
CUDA synchronisation calls, so on a GPU the quiet steps' exact call sets also assert that none is made;
on this CPU-only machine the test asserts by reading the code where `synchronize` may be called (only
when a metrics row is written).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_cli import REPO, data_overrides, train_env

COUNTER = REPO / "benchmarks" / "count_step_calls.py"  # counts the calls of each loop step (also gpu_check's)

# 6 steps, a metrics row after steps 3 and 6: loop steps 0, 1, 3, 4 log nothing
STEPS, LOG_EVERY = 6, 3
QUIET_STEPS = [s for s in range(STEPS) if (s + 1) % LOG_EVERY]


def _collectives(tiny_data: Path, tmp_path: Path,
                 runs: dict[str, tuple[str, list[str]]]) -> dict[str, dict[int, dict[str, int]]]:
    """{run: {loop step: {collective: calls}}} of the tiny runs in `runs` (name -> stage, extra overrides),
    trained one after another in one counting process."""
    out = tmp_path / "calls.json"
    argvs = {name: ["train", stage, str(REPO / f"configs/{stage}/tiny_cpu.yaml"), *data_overrides(tiny_data),
                    f"run.dir={tmp_path / name}", f"training.max_steps={STEPS}", f"logging.every_steps={LOG_EVERY}",
                    "logging.sample_every_steps=1000", "checkpoint.every_steps=1000", *extra]
             for name, (stage, extra) in runs.items()}
    proc = subprocess.run([sys.executable, str(COUNTER), str(out), json.dumps(argvs)], cwd=REPO,
                          env=dict(train_env(), PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_run: dict[str, dict[int, dict[str, int]]] = {}
    for stage, calls in json.loads(out.read_text()).items():
        for key, count in calls.items():
            step, name = key.split(":")
            if name != "sync_op":  # CUDA's implicit syncs (an .item()) are gpu_check's figure, not asserted here
                per_run.setdefault(stage, {}).setdefault(int(step), {})[name] = count
    return per_run


@pytest.mark.slow
def test_one_blocking_collective_per_quiet_step(tiny_data, tmp_path):
    runs = _collectives(tiny_data, tmp_path, {
        "stage2": ("stage2", []),
        "stage1": ("stage1", ["gan.disc_start_epoch=0.02", "gan.disc_update_start_epoch=0.01"]),
        # ZeRO-2 in bf16 partitions the fp32 masters: the EMA must not gather them every step
        "stage2_zero2_bf16": ("stage2", ["parallel.strategy=deepspeed", "parallel.zero_stage=2",
                                         "parallel.precision=bf16"])})
    # stage 2: the loss sums, the IG base sum and the stop votes travel in one all-reduce
    stage2 = runs["stage2"]
    for step in QUIET_STEPS:
        assert stage2.get(step) == {"all_reduce": 1}, (step, stage2)
    # under DeepSpeed its own reductions go through the same Python API: the gradient bucket, the overflow
    # check and the gradient norm, one each; before the partitioned EMA, one more per parameter tensor
    zero2 = runs["stage2_zero2_bf16"]
    for step in QUIET_STEPS:
        assert zero2.get(step) == {"all_reduce": 1 + 3}, (step, zero2)
    # stage 1, the discriminator training from an early step: the generator's terms every step, plus
    # the discriminator's (every rank must agree on skipping its step) once it trains; nothing else
    stage1 = runs["stage1"]
    counts = [stage1.get(step) for step in QUIET_STEPS]
    assert all(c in ({"all_reduce": 1}, {"all_reduce": 2}) for c in counts), stage1
    ones = [c["all_reduce"] for c in counts]
    assert ones[0] == 1 and ones[-1] == 2 and ones == sorted(ones), stage1  # 1 before the disc trains, then 2


def _calls_to(tree: ast.AST, attr: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == attr]


def test_device_synchronisation_only_when_a_metrics_row_is_written():
    """torch.cuda.synchronize (or an event's wait) appears nowhere in the training package except in
    StepTimer.pop, which the harness calls from log_metrics only."""
    train = REPO / "rae_scale" / "train"
    found = {}
    for path in sorted(train.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            inner = {id(c) for f in ast.walk(fn) if f is not fn and isinstance(f, ast.FunctionDef)
                     for c in _calls_to(f, "synchronize")}
            own = [c for c in _calls_to(fn, "synchronize") if id(c) not in inner]
            if own:
                found[f"{path.name}:{fn.name}"] = len(own)
    assert found == {"throughput.py:pop": 1}, found
    run_py = ast.parse((train / "run.py").read_text())
    pops = [fn.name for fn in ast.walk(run_py) if isinstance(fn, ast.FunctionDef)
            for c in _calls_to(fn, "pop") if isinstance(c.func.value, ast.Attribute) and c.func.value.attr == "timer"]
    assert pops == ["log_metrics"], pops
