"""The frozen text encoder (models.text) against RAEv2's own TextEncoder run on the fixture's tiny Qwen3,
its null condition, the text-conditioned DiT-DH-IG fed by it, truncation, the random tiny Qwen3 we
build for demos, and the errors for bad input.

Shapes and lengths are read from the fixture (shared/fixtures/raev2/dit_dh_ig_text.pt), so the tests
pass on fixture sets of other sizes.
"""
from __future__ import annotations

import logging

import pytest
import torch

from rae_scale.models.text import TextEncoder, load_text_encoder, save_random_qwen3

ATOL = 1e-5


@pytest.fixture(scope="module")
def raev2_dir():
    from conftest import FIXTURES

    if not FIXTURES.exists():
        pytest.fail(f"golden fixtures not found at {FIXTURES}; set RAE_SCALE_FIXTURES")
    return FIXTURES / "raev2"


@pytest.fixture(scope="module")
def fx(raev2_dir):
    return torch.load(raev2_dir / "dit_dh_ig_text.pt", weights_only=False)


@pytest.fixture(scope="module")
def encoder(raev2_dir, fx) -> TextEncoder:
    max_length = fx["text_encoder_io"]["tokens"].shape[1]
    return load_text_encoder(str(raev2_dir / "qwen3_tiny"), max_length)


def test_tokens_mask_null_condition_and_dit_output_match_raev2(encoder, fx):
    io, null = fx["text_encoder_io"], fx["null_text"]
    # RAEv2 kept transformers' CausalLM; ours is the base model: same final-norm output, no LM head
    assert type(encoder.model).__name__ == "Qwen3Model"
    ids = encoder.tokenizer(io["captions"], padding="max_length", max_length=encoder.max_length, truncation=True,
                            return_tensors="pt")["input_ids"]
    assert torch.equal(ids, io["input_ids"])
    tokens, mask = encoder(io["captions"])
    assert tokens.shape == io["tokens"].shape and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, io["tokens"], rtol=0, atol=ATOL)
    assert torch.equal(mask, io["attention_mask"].long())
    assert encoder.width == io["tokens"].shape[-1]
    assert tokens.is_inference()  # encoded in inference mode: no autograd graph, never trained

    # the empty caption pads every position: the all-masked null condition (RAEv2's encode_text([""]))
    null_tokens, null_mask = encoder.null_condition(1)
    torch.testing.assert_close(null_tokens, null["tokens"], rtol=0, atol=ATOL)
    assert torch.equal(null_mask, null["attention_mask"].long()) and not null_mask.any()
    expanded = null["get_null_cond"]
    b = expanded["attn_mask"].shape[0]
    nt, nm = encoder.null_condition(b)
    torch.testing.assert_close(nt, expanded["context"], rtol=0, atol=ATOL)
    assert torch.equal(nm, expanded["attn_mask"].long())

    # the text-conditioned DiT-DH-IG on our encoder's tokens gives RAEv2's output for its encoder's tokens
    from unit.test_models_dit_dh_ig import _loaded

    model = _loaded(fx)
    inputs = fx["inputs"]
    with torch.no_grad():
        x_full, x_base = model(inputs["x"], inputs["t"], (tokens.clone(), mask))
    torch.testing.assert_close(x_full, io["dit_out"], rtol=0, atol=ATOL)
    torch.testing.assert_close(x_base, io["dit_out_ig_base"], rtol=0, atol=ATOL)


def test_frozen_whatever_the_caller_asks(encoder):
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_long_prompt_is_truncated_with_one_warning(encoder, caplog):
    """A caption over max_length keeps its first max_length tokens (the model is causal, so they equal
    the encoding of the caption's prefix), and one warning per call counts the truncated ones."""
    n = encoder.max_length
    long = "b" * (3 * n)
    with caplog.at_level(logging.WARNING, logger="rae_scale.models.text"):
        tokens, mask = encoder([long, "a", long[: n + 1]])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"2 of 3 prompt(s) longer than max_length={n} tokens were truncated"]
    assert mask[0].all() and mask[2].all()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rae_scale.models.text"):
        prefix_tokens, prefix_mask = encoder([long[:n]])  # exactly max_length tokens: not truncated
    assert not caplog.records
    torch.testing.assert_close(tokens[0], prefix_tokens[0], rtol=0, atol=1e-6)
    assert torch.equal(mask[0], prefix_mask[0])


def test_bad_input_is_one_line_error(encoder, tmp_path):
    with pytest.raises(ValueError, match=r"^text encoder got an empty list of prompts; .*\"\" is the null"):
        encoder([])
    with pytest.raises(ValueError, match="takes a list of captions, got one string"):
        encoder("a cat")
    with pytest.raises(ValueError, match="captions must be strings, got int"):
        encoder(["a cat", 3])
    missing = tmp_path / "no_such_qwen"
    with pytest.raises(FileNotFoundError) as err:
        load_text_encoder(str(missing), 8)
    assert "\n" not in str(err.value) and f"text encoder folder {str(missing)!r} does not exist" in str(err.value)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_text_encoder("nobody/no-such-model-rae-scale", 8)


def test_random_tiny_qwen3_tokenises_as_qwen_and_round_trips(tmp_path, fx):
    """The seeded random Qwen3 of the tiny configs: Qwen's byte-level token ids (as the fixture's
    tokenizer, built by another script), pad <|endoftext|>, no BOS; saved and loaded back offline."""
    io = fx["text_encoder_io"]
    folder = save_random_qwen3(str(tmp_path / "qwen3"), hidden_size=16, num_layers=1, num_heads=2, seed=3)
    enc = load_text_encoder(folder, io["tokens"].shape[1])
    ids = enc.tokenizer(io["captions"], padding="max_length", max_length=enc.max_length, truncation=True,
                        return_tensors="pt")["input_ids"]
    assert torch.equal(ids, io["input_ids"])
    tokens, mask = enc(io["captions"])
    assert tokens.shape == (*io["tokens"].shape[:2], 16) and torch.equal(mask, io["attention_mask"].long())
    again = load_text_encoder(save_random_qwen3(str(tmp_path / "again"), hidden_size=16, num_layers=1,
                                                num_heads=2, seed=3), enc.max_length)
    assert torch.equal(again(io["captions"])[0], tokens)  # seeded: the same weights
    with pytest.raises(ValueError, match="must split into num_heads 3 heads"):
        save_random_qwen3(str(tmp_path / "bad"), hidden_size=16, num_heads=3)
