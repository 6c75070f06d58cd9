"""DiT-DH and LightningDiT: golden forward outputs, upstream init, parameter counts."""
import pytest
import torch

from rae_scale.interop import load_checked
from rae_scale.models import DIT_PRESETS, DiTwDDTHead, LightningDiT, build_dit
from rae_scale.models.layers import RoPE2D, sincos_2d
from upstream_models import build_stage2_from_upstream


def _load_fixture(fixtures_dir, name):
    return torch.load(fixtures_dir / name, weights_only=False)


@pytest.mark.parametrize("name", ["dit_dh_tiny.pt", "lightning_dit_tiny.pt"])
def test_upstream_forward_matches_golden(fixtures_dir, name):
    fx = _load_fixture(fixtures_dir, name)
    model = build_stage2_from_upstream(fx["upstream_class"], fx["upstream_params"])
    load_checked(model, fx["state_dict"], config=fx["upstream_params"])  # exact keys and shapes
    model.eval()
    fw = fx["forward"]
    with torch.no_grad():
        out = model(fw["x"], fw["t"], fw["y"])
    ref = fw["out"]
    assert out.shape == ref.shape
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


@pytest.mark.parametrize("model_name", ["dit_dh", "lightning_dit"])
def test_init_is_zero_output_and_identity_blocks(model_name):
    torch.manual_seed(0)
    kw = dict(input_size=4, in_channels=8, num_classes=10)
    sizes = {"dit_dh": dict(hidden_size=[32, 48], depth=[2, 1], num_heads=[2, 3]),
             "lightning_dit": dict(hidden_size=32, depth=2, num_heads=2)}[model_name]
    model = build_dit(model_name, **kw, **sizes).eval()
    x = torch.randn(3, 8, 4, 4)
    t, y = torch.rand(3), torch.tensor([0, 5, 10])
    # adaLN-Zero + zero final layer: the network outputs exactly 0 at init
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    # every block is the identity at init (zero gates)
    block = model.blocks[0]
    h = torch.randn(3, 16, block.norm1.weight.numel())
    c = torch.randn(3, h.shape[-1])
    assert torch.equal(block(h, c), h)
    expected_blocks = sum(sizes["depth"]) if model_name == "dit_dh" else sizes["depth"]
    assert len(model.transformer_blocks()) == expected_blocks
    # the class table's init std is upstream's 0.02 unless label_embed_std says otherwise
    for std in (0.02, 1.0):
        torch.manual_seed(0)
        table = build_dit(model_name, **kw, **sizes, label_embed_std=std).y_embedder.embedding_table.weight
        assert abs(table.std().item() / std - 1) < 0.25, (std, table.std().item())


def test_pos_embed_and_rope_tables_are_analytic():
    d, g = 8, 3
    table = sincos_2d(d, g)
    # token (row r, col c): first half encodes the column, second half the row
    r, c = 2, 1
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    expect = torch.cat([torch.sin(c * omega), torch.cos(c * omega), torch.sin(r * omega), torch.cos(r * omega)])
    assert torch.allclose(table[r * g + c].double(), expect, atol=1e-6)
    rope = RoPE2D(dim=4, grid_size=g)  # head dim 8: 4 channels by row, 4 by column
    freqs = 1.0 / 10000 ** (torch.tensor([0.0, 2.0]) / 4)
    angles = torch.cat([(r * freqs).repeat_interleave(2), (c * freqs).repeat_interleave(2)])
    assert torch.allclose(rope.freqs_cos[r * g + c], angles.cos())
    # rotating a unit vector on pair (0, 1) by the row angle r * f0
    q = torch.zeros(1, 1, g * g, 8)
    q[..., 0] = 1.0
    out = rope(q)[0, 0, r * g + c]
    assert torch.allclose(out[:2], torch.tensor([torch.cos(torch.tensor(r * 1.0)), torch.sin(torch.tensor(r * 1.0))]))


def test_xl_parameter_counts_on_meta():
    with torch.device("meta"):
        dit_dh = build_dit("dit_dh", "XL")
        lightning = build_dit("lightning_dit", "XL")
    trainable = sum(p.numel() for p in dit_dh.parameters() if p.requires_grad)
    print(f"DiT^DH-XL trainable parameters: {trainable / 1e6:.2f} M")
    assert abs(trainable - 838.4e6) / 838.4e6 < 1e-3
    assert len(dit_dh.transformer_blocks()) == 30
    n_light = sum(p.numel() for p in lightning.parameters() if p.requires_grad)
    print(f"LightningDiT-XL trainable parameters: {n_light / 1e6:.2f} M")
    assert abs(n_light - 677.0e6) / 677.0e6 < 1e-3
    with torch.device("meta"):
        small = build_dit("dit_dh", "S")
    assert abs(sum(p.numel() for p in small.parameters() if p.requires_grad) - 196.4e6) / 196.4e6 < 1e-3


def test_build_dit_presets_and_errors():
    with torch.device("meta"):
        m = build_dit("dit_dh", "B", input_size=4, in_channels=8)
    assert isinstance(m, DiTwDDTHead) and m.num_encoder_blocks == DIT_PRESETS["B"]["depth"]
    with torch.device("meta"):
        assert isinstance(build_dit("lightning_dit", "S", input_size=4, in_channels=8), LightningDiT)
    with pytest.raises(ValueError, match="allowed"):
        build_dit("dit_dh", "XXL")
    with pytest.raises(ValueError, match="allowed"):
        build_dit("unet")
    with pytest.raises(ValueError, match="patch_size 1"):
        DiTwDDTHead(input_size=4, patch_size=2, in_channels=8, hidden_size=[16, 16], depth=[1, 1], num_heads=[2, 2])


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    model = build_dit("lightning_dit", input_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2,
                      num_classes=3, class_dropout_prob=0.5)
    y = torch.zeros(1000, dtype=torch.long)
    emb = model.y_embedder
    null = emb.embedding_table.weight[3]
    dropped = (emb(y, train=True) == null).all(dim=1).float().mean().item()
    assert 0.4 < dropped < 0.6
    assert not (emb(y, train=False) == null).all(dim=1).any()
