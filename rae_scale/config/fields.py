"""Field declarations that carry their allowed values, so `load.validate` can name them in errors.

`choices` (enumerations), `min`/`max`/`above` (ranges) and `check`/`allowed` (anything else) live in
the dataclass field's metadata.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field

_FIRST = object()


def choice(*choices, default=_FIRST):
    """An enumeration; the first choice is the default unless `default` names another one (to keep
    a natural order in the error message, e.g. ZeRO stages 1, 2, 3 with default 2)."""
    value = choices[0] if default is _FIRST else default
    assert value in choices, f"default {value!r} is not one of {choices}"
    return field(default=value, metadata={"choices": tuple(choices)})


def ranged(default, lo=None, hi=None, *, above=None):
    """A number field with inclusive bounds lo/hi, or an exclusive lower bound `above` (epochs > 0)."""
    return field(default=default, metadata={"min": lo, "max": hi, "above": above})


def checked(default=dataclasses.MISSING, default_factory=dataclasses.MISSING, *, check, allowed: str):
    """A field whose value `check(value)` must accept; `allowed` says what is, for the error message."""
    return field(default=default, default_factory=default_factory, metadata={"check": check, "allowed": allowed})


def two_betas(v) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in v))


def resume_value(v) -> bool:
    """auto, never, or something that names a folder: a path or URL (the manager then checks it is a
    committed step folder). A bare word is a typo of auto/never, not a folder."""
    # "step-": checkpoint.layout.STEP_PREFIX, spelled here so that loading a config imports no torch
    return isinstance(v, str) and (v in ("auto", "never") or "/" in v or v.startswith("step-"))
