"""Two torchrun agents with --nnodes=2 on this machine train like one node and like one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, free_port
from tiny_ddp_train import TRAINING, read_events, read_losses

from launchers.local import run_local, torchrun_argv

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROGRAM, CONFIG, _SLOW = TRAINING


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests" / "integration")]))


def _single_process(run_dir: Path) -> dict[int, float]:
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    subprocess.run([sys.executable, *PROGRAM, CONFIG, f"run.dir={run_dir}"], env=env, check=True,
                   cwd=REPO_ROOT, timeout=300)
    return read_losses(run_dir)


def test_two_agents_nnodes2_match_one_node_and_one_process(tmp_path):
    port = free_port()
    run_multi = tmp_path / "two_nodes"
    agents = []
    for _node in range(2):
        argv = torchrun_argv(1, [*PROGRAM, CONFIG, f"run.dir={run_multi}"], nnodes=2,
                             rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id="multinode-test")
        agents.append(subprocess.Popen([sys.executable, "-m", "launchers.local", *argv], env=_env(),
                                       cwd=REPO_ROOT))
    codes = [a.wait(timeout=300) for a in agents]
    assert codes == [0, 0]

    run_one_node = tmp_path / "one_node"
    assert run_local(2, [CONFIG, f"run.dir={run_one_node}"], program=PROGRAM, env=_env()) == 0

    multi, one_node = read_losses(run_multi), read_losses(run_one_node)
    single = _single_process(tmp_path / "single")
    assert read_events(run_multi)[0]["world_size"] == 2
    assert read_events(run_one_node)[0]["world_size"] == 2
    assert sorted(multi) == sorted(single) and len(single) >= 10
    # same world size, same rank slices, same gloo reduction: identical to the last bit
    assert multi == one_node
    # a different world size changes only the rounding of the gradient average
    for step, loss in single.items():
        assert multi[step] == pytest.approx(loss, rel=1e-9, abs=1e-12)
