"""CLIP score (eval.clip_score) against independent computations: CLIP's own image processor for the
preprocessing, CLIPModel's forward (logits_per_image / logit_scale.exp() is the cosine) for the score;
scoring a sample npz in chunks; offline loading errors. A tiny random CLIP folder stands in for a real one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rae_scale.eval.clip_score import iter_npz_rows, load_clip_scorer, save_random_clip, score_npz

PROMPTS = ["a red one on a dark background", "a blue two on a dark background",
           "Ünïcode, punctuation; and a much longer prompt " * 4]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    return save_random_clip(str(tmp_path_factory.mktemp("clip") / "clip"), image_size=24, patch_size=8,
                            max_tokens=48)


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return load_clip_scorer(clip_folder)


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth gradients plus noise: the resize's rounding and both of its passes matter."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = torch.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)])
    return (base[None] + torch.rand(n, 3, h, w, generator=g) * 60).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("h,w", [(32, 40), (48, 30), (16, 16), (24, 24)])
def test_preprocessing_equals_clips_image_processor(scorer, clip_folder, h, w):
    from transformers import CLIPImageProcessor

    images = _images(3, h, w)
    expected = CLIPImageProcessor.from_pretrained(clip_folder)(
        images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
    ours = scorer.preprocess(images)
    assert ours.shape == expected.shape == (3, 3, 24, 24) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_clip_score_equals_clipmodels_own_forward(scorer, clip_folder):
    from transformers import AutoTokenizer, CLIPModel

    images = _images(3, 32, 32, seed=1)
    model = CLIPModel.from_pretrained(clip_folder, local_files_only=True).eval()
    enc = AutoTokenizer.from_pretrained(clip_folder)(PROMPTS, padding=True, truncation=True, max_length=48,
                                                     return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    pixel_values=scorer.preprocess(images))
    cosine = out.logits_per_image / model.logit_scale.exp()  # [image, prompt]
    expected = 100 * cosine.diagonal().clamp(min=0)
    torch.testing.assert_close(scorer.scores(images, PROMPTS), expected, atol=1e-5, rtol=0)
    # the embeddings themselves: unit vectors whose dot products are the model's cosines
    ours = scorer.image_embeds(images) @ scorer.text_embeds(PROMPTS).T
    torch.testing.assert_close(ours, cosine, atol=1e-7, rtol=0)
    # every image against every prompt: a negative cosine counts 0 (Hessel et al.'s max(cos, 0))
    assert (cosine > 0).any() and (cosine < 0).any(), "the random CLIP gives cosines of both signs"
    all_pairs = torch.stack([scorer.scores(images, [p] * 3) for p in PROMPTS], 1)
    torch.testing.assert_close(all_pairs, 100 * cosine.clamp(min=0), atol=1e-5, rtol=0)


def test_scoring_an_npz_per_prompt_in_chunks(scorer, tmp_path):
    images = _images(7, 16, 16, seed=2)
    index = np.array([2, 0, 1, 0, 2, 2, 0])
    path = tmp_path / "samples.npz"
    np.savez(path, images.permute(0, 2, 3, 1).numpy(), index)
    rows = list(iter_npz_rows(str(path), "arr_0", chunk=3))
    assert [len(r) for r in rows] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(rows), images.permute(0, 2, 3, 1).numpy())
    result = score_npz(scorer, str(path), PROMPTS, batch_size=3)
    direct = scorer.scores(images, [PROMPTS[i] for i in index]).double()
    np.testing.assert_allclose(result["per_image"], direct.numpy(), atol=1e-5)
    assert result["clip_score"] == pytest.approx(float(direct.mean()), abs=1e-5)
    for i, entry in enumerate(result["per_prompt"]):
        mine = direct[torch.from_numpy(index == i)]
        assert (entry["prompt"], entry["num_samples"]) == (PROMPTS[i], len(mine))
        assert entry["clip_score"] == pytest.approx(float(mine.mean()), abs=1e-5)
    with pytest.raises(ValueError, match="prompt indices span 0..2, but there are 2 prompts"):
        score_npz(scorer, str(path), PROMPTS[:2])


def test_a_missing_clip_model_is_a_one_line_error(tmp_path):
    for source, match in ((str(tmp_path / "nope"), "does not exist"),
                          ("nobody/no-such-clip", "not in the local Hugging Face cache")):
        with pytest.raises(FileNotFoundError, match=match) as err:
            load_clip_scorer(source)
        assert "\n" not in str(err.value)
