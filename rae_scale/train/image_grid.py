"""Image grids of the runs (reconstructions, samples) as PNG files on any fsspec URL."""
from __future__ import annotations

import math
import os
from typing import Mapping

import torch

from rae_scale.storage import filesystem

GRID_DIR = "samples"  # the run folder's subfolder of grids (Run.write_grid)


def save_image_grid(images: torch.Tensor, url: str, nrow: int | None = None,
                    storage_options: Mapping | None = None) -> str:
    """Images in [0, 1] (B, 3, H, W) -> one PNG grid at url (local path or fsspec URL)."""
    import io

    from PIL import Image
    from torchvision.utils import make_grid

    images = images.detach().float().clamp(0, 1).cpu()
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    fs, path = filesystem(url, storage_options)
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(buf.getvalue())
    return url
