"""What the named model sizes stand for (`rae.decoder.preset`, `dit.preset`, `guidance.guidance_model.preset`).

The config checks explicit sizes against these tables at load; models/decoder.py and models/dit.py
build from them (models may import config; config imports no model).
"""
from __future__ import annotations

# ViT-MAE-style decoders; XL keeps MLP 4096, not 4 * 1152 (upstream decoder config).
DECODER_PRESETS: dict[str, dict[str, int]] = {
    "B": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072},
    "L": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 4096},
    "XL": {"hidden_size": 1152, "num_layers": 28, "num_heads": 16, "intermediate_size": 4096},
}

# DiT bodies (DiT paper naming), shared by LightningDiT and the DiT^DH body.
DIT_PRESETS: dict[str, dict[str, int]] = {
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
}
# The wide, shallow DDT head is the same for every DiT^DH size.
DDT_HEAD: dict[str, int] = {"hidden_size": 2048, "depth": 2, "num_heads": 16}

# RAEv2's DiT^DH-IG (`dit_dh_ig`), [body, head]. XL is RAEv2's only published size
# (imagenet-dinov3l-k7.yaml; raev2_method.md section 3): a wider body than RAE's XL, head dims 72 / 128.
# S, B and L are not RAEv2 sizes: they are RAE's DiT^DH sizes (DIT_PRESETS bodies + DDT_HEAD) built
# with RAEv2's architecture, for smaller runs and benchmarks.
DIT_DH_IG_PRESETS: dict[str, dict[str, list[int]]] = {
    **{name: {k: [v, DDT_HEAD[k]] for k, v in body.items()} for name, body in DIT_PRESETS.items() if name != "XL"},
    "XL": {"hidden_size": [1440, 2048], "depth": [28, 2], "num_heads": [20, 16]},
}


def decoder_preset_sizes(preset: str) -> dict:
    """DecoderConfig's size fields for a preset."""
    return dict(DECODER_PRESETS[preset])


def dit_preset_sizes(model: str, preset: str) -> dict:
    """DiTConfig's size lists for a preset: [body, DDT head] for dit_dh and dit_dh_ig, [body] for
    lightning_dit."""
    if model == "dit_dh_ig":
        return {k: list(v) for k, v in DIT_DH_IG_PRESETS[preset].items()}
    body = DIT_PRESETS[preset]
    return {k: [v, DDT_HEAD[k]] if model == "dit_dh" else [v] for k, v in body.items()}
