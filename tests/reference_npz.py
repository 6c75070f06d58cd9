"""ADM-format reference npz files for tests: the package reads them (rae_scale.eval.reference), never writes them."""
from __future__ import annotations

import numpy as np


def save_reference_npz(path, stats, images: np.ndarray | None = None) -> None:
    """Write mu, sigma [, mu_s, sigma_s] of a ReferenceStats [, arr_0: uint8 NHWC images], as ADM's files hold."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma}
    if stats.mu_s is not None:
        arrays.update(mu_s=stats.mu_s, sigma_s=stats.sigma_s)
    if images is not None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        arrays["arr_0"] = images
    np.savez(path, **arrays)
