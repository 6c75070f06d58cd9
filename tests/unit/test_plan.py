"""`rae-scale plan`: exact parameter counts from the meta device, the measured activation model against a
direct measurement, the planner's table, and its one-line errors (unknown GPU, a job that fits nowhere).
The memory model against a real 2-rank run is tests/distributed/test_plan_memory.py."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from rae_scale import config as C
from rae_scale.commands.cli import main
from rae_scale.plan import Setting, build_job, plan_memory
from rae_scale.plan.inventory import _dit_at_width, _dit_probe
from rae_scale.plan.memory import fsdp_shard, zero3_persistent, zero_reduce_buffer

REPO = Path(__file__).resolve().parents[2]
XL = str(REPO / "configs/stage2/dit_dh_xl_256.yaml")
TINY2 = str(REPO / "configs/stage2/tiny_cpu.yaml")
TINY1 = str(REPO / "configs/stage1/tiny_cpu.yaml")
NO_DATA = ["rae.encoder.pretrained=null"]


@pytest.mark.parametrize("overrides, want", [
    ([], 838_380_628),  # DiT-DH-XL: 838.38 M
    # DiT-DH-IG-XL on DINOv3-L-shaped latents [1024, 16, 16] (RAEv2's configuration): 875,216,500
    (["dit.model=dit_dh_ig", "rae.encoder.hidden_size=1024", "rae.encoder.patch_size=16",
      "rae.encoder.input_size=256", "transport.prediction=x"], 875_216_500),
    (["dit.model=lightning_dit"], 676_953_216),  # LightningDiT-XL: 676.95 M
])
def test_xl_parameter_counts_are_exact(overrides, want):
    job = build_job("stage2", C.load_config(C.Stage2Job, XL, overrides), dataset_size=1_281_167)
    assert job.trained.n_trainable == want
    assert job.tokens == 256 and job.total_steps == 800 * (1_281_167 // 1024)


def test_fsdp_shard_is_torch_chunk_of_rank0():
    import torch

    for shape in [(11, 192), (1, 64, 5), (7,), (4096, 3)]:
        assert fsdp_shard(shape, 2) == torch.zeros(shape).chunk(2)[0].numel()


def test_deepspeed_buffers_follow_parallel_deepspeed():
    # DeepSpeed's defaults: one reduce_bucket_size buffer (5e8), two with overlap_comm in ZeRO-1/2, which
    # ZeRO-3 turns on by default without a second buffer; dotted keys and section dicts both count
    assert zero_reduce_buffer({}, 2, 10) == 500_000_000
    assert zero_reduce_buffer({"zero_optimization.overlap_comm": True}, 1, 10) == 1_000_000_000
    assert zero_reduce_buffer({}, 3, 10) == 500_000_000
    assert zero_reduce_buffer({"zero_optimization": {"reduce_bucket_size": 1e3}}, 2, 10) == 1000
    assert zero_reduce_buffer({"zero_optimization.contiguous_gradients": False}, 2, 10) == 10
    shapes = [(10, 10), (400, 400), (7,)]
    assert zero3_persistent(shapes, {}) == 107
    assert zero3_persistent(shapes, {"zero_optimization.stage3_param_persistence_threshold": 0}) == 0
    assert zero3_persistent(shapes, {"zero_optimization.stage3_model_persistence_threshold": 100}) == 100


def test_probe_width_extrapolation_matches_a_direct_measurement():
    """Activations are measured at head widths 8 and 16 and extrapolated linearly; measure the block at
    head width 32 directly and compare (the analytic scaling must hold)."""
    import torch

    from rae_scale.plan.probe import per_sample, saved_bytes

    cfg = C.load_config(C.Stage2Job, TINY2, NO_DATA + ["dit.hidden_size=[64,64]", "dit.num_heads=[2,2]"])
    dit = cfg.dit
    # the real model here has head width 32: the probe predicts it from head widths 8 and 16
    import yaml

    predicted = _dit_probe(yaml.safe_dump(C.to_dict(dit)), "fp32")
    torch.manual_seed(0)
    model = _dit_at_width(dit, 32, "cpu").train()
    blocks = model.transformer_blocks()

    def measure(batch):
        x = torch.randn(batch, dit.in_channels, dit.input_size, dit.input_size)
        t, y = torch.rand(batch), torch.randint(0, dit.num_classes, (batch,))
        return saved_bytes(model, blocks, lambda: model(x, t, y).square().mean())

    direct = per_sample(measure)
    assert predicted.blocks[0] == pytest.approx(direct.blocks[0], rel=0.02)
    assert predicted.blocks[-1] == pytest.approx(direct.blocks[-1], rel=0.02)
    # a block keeps far more than its input: the input is one token x width tensor (fp32)
    tokens = dit.input_size ** 2
    assert direct.block_inputs[0] >= 4 * tokens * 64 and direct.blocks[0] > 5 * direct.block_inputs[0]


def _plan_cli(capsys, *argv):
    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_json_table_and_memory_rules(capsys):
    code, out, err = _plan_cli(capsys, "stage2", TINY2, *NO_DATA, "--gpus", "2", "--gpu", "a100", "--json")
    assert code == 0, err
    p = json.loads(out)
    rows = {(r["strategy"], r["activation_checkpointing"]): r for r in p["rows"]}
    assert {s for s, _ in rows} == {"ddp", "fsdp", "zero1", "zero2", "zero3"}
    assert sum(r["recommended"] for r in p["rows"]) == 1
    best = next(r for r in p["rows"] if r["recommended"])
    assert best["fits"] and best["images_per_s"] >= 0.99 * max(r["images_per_s"] for r in p["rows"] if r["fits"])
    for r in p["rows"]:
        m = r["memory_gib"]
        assert m["total"] == pytest.approx(m["peak"] + m["headroom"])
        assert r["micro_batch"] * r["grad_accum_steps"] * 2 == p["global_batch"]
        assert r["gpu_hours"] == pytest.approx(2 * r["run_hours"])
        assert r["images_per_s"] == pytest.approx(p["global_batch"] / r["step_s"])
    n = p["trainable_params"]
    # AdamW: 8 bytes per parameter (+ 4 per tensor) under DDP; FSDP holds about half on each of 2 ranks
    ddp, fsdp = rows[("ddp", "none")]["memory_gib"], rows[("fsdp", "none")]["memory_gib"]
    assert 8 * n <= ddp["optimizer"] * 2**30 < 8 * n + 4 * 200
    assert fsdp["optimizer"] == pytest.approx(ddp["optimizer"] / 2, rel=0.05)
    # Muon (gmuon): one fp32 momentum per 2-D parameter, AdamW's two moments for the rest
    n2d, muon = p["muon_2d_params"], p["optimizer_state"]["muon"]["replicated_gib"] * 2**30
    assert 0 < n2d < n and 4 * n2d + 8 * (n - n2d) <= muon < 4 * n2d + 8 * (n - n2d) + 4 * 200
    assert p["optimizer_state"]["adamw"]["replicated_gib"] == pytest.approx(ddp["optimizer"])
    # full activation checkpointing keeps less than none at the same micro-batch
    job = build_job("stage2", C.load_config(C.Stage2Job, TINY2, NO_DATA), dataset_size=1000)
    none, full = (plan_memory(job, Setting("ddp", ac, 4, 2, "fp32")) for ac in ("none", "full"))
    assert full.activations < none.activations
    # the step time is the harness's MFU count: 6 N per token at the stated MFU (compute part)
    row = rows[("ddp", "none")]
    peak = 312e12
    assert row["compute_s"] == pytest.approx(6 * n * p["tokens_per_sample"] * p["global_batch"] / 2 / (0.35 * peak))


def test_plan_text_marks_the_recommended_setting(capsys):
    code, out, err = _plan_cli(capsys, "stage2", TINY2, *NO_DATA, "--gpus", "1", "--gpu-memory", "4")
    assert code == 0, err
    marked = [line for line in out.splitlines() if line.startswith("* ")]
    assert len(marked) == 1 and "recommended: parallel.strategy=" in out


def test_stage1_counts_the_gan_networks(capsys):
    cfg = C.load_config(C.Stage1Job, TINY1, NO_DATA)
    job = build_job("stage1", cfg, dataset_size=1000)
    assert set(job.frozen_params) == {"encoder", "lpips", "discriminator backbone"}
    s = Setting("ddp", "none", 2, 1, "fp32")
    with_gan = plan_memory(job, s)
    decoder_only = job.activations("fp32").total * 2
    assert with_gan.activations > decoder_only  # LPIPS + discriminator activations of the generator step
    assert with_gan.frozen >= 4 * sum(job.frozen_params.values())


def test_unknown_gpu_lists_the_known_ones(capsys):
    code, _, err = _plan_cli(capsys, "stage2", TINY2, *NO_DATA, "--gpus", "8", "--gpu", "tpu-v5")
    assert code == 2
    assert "unknown GPU 'tpu-v5'" in err and "h100" in err and "a100" in err and len(err.strip().splitlines()) == 1


def test_fits_nowhere_says_what_is_short(capsys):
    code, _, err = _plan_cli(capsys, "stage2", TINY2, *NO_DATA, "--gpus", "2", "--gpu-memory", "0.05")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "does not fit on 2 x 0.05 GiB" in err and "GiB more than there is" in err
    short = float(err.split("GiB per GPU, ")[1].split(" GiB more")[0])
    need = float(err.split("needs ")[1].split(" GiB")[0])
    assert need > 0.05 and short == pytest.approx(need - 0.05, abs=0.06)


def test_gpu_check_without_gpu_says_so_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: benchmarks/gpu_check.sh runs the real checks there")
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no NVIDIA GPU" in proc.stdout or "no CUDA GPU" in proc.stdout
    assert json.loads((tmp_path / "gpu_check.json").read_text())["gpu"] is None
