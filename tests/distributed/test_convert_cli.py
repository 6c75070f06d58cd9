"""`rae-scale convert` on checkpoints written by the real loops, one test per direction, each checked
against the checkpoint itself (consolidated in this process) or a round trip back.

The CLI's `main` runs in this process (its argument parsing, the command and its JSON line on stdout):
six conversions, no six interpreter start-ups."""
from __future__ import annotations

import contextlib
import functools
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_cli import STAGE2_5_STEPS, flat, reference_run

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    # the session's shared 5-step single-process run (read only: outputs go to root)
    return {"stage2": reference_run(tiny_data, "stage2", STAGE2_5_STEPS), "root": tmp_path_factory.mktemp("convert")}


def _convert(kind: str, source, output, *extra) -> dict:
    """`rae-scale convert KIND SOURCE OUTPUT ...`: its exit code must be 0; returns its JSON summary line."""
    from rae_scale.commands.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["convert", kind, str(source), str(output), *extra])
    assert code == 0, err.getvalue()[-4000:]
    return json.loads(out.getvalue().strip().splitlines()[-1])


@functools.cache
def _consolidated(run: Path) -> dict:
    """The run's step-5 checkpoint consolidated in this process, once per module (callers only read it)."""
    from rae_scale.checkpoint import consolidate

    return consolidate(str(run / "checkpoints" / "step-00000005"))


def test_ema_safetensors_fp32_and_bf16(runs):
    ema = flat(_consolidated(runs["stage2"])["ema"])
    out = _convert("ema-safetensors", runs["stage2"], runs["root"] / "ema.safetensors")
    assert out["step"] == 5
    fp32 = load_file(str(runs["root"] / "ema.safetensors"))
    assert fp32.keys() == ema.keys() and all(torch.equal(fp32[k], ema[k]) for k in ema)
    _convert("ema-safetensors", runs["stage2"], runs["root"] / "ema_bf16.safetensors", "--dtype", "bf16")
    bf16 = load_file(str(runs["root"] / "ema_bf16.safetensors"))
    for k, v in ema.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert bf16[k].dtype == want.dtype and torch.equal(bf16[k], want), k


def test_consolidate_is_one_weights_only_file(runs):
    out = runs["root"] / "full.pt"
    _convert("consolidate", runs["stage2"], out)
    saved = torch.load(out, weights_only=True)
    assert saved["metadata"]["step"] == 5
    want, got = flat(_consolidated(runs["stage2"])), flat(saved["state"])
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_upstream_round_trip_generates_the_same_images(runs):
    """run -> upstream .pt -> safetensors; sampling from either file equals sampling from the run."""
    from rae_scale import config as C
    from rae_scale.commands.generate import load_rae_for_decoding, load_stage2
    from rae_scale.diffusion.sample_fn import make_sample_fn

    upstream = runs["root"] / "upstream.pt"
    _convert("to-upstream", runs["stage2"], upstream)
    pt = torch.load(upstream, weights_only=True)
    state = _consolidated(runs["stage2"])
    for part in ("model", "ema"):
        want = flat(state[part])
        assert pt[part].keys() == want.keys() and all(torch.equal(pt[part][k], want[k]) for k in want)
    back = runs["root"] / "from_upstream.safetensors"
    _convert("from-upstream", upstream, back)

    cfg = C.load_config(C.Stage2Job, runs["stage2"] / "config.yaml")
    rae = load_rae_for_decoding(cfg.rae, "cpu")  # one decoder for all three (the tiny one is random)
    images = []
    for source in (runs["stage2"], upstream, back):
        job = C.SampleJob(run=cfg.run, rae=cfg.rae, dit=cfg.dit, transport=cfg.transport,
                          sampler=C.SamplerConfig(num_steps=3), checkpoint=str(source))
        fn = make_sample_fn(job, load_stage2(job, "cpu"), rae, "cpu")
        images.append(fn(torch.tensor([1, 7]), torch.tensor([0, 1])))
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])


def test_from_diffusers_writes_what_rae_scale_loads(runs, fixtures_dir):
    """diffusers AutoencoderRAE folder (golden fixture) -> decoder safetensors, stats .pt, encoder folder.

    (`to-diffusers` of a tiny training run is refused with a clear error: diffusers builds encoders of
    fixed shapes only; its writer is checked against diffusers itself in tests/unit/test_interop_diffusers.py.)
    """
    from rae_scale.interop.diffusers_rae import load_diffusers_autoencoder
    from rae_scale.data.latents import load_stats
    from rae_scale.models.encoders import build_encoder

    source = fixtures_dir / "diffusers_rae_tiny"
    out = _convert("from-diffusers", source, runs["root"] / "from_diffusers")
    want = load_diffusers_autoencoder(source)
    decoder = load_file(out["decoder"])
    for k, v in want.decoder.state_dict().items():
        assert torch.equal(decoder[k], v), k
    mean, var = load_stats(str(out["stats"]))  # the training's reader of statistics files
    assert torch.allclose(mean.flatten(), want.latent_mean.flatten()) and torch.allclose(var.flatten(), want.latent_var.flatten())
    encoder = build_encoder(want.encoder.kind, pretrained=out["encoder"], input_size=want.encoder.input_size)
    x = torch.rand(2, 3, want.encoder.input_size, want.encoder.input_size)
    with torch.no_grad():
        assert torch.allclose(encoder(x), want.encoder(x), atol=1e-6)
