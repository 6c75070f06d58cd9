"""The training loops' own errors (each message says what to change)."""
from __future__ import annotations

from rae_scale.config import ConfigError


class TrainingSetupError(ConfigError):
    """A configuration that cannot train as asked; the message says what to change."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf with training.on_nonfinite=stop."""
