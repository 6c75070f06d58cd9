"""Frozen text encoder for text-to-image: captions -> condition tokens [B, L, D] + padding mask [B, L].

Same numbers as RAEv2's TextEncoder (raev2_method.md 7.2): the tokenizer pads every caption to
``max_length`` (truncating longer ones), the model's hidden states after its final norm are the
tokens, and the tokenizer's attention mask is the key-padding mask (1 = token, 0 = pad). The empty
caption pads every position, so its mask is all zero: that is the null condition for guidance.
Unlike RAEv2 the base model is loaded (no 151k-vocabulary LM head computed only to be thrown
away; pitfall 9); its final-norm output is the same tensor. Weights load offline from a local
folder or the Hugging Face cache; the module is never trained and always runs in inference mode.
transformers is imported lazily so that importing rae_scale.models stays cheap.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "Qwen/Qwen3-0.6B"


class TextEncoder(nn.Module):
    """tokenizer + frozen transformers base model; ``forward(captions) -> (tokens float32, mask long)``."""

    def __init__(self, tokenizer, model: nn.Module, max_length: int, name: str = ""):
        super().__init__()
        if int(max_length) < 1:
            raise ValueError(f"text encoder max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = int(max_length)
        self.name = name
        self.width = int(model.config.hidden_size)

    def train(self, mode: bool = True):  # frozen: stays in eval mode whatever the caller asks
        return super().train(False)

    def count_truncated(self, captions: list[str]) -> int:
        """How many captions have more tokens than max_length (they are cut)."""
        lengths = self.tokenizer(captions, padding=False, truncation=False)["input_ids"]
        return sum(len(ids) > self.max_length for ids in lengths)

    @torch.inference_mode()
    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            raise ValueError("text encoder takes a list of captions, got one string; wrap it in a list")
        captions = list(captions)
        if not captions:
            raise ValueError("text encoder got an empty list of prompts; give at least one caption "
                             "(the empty string \"\" is the null caption)")
        bad = [type(c).__name__ for c in captions if not isinstance(c, str)]
        if bad:
            raise ValueError(f"text encoder captions must be strings, got {bad[0]}")
        truncated = self.count_truncated(captions)
        if truncated:
            logger.warning("%d of %d prompt(s) longer than max_length=%d tokens were truncated", truncated,
                           len(captions), self.max_length)
        device = next(self.model.parameters()).device
        enc = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return out.last_hidden_state.float(), mask.long()

    def condition(self, captions: Sequence[str], drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, mask) of the captions as a DiT condition: ordinary tensors (the encoder runs in inference
        mode, whose tensors autograd refuses to save), and the null condition (the empty caption's tokens,
        every position masked) where the bool vector `drop` is set: caption dropout for guidance."""
        tokens, mask = self(captions)
        tokens, mask = tokens.clone(), mask.clone()
        if drop is not None:
            null_tokens, null_mask = self.null_condition(1)
            drop = drop.to(tokens.device)
            tokens = torch.where(drop[:, None, None], null_tokens.clone(), tokens)
            mask = torch.where(drop[:, None], null_mask.clone(), mask)
        return tokens, mask

    def null_condition(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's tokens and (all-zero) mask, expanded to ``batch_size`` (RAEv2's get_null_cond).
        Encoded once (the encoder is frozen) and kept."""
        if getattr(self, "_null", None) is None or self._null[0].device != next(self.model.parameters()).device:
            self._null = self([""])
        tokens, mask = self._null
        return tokens.expand(batch_size, *tokens.shape[1:]), mask.expand(batch_size, -1)


def _is_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") != 1


def check_available(pretrained: str | None, *, what: str = "text encoder", key: str = "text_encoder.pretrained",
                    kind: str = "") -> None:
    """Raise FileNotFoundError (one line) unless ``pretrained`` is a folder, or a hub name whose config
    is in the local Hugging Face cache; cheap, so jobs can check before starting workers. `what` names the
    model in the message, `key` the config key that gives it, `kind` the model class a folder must hold
    (e.g. " of a CLIPModel"); eval.clip_score checks its CLIP model with it too."""
    if not pretrained:
        raise FileNotFoundError(f"{what}: no folder or hub name given ({key})")
    path = os.path.expanduser(pretrained)
    if os.path.isdir(path):
        return
    if _is_path(pretrained):
        raise FileNotFoundError(f"{what} folder {pretrained!r} does not exist; give a save_pretrained folder{kind} "
                                "(config.json, weights, tokenizer files) or a hub name in the local cache")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(pretrained, "config.json"), str):
        raise FileNotFoundError(f"{what} {pretrained!r} is not in the local Hugging Face cache and nothing "
                                "is downloaded; give a local save_pretrained folder")


def load_text_encoder(pretrained: str = DEFAULT_TEXT_ENCODER, max_length: int = 256, *,
                      device: str | torch.device = "cpu") -> TextEncoder:
    """A frozen TextEncoder from a save_pretrained folder or a hub name already in the local cache.

    Nothing is downloaded: a missing folder, or a hub name not in the cache, is a FileNotFoundError.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_available(pretrained)
    path = os.path.expanduser(pretrained)
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"text encoder {pretrained!r} cannot be loaded offline ({first}); give a local "
                                "save_pretrained folder or a hub name already in the Hugging Face cache") from None
    finally:
        hf_logging.set_verbosity(old)
    if tokenizer.pad_token is None:
        raise ValueError(f"text encoder {pretrained!r}: its tokenizer has no pad token; captions cannot be "
                         "padded to max_length")
    return TextEncoder(tokenizer, model.to(device), max_length, name=pretrained)


def save_random_qwen3(folder: str, *, hidden_size: int = 24, num_layers: int = 2, num_heads: int = 2,
                      num_kv_heads: int = 1, intermediate_size: int | None = None, seed: int = 0,
                      words: Sequence[str] = ()) -> str:
    """Write a seeded random Qwen3 (causal LM) with a byte-level BPE tokenizer (256 byte tokens; pad
    ``<|endoftext|>``, eos ``<|im_end|>``, no BOS, Qwen's conventions) as a save_pretrained folder: the
    tiny text encoder of tests and demos, loaded back through load_text_encoder. Without `words` the
    tokenizer has no merges (one token per byte); with them each of those words, standing alone, is one
    token (added tokens that match whole words and take the space before them)."""
    import json
    import tempfile

    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    if hidden_size % num_heads or num_heads % num_kv_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"random Qwen3: hidden_size {hidden_size} must split into num_heads {num_heads} heads "
                         f"of even size, and num_heads into num_kv_heads {num_kv_heads} groups")
    specials = ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}  # GPT-2 / Qwen byte order
    with tempfile.TemporaryDirectory(prefix="rae_qwen3_tok_") as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = Qwen2TokenizerFast(vocab_file=os.path.join(tmp, "vocab.json"),
                                       merges_file=os.path.join(tmp, "merges.txt"), unk_token=None,
                                       bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       additional_special_tokens=["<|im_start|>"])
    if words:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(w, single_word=True, lstrip=True, normalized=False) for w in words])
    ids = tokenizer.convert_tokens_to_ids(specials)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=hidden_size // num_heads, intermediate_size=intermediate_size or 2 * hidden_size,
                         max_position_embeddings=4096, eos_token_id=ids[0], pad_token_id=ids[1],
                         bos_token_id=None, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
