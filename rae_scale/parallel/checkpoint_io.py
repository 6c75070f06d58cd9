"""Save and resume a strategy's whole training state through one CheckpointManager (DCP Statefuls).

The strategy's Statefuls (model, optimizer, LR schedule, EMA) go through torch.distributed.checkpoint
beside the loop's own entries (train state, data position, ...), so one save holds everything a
resume needs. Strategies with a native checkpoint format subclass this (deepspeed_checkpoint_io.py).
"""
from __future__ import annotations

from typing import Any, Mapping


class CheckpointIO:
    """What a loop calls to checkpoint: save(step), resume(setting), wait(); `.manager` is the manager."""

    def __init__(self, strategy, manager, extra: Mapping[str, Any]):
        self.strategy = strategy
        self.manager = manager
        self.extra = dict(extra)

    def app_state(self) -> dict[str, Any]:
        """Every Stateful the manager writes, by checkpoint key (built fresh: wrappers hold no state)."""
        return {**self.strategy.checkpoint_states(), **self.extra}

    def save(self, step: int, metadata: Mapping[str, Any] | None = None, pin: bool = False) -> None:
        self.manager.save(step, self.app_state(), metadata=metadata, pin=pin, before_commit=None)

    def resume(self, resume: str) -> str | None:
        """Load the checkpoint that `resume` (auto, never, a step folder) names; its step folder, or None."""
        step_dir = self.manager.resolve_resume(resume)
        if not step_dir:
            return None
        meta = self.manager.load(step_dir, self.app_state())
        step_dir = meta.get("step_dir", step_dir)
        self.after_load(step_dir, meta)
        return step_dir

    def after_load(self, step_dir: str, meta: Mapping[str, Any]) -> None:
        """What a native format loads after the manager's own entries (nothing for DCP)."""

    def wait(self) -> None:
        """Block until a background save has finished."""
        self.manager.wait()
