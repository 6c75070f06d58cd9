"""The one exception type for user mistakes in configs."""
from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line and says what is allowed."""
