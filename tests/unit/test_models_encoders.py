"""Frozen encoders: latent shapes at 256/512 px, frozen state, non-affine final norm, local pretrained."""
import pytest
import torch

from rae_scale.models import build_encoder

# (kind, patch, encoder input for 256-px images, for 512-px images)
KINDS = [("dinov2", 14, 224, 448), ("siglip2", 16, 256, 512), ("mae", 16, 256, 512)]


def _tiny(kind, patch, input_size):
    return build_encoder(kind, hidden_size=32, num_layers=1, num_heads=2, patch_size=patch,
                         input_size=input_size, intermediate_size=64)


@pytest.mark.parametrize("kind,patch,in256,in512", KINDS)
def test_latent_shapes_256_and_512(kind, patch, in256, in512):
    torch.manual_seed(0)
    for image, size in ((256, in256), (512, in512)):
        enc = _tiny(kind, patch, size)
        x = torch.rand(2, 3, image, image)
        tokens = enc(x)
        grid = size // patch  # 16 at 256 px, 32 at 512 px
        assert tokens.shape == (2, grid * grid, 32)
        assert enc.latent_shape == (32, grid, grid)
        # final LayerNorm without affine: every token is standardised over channels
        assert torch.allclose(tokens.mean(-1), torch.zeros(2, grid * grid), atol=1e-5)
        assert torch.allclose(tokens.var(-1, unbiased=False), torch.ones(2, grid * grid), atol=1e-3)


def test_frozen_eval_no_grad():
    enc = _tiny("dinov2", 14, 224)
    enc.train()
    assert not enc.training and not enc.model.training
    assert all(not p.requires_grad for p in enc.parameters())
    x = torch.rand(1, 3, 224, 224, requires_grad=True)
    assert not enc(x).requires_grad
    with pytest.raises(ValueError, match="allowed"):
        build_encoder("clip")


def test_preprocess_resize_and_standardise():
    enc = _tiny("siglip2", 16, 32)
    x = torch.rand(1, 3, 48, 48)
    ref = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.allclose(enc.preprocess(x), (ref - 0.5) / 0.5)


@pytest.mark.parametrize("kind,patch", [("dinov2", 14), ("mae", 16)])
def test_pretrained_local_folder_matches(tmp_path, kind, patch):
    torch.manual_seed(0)
    enc = _tiny(kind, patch, 4 * patch)
    # the HF model's final norm is non-affine in our wrapper; save a normal HF model
    hf = type(enc.model)(enc.model.config)
    hf.load_state_dict(enc.model.state_dict(), strict=False)
    hf.save_pretrained(tmp_path)
    loaded = build_encoder(kind, pretrained=str(tmp_path), input_size=4 * patch)
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(loaded(x), enc(x), atol=1e-5)
    assert loaded.hidden_size == 32 and loaded.patch_size == patch
