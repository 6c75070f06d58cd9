"""Ray jobs of the data pipeline: build shards (prepare), cache latents, latent statistics.

Entry points: :func:`data_pipeline.prepare.run_prepare`,
:func:`data_pipeline.cache_latents.run_cache_latents`, :func:`data_pipeline.stats.run_stats`;
test and demo images come from :mod:`data_pipeline.images`.
"""
