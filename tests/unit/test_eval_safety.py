"""Evaluation and sampling never score the wrong weights: `evaluate fid` reuses work units only under
the same sampling specification, `reconstruct --checkpoint` decodes with that checkpoint's decoder,
and the jobs refuse random trained weights unless asked (issue 21, items 5 and 9).

The stage-1 and stage-2 "runs" are tiny models saved through the real checkpoint code (the layout
the training loops write: `model` and `ema` states in a committed step folder); everything runs
through the real CLI in this process.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rae_scale import config as C
from rae_scale.builders import build_dit_model, build_rae, save_random_encoder
from rae_scale.checkpoint import CheckpointManager
from rae_scale.commands.cli import main
from rae_scale.parallel.ema import EMA
from rae_scale.parallel.state import ModelState

REPO = Path(__file__).resolve().parents[2]


def _save_run(run_dir: Path, step: int, model: torch.nn.Module, ema_module: torch.nn.Module) -> None:
    """A committed step folder as the loops write it: trained weights under `model`, EMA under `ema`."""
    ema = EMA(ema_module, decay=0.99, source_params=lambda: list(model.parameters()))
    CheckpointManager(str(run_dir), async_save=False).save(step, {"model": ModelState(model), "ema": ema})


def _seeded(build, seed: int):
    torch.manual_seed(seed)
    return build()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval_safety")
    s2 = C.load_config(C.Stage2Job, REPO / "configs/stage2/tiny_cpu.yaml", ["rae.stats_path=null"])
    encoder = save_random_encoder(C.EncoderConfig(**{**C.to_dict(s2.rae.encoder), "pretrained": None}),
                                  str(root / "encoder"), seed=0)
    rae_cfg = C.RAEConfig(**{**C.to_dict(s2.rae), "encoder": C.EncoderConfig(**{**C.to_dict(s2.rae.encoder),
                                                                                 "pretrained": encoder}),
                             "decoder": s2.rae.decoder})
    # stage 1: trained decoder and its EMA differ, so the test sees which one was used
    decoders = [_seeded(lambda: build_rae(rae_cfg).decoder, seed) for seed in (1, 2)]
    _save_run(root / "stage1", 5, *decoders)
    dits = [_seeded(lambda: build_dit_model(s2.dit), seed) for seed in (3, 4)]
    _save_run(root / "stage2", 1, *dits)
    job = C.SampleJob(rae=rae_cfg, dit=s2.dit, transport=s2.transport, sampler=C.SamplerConfig(num_steps=2),
                      num_samples=1, batch_size=4)
    (root / "sample.yaml").write_text(C.to_yaml(job))  # no weights: --checkpoint and friends give them
    return {"root": root, "stage1": root / "stage1", "stage2": root / "stage2", "sample_yaml": root / "sample.yaml",
            "rae_cfg": rae_cfg, "ema_decoder": decoders[1], "model_decoder": decoders[0], "dits": dits}


@pytest.fixture
def one_rank(bare_process):
    """evaluate joins (or creates) its one-rank process group itself (conftest's bare_process tears it down)."""


def _error_line(capsys, *needles: str) -> str:
    """The one stderr line that carries the error (logging may add other lines)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if needles[0] in line]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- item 5: resume only the same spec


def test_fid_progress_is_reused_only_under_the_same_sampling_spec(runs, one_rank, tmp_path, capsys):
    out = tmp_path / "eval"
    cfg = C.EvalJob(sample=C.SampleJob(**{**vars(C.load_config(C.SampleJob, runs["sample_yaml"])),
                                          "checkpoint": str(runs["stage2"])}),
                    num_samples=4, batch_size=4, output=str(out))
    cfg.sample.rae.decoder_checkpoint = str(runs["stage1"])
    (tmp_path / "eval.yaml").write_text(C.to_yaml(cfg))
    argv = ["evaluate", "fid", str(tmp_path / "eval.yaml")]

    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    spec = first["spec"]  # the results say exactly what produced them
    assert spec["checkpoint"]["path"].endswith("step-00000001") and spec["checkpoint"]["step"] == 1
    assert spec["checkpoint"]["weights"] == "ema" and spec["decoder"]["step"] == 5
    assert spec["sampler"] == {"mode": "ode", "method": "euler", "num_steps": 2}
    assert spec["guidance"] == {"method": "none"} and spec["time_shift"]["shift_base"] == 256
    assert first["sampler"]["resumed_units"] == 0
    unit = next((out / "progress").glob("unit_*.pt"))
    stamp = unit.stat().st_mtime_ns

    # the same specification: the finished unit is reused, not sampled again, and scores the same
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["sampler"]["resumed_units"] == 1 and again["metrics"] == first["metrics"]

    # another guidance: refused in one line naming the keys; nothing reused or rewritten
    assert main(argv + ["sample.guidance.method=cfg", "sample.guidance.scale=2.0"]) == 2
    _error_line(capsys, "another evaluation", "guidance.method", "guidance.scale", "fresh output folder")
    # another checkpoint version: training committed a newer step into the run folder
    _save_run(runs["stage2"], 2, *runs["dits"])
    assert main(argv) == 2
    _error_line(capsys, "another evaluation", "checkpoint.commit", "checkpoint.path", "checkpoint.step")
    assert unit.stat().st_mtime_ns == stamp and json.loads((out / "results.json").read_text()) == again


# ----------------------------------------------------------------------------- item 9: the weights given, or none


def _image(path: Path) -> Path:
    yy, xx = np.mgrid[0:40, 0:48]
    rgb = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _decode(rae_cfg: C.RAEConfig, image: Path, decoder_state: dict | None = None) -> np.ndarray:
    """What reconstruct must produce, decoded here through the builder (uint8 HWC)."""
    from rae_scale.data.transforms import adm_center_crop

    rae = build_rae(rae_cfg).eval()
    if decoder_state is not None:
        rae.decoder.load_state_dict(decoder_state)
    with Image.open(image) as img:
        img = adm_center_crop(img.convert("RGB"), rae.decoder.image_size)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        recon = rae.decode(rae.encode(x).latent).sample.clamp(0, 1)
    return (recon * 255).round()[0].permute(1, 2, 0).byte().numpy()


def test_reconstruct_decodes_with_the_checkpoint_decoder(runs, tmp_path, capsys):
    image = _image(tmp_path / "img.png")
    assert main(["reconstruct", str(runs["sample_yaml"]), "--image", str(image), "--checkpoint", str(runs["stage1"]),
                 "--output", str(tmp_path / "out")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pair = np.asarray(Image.open(result["output"]))
    got = pair[:, pair.shape[1] // 2:]
    loaded = C.RAEConfig(**{**vars(runs["rae_cfg"]), "decoder_checkpoint": str(runs["stage1"])})
    np.testing.assert_array_equal(got, _decode(loaded, image))  # the builder's loading path
    np.testing.assert_array_equal(got, _decode(runs["rae_cfg"], image, runs["ema_decoder"].state_dict()))  # EMA
    assert not np.array_equal(got, _decode(runs["rae_cfg"], image, runs["model_decoder"].state_dict()))
    mse = np.mean((pair[:, : pair.shape[1] // 2].astype(float) - got) ** 2)
    assert result["psnr"] == pytest.approx(10 * np.log10(255.0 ** 2 / mse))


def test_jobs_refuse_random_trained_weights_unless_allowed(runs, tmp_path, capsys):
    image = _image(tmp_path / "img.png")
    sample = str(runs["sample_yaml"])
    assert main(["reconstruct", sample, "--image", str(image), "--output", str(tmp_path / "r")]) == 2
    _error_line(capsys, "reconstruct would use random weights", "the decoder (give --checkpoint", "--allow-random-weights")
    assert main(["generate", sample, "--output", str(tmp_path / "g")]) == 2
    _error_line(capsys, "generate would use random weights", "the stage-2 model (give --checkpoint",
                "the decoder (give rae.decoder_checkpoint=", "--allow-random-weights")
    # a stage-2 checkpoint alone is not enough: the decoder is trained too
    assert main(["generate", sample, "--checkpoint", str(runs["stage2"]), "--output", str(tmp_path / "g")]) == 2
    line = _error_line(capsys, "generate would use random weights", "the decoder")
    assert "stage-2" not in line
    assert main(["evaluate", "fid", "--output", str(tmp_path / "e")]) == 2
    _error_line(capsys, "evaluate fid would use random weights", "sample.dit.checkpoint=",
                "sample.rae.decoder_checkpoint=")
    assert main(["evaluate", "recon", "data_url=unused", "--output", str(tmp_path / "e")]) == 2
    _error_line(capsys, "evaluate recon would use random weights", "the decoder (give --checkpoint")
    assert not (tmp_path / "r").exists() and not (tmp_path / "g").exists()

    # with every weight given, or random weights asked for explicitly, it runs
    common = ["--class-ids", "0,1", "--num-samples", "1", "--num-steps", "2"]
    assert main(["generate", sample, "--checkpoint", str(runs["stage2"]), f"rae.decoder_checkpoint={runs['stage1']}",
                 "--output", str(tmp_path / "g"), *common]) == 0
    assert main(["generate", sample, "--allow-random-weights", "--output", str(tmp_path / "g_random"), *common]) == 0
    assert (tmp_path / "g_random" / "grid.png").exists() and len(list((tmp_path / "g").glob("*_class*.png"))) == 2
    assert main(["reconstruct", sample, "--image", str(image), "--allow-random-weights",
                 "--output", str(tmp_path / "r")]) == 0
