"""`rae-scale evaluate t2i` end to end through the CLI: a random text-to-image generator (the tiny t2i
config shrunk: random DiT-DH-IG saved as a weights file, random decoder, the seeded random encoder and
Qwen3 saved in tmp) samples 2 prompts x 2 images, scored by a tiny random CLIP. One rank in this process
and two gloo ranks give the same samples and CLIP scores; bad input is a one-line error (exit 2).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_ranks
from rae_scale import config as C

REPO = Path(__file__).resolve().parents[2]
TINY_T2I = str(REPO / "configs/stage2/tiny_t2i_cpu.yaml")
PROMPTS = ["a red one on a dark background", "a green seven on a dark background"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Every file the evaluation reads, built in tmp: generator parts, CLIP folder, prompts file."""
    from data_pipeline.tiny_captions import caption_words
    from rae_scale.builders import build_dit_model, save_random_encoder
    from rae_scale.eval.clip_score import save_random_clip
    from rae_scale.models.text import save_random_qwen3
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("t2i_eval")
    qwen = save_random_qwen3(str(root / "qwen3"), hidden_size=16, words=caption_words())
    enc = C.EncoderConfig(kind="dinov2", pretrained=None, hidden_size=8, num_layers=1, num_heads=2,
                          intermediate_size=16, patch_size=4, input_size=16)
    encoder = save_random_encoder(enc, str(root / "encoder"), seed=0)
    generator = [f"rae.encoder.pretrained={encoder}", "rae.encoder.hidden_size=8", "rae.encoder.input_size=16",
                 "rae.encoder.intermediate_size=16", "rae.stats_path=null", "rae.decoder.hidden_size=32",
                 "rae.decoder.num_layers=1", "rae.decoder.intermediate_size=64", f"text_encoder.pretrained={qwen}",
                 "text_encoder.hidden_size=16", "dit.hidden_size=[32,32]", "dit.depth=[1,1]"]
    job = C.load_config(C.SampleJob, TINY_T2I, generator)
    torch.manual_seed(0)
    dit = build_dit_model(job.dit)
    with torch.no_grad():  # the zero-initialised output layers would make every sample the same
        for p in dit.parameters():
            p.normal_(0.0, 0.2)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(root / "dit.safetensors"))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "empty.txt").write_text("\n  \n")
    clip = save_random_clip(str(root / "clip"), image_size=24, patch_size=8, seed=5)
    argv = ["evaluate", "t2i", TINY_T2I, *[f"sample.{o}" for o in generator], "--checkpoint",
            str(root / "dit.safetensors"), "--prompts-file", str(root / "prompts.txt"), "--clip-model", clip,
            "--num-samples", "4", "--batch-size", "2", "--num-steps", "2", "--cfg-scale", "3", "--seed", "5",
            "--allow-random-weights"]
    return {"root": root, "argv": argv, "clip": clip}


UNIT, SEED = 2, 1234  # work unit of 2 samples: one per rank; the seed of every process's random decoder


def _evaluate_on_rank(rank: int, world_size: int, argv: list[str]) -> int:
    """A rank of a 2-rank evaluation (each rank samples one unit)."""
    from rae_scale.commands import jobs
    from rae_scale.commands.cli import main

    jobs.UNIT_SIZE = UNIT
    torch.manual_seed(SEED)  # the random decoder (--allow-random-weights) is the same on every rank
    return main(argv)


def _results(folder: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    with np.load(folder / "samples.npz") as f:
        return json.loads((folder / "results.json").read_text()), f["arr_0"], f["arr_1"]


@pytest.mark.slow
def test_one_and_two_ranks_give_the_same_samples_and_clip_scores(world, bare_process, monkeypatch, capsys):
    from rae_scale.commands import jobs
    from rae_scale.commands.cli import main
    from rae_scale.eval.clip_score import load_clip_scorer

    monkeypatch.setattr(jobs, "UNIT_SIZE", UNIT)
    one, two = world["root"] / "one", world["root"] / "two"
    torch.manual_seed(SEED)
    assert main(world["argv"] + ["--output", str(one)]) == 0
    assert run_ranks(_evaluate_on_rank, 2, world["argv"] + ["--output", str(two)]) == [0, 0]
    (doc, images, index), (doc2, images2, index2) = _results(one), _results(two)

    # the samples: 2 per prompt, bit-identical on 1 and 2 ranks, and not all alike
    assert sorted(index.tolist()) == [0, 0, 1, 1] and np.array_equal(index, index2)
    assert images.shape == (4, 16, 16, 3) and np.array_equal(images, images2)
    assert len({im.tobytes() for im in images}) == 4
    assert doc2["sampler"]["world_size"] == 2 and len(list((two / "progress").glob("unit_*.pt"))) == 2
    # the CLIP score: the same on both, and what the CLIP model says about the npz's images and prompts
    assert doc["metrics"]["clip_score"] == doc2["metrics"]["clip_score"] and doc["per_prompt"] == doc2["per_prompt"]
    scorer = load_clip_scorer(world["clip"])
    direct = scorer.scores(torch.from_numpy(images).permute(0, 3, 1, 2), [PROMPTS[i] for i in index]).double()
    assert doc["metrics"]["clip_score"] == pytest.approx(float(direct.mean()), abs=1e-5)
    for i, entry in enumerate(doc["per_prompt"]):
        assert (entry["prompt"], entry["num_samples"]) == (PROMPTS[i], 2)
        assert entry["clip_score"] == pytest.approx(float(direct[torch.from_numpy(index == i)].mean()), abs=1e-5)
    assert direct.max() > 0, "some pair has a positive cosine (else every score would be a clamped 0)"
    # what the results record: prompts and their hash, the CLIP model, the full sampler spec
    assert doc["prompts"]["texts"] == PROMPTS and doc["prompts"]["num_samples_per_prompt"] == [2, 2]
    assert doc["prompts"]["sha256"] == jobs.prompts_sha256(PROMPTS) == doc["spec"]["samples"]["prompts_sha256"]
    assert doc["clip_model"]["source"] == world["clip"] and doc["clip_model"]["weights_sha1"] == scorer.digest
    spec = doc["spec"]
    assert spec["sampler"]["num_steps"] == 2 and spec["guidance"]["method"] == "cfg" and spec["guidance"]["scale"] == 3
    assert spec["text_encoder"]["max_length"] == 8 and spec["checkpoint"]["path"].endswith("dit.safetensors")
    assert spec["samples"] == {"num_samples": 4, "seed": 5, "label_sampling": "equal", "num_prompts": 2,
                               "prompts_sha256": jobs.prompts_sha256(PROMPTS)}
    assert "fid" not in doc["metrics"], "FID only against a reference"

    # resumable: the same job reuses the finished units; another prompt list is refused in one line
    torch.manual_seed(SEED)
    assert main(world["argv"] + ["--output", str(two)]) == 0
    again = json.loads((two / "results.json").read_text())
    assert again["sampler"]["resumed_units"] == 2 and again["metrics"] == doc2["metrics"]
    assert main(world["argv"] + ["--output", str(two), "--prompt", "a blue two on a dark background"]) == 2
    err = capsys.readouterr().err
    assert "another evaluation" in err and "samples.num_prompts" in err and "samples.prompts_sha256" in err


def test_bad_input_is_a_one_line_error(world, bare_process, capsys):
    from rae_scale.commands.cli import main

    root, argv = world["root"], world["argv"]
    without_clip = argv[:argv.index("--clip-model")] + argv[argv.index("--clip-model") + 2:]
    for args, needle in (
            (argv + ["--prompts-file", str(root / "empty.txt")], "holds no prompt"),
            (without_clip, "set config key 'clip_model'"),
            (argv + ["--clip-model", str(root / "no_clip")], "CLIP model folder"),
            (argv + ["--num-samples", "1"], "fewer than the 2 prompts"),
            (argv + ["sample.dit.condition_type=label"], "a class-conditional model: evaluate fid")):
        assert main(args + ["--output", str(root / "errors")]) == 2, needle
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rae-scale: error:")]
        assert len(lines) == 1 and needle in lines[0], (needle, lines)
    assert not (root / "errors" / "progress").exists(), "refused before sampling anything"
