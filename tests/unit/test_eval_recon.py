"""evaluate_reconstruction against independent computations: perfect reconstructions, scikit-image."""
import numpy as np
import pytest
import torch

from rae_scale.eval.recon import evaluate_reconstruction


@pytest.fixture(scope="module")
def images():
    from skimage import data

    imgs = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    crops = [torch.from_numpy(np.ascontiguousarray(im[:96, :96])).permute(2, 0, 1).float() / 255 for im in imgs]
    return torch.stack(crops)


def test_identity_reconstruction_is_perfect(images):
    m = evaluate_reconstruction([(images, None)], lambda x: x)
    assert abs(m["rfid"]) < 1e-3 and m["ssim"] == pytest.approx(1.0) and m["num_samples"] == 4


def test_psnr_ssim_match_scikit_image(images):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(0)
    noisy = lambda x: (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)  # noqa: E731
    recon = noisy(images)
    m = evaluate_reconstruction([(images, None)], lambda x: recon)
    x8 = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    r8 = (recon.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    ps = np.mean([peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(x8, r8)])
    ss = np.mean([structural_similarity(a, b, data_range=255, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False) for a, b in zip(x8, r8)])
    assert m["psnr"] == pytest.approx(ps, abs=1e-4)
    assert m["ssim"] == pytest.approx(ss, abs=1e-4)
    assert m["rfid"] > 0.1
