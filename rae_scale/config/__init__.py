"""Typed job configs: `schema` (the dataclasses, one generator section shared by stage-2, sample and
eval jobs), `load` (YAML + dotted overrides, validation, one-line ConfigErrors), `derive` (fields
derived at load: the latent shape from the encoder, presets vs explicit sizes), `presets` (what the
named model sizes stand for), `save` and `redact`.

The job and section dataclasses and what commands and loops call are re-exported here:
`from rae_scale import config as C; C.load_config(C.Stage2Job, ...)`.
"""
from rae_scale.config.derive import check_decoder_sizes, check_dit_sizes, latent_shape, resolve
from rae_scale.config.errors import ConfigError
from rae_scale.config.load import _dataclass_of, _field_type, from_dict, load_config, validate
from rae_scale.config.redact import is_secret_key, redact
from rae_scale.config.save import save_resolved, to_dict, to_yaml
from rae_scale.config.schema import (JOBS, CacheLatentsJob, CacheTextJob, CheckpointConfig, DataConfig, DecoderConfig, DiTConfig,
                                     EncoderConfig, EvalJob, GANConfig, GeneratorSections, GuidanceConfig,
                                     LaunchJob, LoggingConfig, OnlineEvalConfig, OptimizerConfig, ParallelConfig,
                                     PrepareJob, RAEConfig, RepaConfig, RunConfig, SampleJob, SamplerConfig, ScheduleConfig,
                                     Stage1Job, Stage2Job, StatsJob, TextEncoderConfig, TrainingConfig, TransportConfig,
                                     from_generator)

__all__ = [
    "JOBS", "CacheLatentsJob", "CacheTextJob", "CheckpointConfig", "ConfigError", "DataConfig",
    "DecoderConfig", "DiTConfig", "EncoderConfig", "EvalJob", "GANConfig", "GeneratorSections", "GuidanceConfig",
    "LaunchJob", "LoggingConfig", "OnlineEvalConfig", "OptimizerConfig", "ParallelConfig", "PrepareJob",
    "RAEConfig", "RepaConfig", "RunConfig", "SampleJob", "SamplerConfig", "ScheduleConfig", "Stage1Job", "Stage2Job",
    "StatsJob", "TextEncoderConfig", "TrainingConfig", "TransportConfig", "check_decoder_sizes", "check_dit_sizes", "from_dict",
    "from_generator", "is_secret_key", "latent_shape", "load_config", "redact", "resolve", "save_resolved",
    "to_dict", "to_yaml", "validate",
]
