"""Which committed checkpoints to delete: keep the last k, every N-th step, pinned ones, the newest."""
from __future__ import annotations

from collections.abc import Iterable


def validate_retention(keep_last: int | None, keep_every: int | None) -> None:
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None (keep all), got {keep_last!r}")
    if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
        raise ValueError(f"keep_every must be a positive int or None (off), got {keep_every!r}")


def steps_to_delete(committed: Iterable[int], *, keep_last: int | None, keep_every: int | None = None,
                    pinned: Iterable[int] = ()) -> list[int]:
    """Steps among `committed` that retention removes, ascending.

    keep_last=None keeps everything. The newest committed step is never deleted.
    """
    validate_retention(keep_last, keep_every)
    steps = sorted(set(committed))
    if keep_last is None or not steps:
        return []
    keep = set(steps[-keep_last:]) | {steps[-1]} | set(pinned)
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return [s for s in steps if s not in keep]
