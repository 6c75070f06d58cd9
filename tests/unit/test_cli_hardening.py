"""Issue 21 items 12, 14, 15: secrets never printed or written, one-line user errors, readable logs.

Every check drives the real code: the CLI in a subprocess (exit codes, stderr), the launcher, wandb
in offline mode, MetricsLogger, and the transformers loading path of the frozen encoders.
"""
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rae_scale import config as C

REPO = Path(__file__).resolve().parents[2]
TINY2 = REPO / "configs/stage2/tiny_cpu.yaml"
SECRET = "SEKRIT123"
URL_PASSWORD = "pa55word"
SECRET_ARGS = [f"run.storage_options.secret={SECRET}",
               f"eval.reference=https://user:{URL_PASSWORD}@example.com/ref.npz"]


def _cli(*argv, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "RAE_SCALE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "rae_scale.commands.cli", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


pytestmark = pytest.mark.usefixtures("restore_root_logging")


def _assert_no_secret(text: str, where: str):
    assert SECRET not in text, f"secret in {where}"
    assert URL_PASSWORD not in text, f"URL password in {where}"


# ----------------------------------------------------------------------------- item 12: secrets


def test_redact_is_one_function_for_trees_argv_and_text():
    tree = {"storage_options": {"key": "K1", "secret": "S1", "token": "T1", "password": "P1", "passphrase": "P2",
                                "account_key": "A1", "connection_string": "C1", "headers": {"Authorization": "B1"},
                                "client_kwargs": {"aws_secret_access_key": "A2", "endpoint_url": "http://127.0.0.1:9"}},
            "dir": "s3://user:U1@host/bucket/run", "keep_last": 3}
    out = C.redact(tree)
    flat = json.dumps(out)
    for value in ("K1", "S1", "T1", "P1", "P2", "A1", "C1", "B1", "A2", "U1"):
        assert value not in flat
    assert out["storage_options"]["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9"
    assert out["dir"] == "s3://***@host/bucket/run" and out["keep_last"] == 3
    argv = ["train", "stage2", "run.storage_options.headers.authorization=Bearer B2", "--token", "T2",
            "run.dir=s3://u:U2@h/x", "training.max_steps=5"]
    assert C.redact(argv) == ["train", "stage2", "run.storage_options.headers.authorization=***", "--token", "***",
                              "run.dir=s3://***@h/x", "training.max_steps=5"]
    line = "cmd 'run.storage_options.headers.Authorization=Bearer B3' x.secret=S3 https://a:U3@h/p?sig=G3 {'token': 'T3'}"
    for value in ("B3", "S3", "U3", "G3", "T3"):
        assert value not in C.redact(line)


def test_no_config_field_is_mistaken_for_a_secret():
    """Redaction goes by key name: a real config field with a secret-looking name would be lost."""
    def fields(cls, seen):
        for f in dataclasses.fields(cls):
            yield f.name
            sub = C._dataclass_of(C._field_type(cls, f.name))
            if sub is not None and sub not in seen:
                seen.add(sub)
                yield from fields(sub, seen)

    names = {n for job in C.JOBS.values() for n in fields(job, set())}
    assert not [n for n in names if C.is_secret_key(n)]


def test_secrets_reach_no_log_metrics_config_or_wandb_run(tmp_path, monkeypatch, capfd):
    """The config tree and the process's argv (both recorded by wandb) carry a storage secret and a
    user:pass@ URL; none of the run's outputs holds them. Also item 15: plain step lines, strict JSON."""
    from rae_scale.logs import setup_logging
    from rae_scale.train.metrics import MetricsLogger, read_metrics

    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    for key, value in dict(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_SILENT="true").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAE_SCALE_PROGRESS", raising=False)  # stderr is captured: not a terminal
    overrides = [*SECRET_ARGS, f"run.dir={run_dir}", "logging.wandb=offline"]
    monkeypatch.setattr(sys, "argv", ["rae-scale", "train", "stage2", str(TINY2), *overrides])  # what wandb records
    setup_logging()
    cfg = C.load_config(C.Stage2Job, TINY2, overrides)
    C.save_resolved(cfg, str(run_dir), cfg.run.storage_options)  # as start_run does
    logging.getLogger("rae_scale").info("config %s, reference %s", cfg.run.storage_options, cfg.eval.reference)
    # what the loops hand over (stage1.py / stage2.py): the redacted config tree
    m = MetricsLogger(str(run_dir), rank=0, wandb_mode=cfg.logging.wandb, config=C.to_dict(cfg),
                      storage_options=cfg.run.storage_options, total_steps=3)
    for step in (1, 2, 3):
        m.log(step, {"loss": float("nan") if step == 2 else 0.5 / step, "lr": 1e-4, "images_per_s": 100.0})
    m.close()
    out, err = capfd.readouterr()
    _assert_no_secret(out + err, "the log")
    assert "'secret': '***'" in err and "https://***@example.com" in err  # the logged line was there, redacted
    files = [p for p in [*run_dir.rglob("*"), *wandb_dir.rglob("*")] if p.is_file()]
    assert (run_dir / "config.yaml") in files and any(p.suffix == ".wandb" for p in files)
    for path in files:
        _assert_no_secret(path.read_bytes().decode("utf-8", "replace"), str(path))
    # item 15: no progress bar on this stderr, so every logged step has a plain line
    step_lines = [ln for ln in err.splitlines() if "step " in ln and "/3 |" in ln]
    assert len(step_lines) == 3 and "loss 0.5" in step_lines[0] and "img/s" in step_lines[0]
    # item 15: metrics.jsonl is strict JSON; the NaN is null plus a flag, and readers get NaN back
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(ln, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")) for ln in lines]
    assert rows[1]["loss"] is None and rows[1]["nonfinite"] == {"loss": "nan"}
    back = read_metrics(str(run_dir))
    assert math.isnan(back[1]["loss"]) and back[0]["loss"] == 0.5


def test_launcher_output_has_no_secret(capfd):
    """`launch local` echoes its command line, then torchrun's agent and the rank speak (on this
    process's stderr); `launch slurm --dry-run` prints the script. The job fails fast at config
    validation (max_steps=0), after the launcher has spoken."""
    from rae_scale.commands.cli import main

    args = [*SECRET_ARGS, f"run.dir=s3://user:{URL_PASSWORD}@127.0.0.1:1/bucket/run", "training.max_steps=0"]
    assert main(["launch", "local", "--nproc", "1", "stage2", str(TINY2), *args]) != 0
    out, err = capfd.readouterr()
    assert "local launch:" in err and "config key 'training.max_steps'" in err
    _assert_no_secret(out + err, "launch local output")
    assert main(["launch", "--dry-run", "--nodes", "2", "slurm", "stage2", str(TINY2), *args[:-1]]) == 0
    out, err = capfd.readouterr()
    assert "#SBATCH --nodes=2" in out and "run.storage_options.secret=***" in out
    _assert_no_secret(out + err, "launch slurm --dry-run output")


# ----------------------------------------------------------------------------- item 14: errors


def test_missing_input_is_one_line_exit_2_and_debug_shows_the_traceback(tmp_path):
    proc = _cli("prepare", "--input", "/nonexistent/images", "--output", str(tmp_path / "x"))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rae-scale: error: ") and "/nonexistent/images" in lines[0]
    # --debug anywhere on the command line
    proc = _cli("prepare", "--input", "/nonexistent/images", "--debug", "--output", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("rae-scale: error: ")


@pytest.mark.parametrize("override, allowed", [
    ("training.max_steps=0", ">= 1"),
    ("training.max_steps=-5", ">= 1"),
    ("training.epochs=-1", "> 0"),
    ("training.epochs=0", "> 0"),
    ("optimizer.betas=[0.9]", "two numbers in [0, 1)"),
    ("optimizer.betas=[0.9,1.0]", "two numbers in [0, 1)"),
    ("optimizer.betas=[-0.1,0.9]", "two numbers in [0, 1)"),
    ("optimizer.betas=0.9", "a list of"),
    ("optimizer.lr=-1e-4", ">= 0"),
    ("optimizer.weight_decay=-0.1", ">= 0"),
    ("optimizer.eps=-1e-8", ">= 0"),
    ("checkpoint.resume=atuo", "auto, never, or the path/URL of a step folder"),
    ("checkpoint.resume=", "auto, never, or the path/URL of a step folder"),
])
def test_bad_values_rejected_at_load_with_key_and_allowed(override, allowed):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(C.Stage2Job, TINY2, [override])
    msg = str(err.value)
    assert override.split("=")[0] in msg and allowed in msg and "\n" not in msg


@pytest.mark.parametrize("value", ["auto", "never", "runs/x/checkpoints/step-00000020",
                                   "s3://bucket/run/checkpoints/step-00000020", "step-00000020"])
def test_good_resume_values_load(value):
    assert C.load_config(C.Stage2Job, TINY2, [f"checkpoint.resume={value}"]).checkpoint.resume == value


def test_overrides_may_follow_flags_and_unknown_flags_stay_errors(capsys, monkeypatch):
    from rae_scale.commands.cli import main

    monkeypatch.setenv("RAE_SCALE_DEBUG", "0")  # --debug below sets it for child processes; undone after the test

    # the override after --nproc is parsed (and its bad value reported): it did not fail as unrecognised
    assert main(["train", "stage2", str(TINY2), "--nproc", "2", "training.max_steps=0"]) == 2
    assert "config key 'training.max_steps': bad value 0" in capsys.readouterr().err
    assert main(["config", "show", "stage2", "--debug", str(TINY2), "training.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out
    with pytest.raises(SystemExit) as ex:
        main(["train", "stage2", str(TINY2), "--nprocs", "2", "training.max_steps=5"])
    assert ex.value.code == 2 and "unrecognized arguments: --nprocs 2" in capsys.readouterr().err


def test_user_errors_and_bugs_are_told_apart():
    import fsspec

    from rae_scale.checkpoint.manager import CheckpointLoadError
    from rae_scale.commands.cli import user_error_message

    # bugs: None, so main() prints the traceback
    assert user_error_message(KeyError("x")) is None and user_error_message(ValueError("Protocol not known")) is None
    assert user_error_message(FileNotFoundError(2, "No such file or directory", "/x")) == \
        "No such file or directory: /x"
    assert user_error_message(CheckpointLoadError("could not load any checkpoint:\n  a: x\n  b: y")) == \
        "could not load any checkpoint: a: x; b: y"
    with pytest.raises(ValueError) as err:  # fsspec's own word on an unknown protocol
        fsspec.core.url_to_fs("nosuchproto://bucket/x")
    assert user_error_message(err.value) == "Protocol not known: nosuchproto"
    assert user_error_message(PermissionError(13, "Permission denied", "s3://u:pw@h/b")) == \
        "Permission denied: s3://***@h/b"


# ----------------------------------------------------------------------------- item 15: logs


def test_metrics_logger_plain_lines_only_without_a_terminal(tmp_path, monkeypatch, caplog):
    from rae_scale.train.metrics import MetricsLogger

    caplog.set_level(logging.INFO, logger="rae_scale.train.metrics")
    monkeypatch.setenv("RAE_SCALE_PROGRESS", "1")  # a bar shows: no duplicate lines
    MetricsLogger(str(tmp_path / "a"), rank=0, total_steps=2).log(1, {"loss": 1.0})
    assert not [r for r in caplog.records if "step 1/2" in r.getMessage()]
    monkeypatch.delenv("RAE_SCALE_PROGRESS")  # pytest's stderr is not a terminal
    m = MetricsLogger(str(tmp_path / "b"), rank=0, total_steps=2)
    m.log(1, {"loss": float("inf"), "loss_l1": 0.25, "lr": 2e-4, "grad_norm": float("nan"), "images_per_s": 50.0})
    msgs = [r.getMessage() for r in caplog.records if "step 1/2" in r.getMessage()]
    assert msgs == ["step 1/2 | loss inf | loss_l1 0.25 | lr 2.000e-04 | grad_norm nan | 50.0 img/s"]
    row = json.loads((tmp_path / "b" / "metrics.jsonl").read_text())
    assert row["loss"] is None and row["nonfinite"] == {"loss": "inf", "grad_norm": "nan"}


def _quiet_build(tmp_path, capfd, caplog, drop):
    """Save a tiny DINOv2 the HF way without the weights in `drop` (and no preprocessor config), load it
    back as a frozen encoder; return everything printed or logged."""
    import torch
    from safetensors.torch import load_file, save_file

    from rae_scale.models import build_encoder

    caplog.set_level(logging.INFO)
    enc = build_encoder("dinov2", hidden_size=32, num_layers=1, num_heads=2, patch_size=14, input_size=28,
                        intermediate_size=64)
    hf = type(enc.model)(enc.model.config)
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not any(d in k for d in drop)}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = build_encoder("dinov2", pretrained=str(tmp_path), input_size=28)
    assert loaded(torch.rand(1, 3, 28, 28)).shape == (1, 4, 32)
    out, err = capfd.readouterr()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return out + err + "\n".join(warned)


def test_frozen_encoder_loads_without_misleading_transformers_messages(tmp_path, capfd, caplog):
    import transformers

    before = transformers.logging.get_verbosity()
    text = _quiet_build(tmp_path, capfd, caplog, drop=("mask_token",))
    for fragment in ("were not initialized", "TRAIN this model", "no image processor", "Could not find image processor"):
        assert fragment not in text
    assert transformers.logging.get_verbosity() == before  # narrow: verbosity restored


def test_frozen_encoder_still_warns_when_used_weights_are_missing(tmp_path, capfd, caplog):
    text = _quiet_build(tmp_path, capfd, caplog, drop=("layer.0.attention.attention.query",))
    assert "lacks 2 weight(s) it uses, left random" in text and "TRAIN this model" not in text
