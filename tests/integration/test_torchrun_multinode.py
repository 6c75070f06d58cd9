"""Two torchrun agents with --nnodes=2 on this machine train the real stage-2 loop like one node with
two ranks (to the last bit) and like one process (the loop's losses do not depend on the world size)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT, free_port
from real_training import (CONFIG, PROGRAM, assert_same_trajectory, checkpoint_meta, committed_steps,
                           read_losses, run_overrides, run_single_process, tiny_stage2_data, train_env)  # noqa: F401

from launchers.local import run_local, torchrun_argv

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 6, 3


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

    run_one_node = tmp_path / "one_node"
    assert run_local(2, [CONFIG, *run_overrides(tiny_stage2_data, run_one_node, steps=STEPS, every=EVERY)],
                     program=PROGRAM, env=train_env()) == 0

    # both really ran as two ranks: the checkpoints record the world size that wrote them
    for run in (run_multi, run_one_node):
        assert committed_steps(run) == list(range(EVERY, STEPS + 1, EVERY))
        assert checkpoint_meta(run, STEPS)["world_size"] == 2
    multi, one_node = read_losses(run_multi), read_losses(run_one_node)
    # same world size, same rank slices, same gloo reduction: identical to the last bit
    assert multi == one_node
    # one process sees the same global batches and per-sample noise: equal up to reduction rounding
    single = run_single_process(tiny_stage2_data, tmp_path / "single", steps=STEPS, every=EVERY)
    assert checkpoint_meta(tmp_path / "single", STEPS)["world_size"] == 1
    assert_same_trajectory(multi, single, rel=1e-5)
