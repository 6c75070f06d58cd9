"""Streaming datasets for training: prepared image shards (MDS, webdataset) and latent caches.

See :mod:`rae_scale.data.loader` for the resume guarantee of each format.
"""
from .latents import load_stats
from .loader import build_image_loader, build_latent_loader
from .transforms import adm_center_crop

__all__ = ["build_image_loader", "build_latent_loader", "load_stats", "adm_center_crop"]
