"""Streaming datasets for training: prepared image shards (MDS, webdataset) and latent caches.

See :mod:`rae_scale.data.loader` for the resume guarantee of each format. The names below load on
first use (PEP 562), so torch-free submodules (schema) stay cheap for a launcher to import.
"""
import importlib

_HOMES = {"load_stats": "latents", "build_image_loader": "loader", "build_latent_loader": "loader",
          "adm_center_crop": "transforms"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
