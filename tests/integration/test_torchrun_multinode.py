"""Two torchrun agents with --nnodes=2 on this machine train the real stage-2 loop like one node with
two ranks (to the last bit) and like one process (the loop's losses do not depend on the world size).
Both references are the session's shared 5-step runs (train_cli.reference_run), trained once for all."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT, free_port
from real_training import (CONFIG, PROGRAM, assert_same_trajectory, checkpoint_meta, committed_steps,
                           read_losses, run_overrides, tiny_stage2_data, train_env)  # noqa: F401

from launchers.local import torchrun_argv

sys.path.insert(0, str(REPO_ROOT / "tests" / "distributed"))
from train_cli import STAGE2_5_STEPS, reference_run, step_metric  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 5, 5  # as STAGE2_5_STEPS, the shared runs' length


def test_two_agents_nnodes2_match_one_node_and_one_process(tiny_stage2_data, tmp_path):  # noqa: F811
    port = free_port()
    run_multi = tmp_path / "two_nodes"
    agents = []
    for _node in range(2):
        argv = torchrun_argv(1, [*PROGRAM, CONFIG, *run_overrides(tiny_stage2_data, run_multi, steps=STEPS,
                                                                   every=EVERY)],
                             nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id="multinode-test")
        agents.append(subprocess.Popen([sys.executable, "-m", "launchers.local", *argv], env=train_env(),
                                       cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    run_one_node = reference_run(tiny_stage2_data, "stage2", STAGE2_5_STEPS, nproc=2)  # `rae-scale train`, 2 ranks

    # both really ran as two ranks: the checkpoints record the world size that wrote them
    assert committed_steps(run_multi) == [STEPS]
    for run in (run_multi, run_one_node):
        assert checkpoint_meta(run, STEPS)["world_size"] == 2
    multi, one_node = read_losses(run_multi), step_metric(run_one_node)
    # same world size, same rank slices, same gloo reduction: identical to the last bit
    assert multi == one_node
    # one process sees the same global batches and per-sample noise: equal up to reduction rounding
    single = reference_run(tiny_stage2_data, "stage2", STAGE2_5_STEPS)
    assert checkpoint_meta(single, STEPS)["world_size"] == 1
    assert_same_trajectory(multi, step_metric(single), rel=1e-5)
