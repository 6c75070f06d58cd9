"""Streaming datasets for training: prepared image shards (MDS, webdataset) and latent caches.

See :mod:`rae_scale.data.loader` for the resume guarantee of each format.
"""
from .batch_stream import BatchStream
from .latents import load_stats, save_stats
from .loader import ShardLoader, build_image_loader, build_latent_loader, latent_cache_info
from .transforms import adm_center_crop

__all__ = ["BatchStream", "ShardLoader", "build_image_loader", "build_latent_loader", "latent_cache_info",
           "load_stats", "save_stats", "adm_center_crop"]
