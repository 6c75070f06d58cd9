"""The sbatch templates render to valid bash for every job, and bad launch settings are named."""
from __future__ import annotations

import signal
import subprocess

import pytest

from launchers.local import preemption_exit_code, torchrun_argv
from launchers.render import TemplateError, render_template
from launchers.slurm import JOBS, render_sbatch, split_job_args

pytestmark = pytest.mark.integration

BASE = dict(config="c.yaml", overrides=["run.dir=/x y"], nodes=2, gpus_per_node=4, cpus_per_task=16,
            partition="gpu", time="1-00:00:00", signal_seconds=240, job_name="rae", log_dir="/tmp/logs")


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_template_renders_valid_bash(job):
    script = render_sbatch(job, **BASE)
    assert "{{" not in script and "#SBATCH --signal=B:USR2@240" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --output=/tmp/logs/%x-%j.log" in script and "scontrol requeue" in script
    assert "'run.dir=/x y'" in script  # quoted for the shell
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize("key,value,needle", [("nodes", 0, "nodes"), ("time", "tomorrow", "time"),
                                              ("signal_seconds", -1, "signal_seconds"),
                                              ("job_name", "a b", "job_name"), ("cpus_per_task", 0, "cpus")])
def test_bad_settings_are_named(key, value, needle):
    with pytest.raises(ValueError, match=needle):
        render_sbatch("stage2", **{**BASE, key: value})


def test_unknown_job_and_missing_stage():
    with pytest.raises(ValueError, match="allowed"):
        render_sbatch("stage3", **BASE)
    with pytest.raises(ValueError, match="stage1 or stage2"):
        split_job_args("train", ["c.yaml"])
    assert split_job_args("evaluate", ["recon", "e.yaml", "a=1"]) == (
        "evaluate", ["-m", "rae_scale.commands.cli", "evaluate", "recon"], "e.yaml", ["a=1"])


def test_template_fields_must_match(tmp_path):
    (tmp_path / "t.sbatch").write_text("echo {{ a }}\n")
    with pytest.raises(TemplateError, match="needs values for: a"):
        render_template("t.sbatch", {}, tmp_path)
    with pytest.raises(TemplateError, match="no placeholder for: b"):
        render_template("t.sbatch", {"a": 1, "b": 2}, tmp_path)


def test_preemption_exit_code_and_torchrun_argv():
    class F:
        def __init__(self, code):
            self.exitcode = code

    assert preemption_exit_code({0: F(75), 1: F(75)}) == 75
    assert preemption_exit_code({0: F(75), 1: F(-signal.SIGTERM)}) == 75  # stopped by the agent after rank 0
    assert preemption_exit_code({0: F(1), 1: F(75)}) is None
    assert preemption_exit_code({0: F(-signal.SIGTERM)}) is None
    assert torchrun_argv(2, ["-m", "m", "x"]) == ["--nproc-per-node=2", "--max-restarts=0", "--standalone",
                                                  "--module", "m", "x"]
    with pytest.raises(ValueError, match="rendezvous"):
        torchrun_argv(1, ["s.py"], nnodes=2)
