"""The loop's own position, saved in every checkpoint beside the model."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping


@dataclass
class TrainState:
    """Counters saved in every checkpoint (the loop's own position)."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        # `extra` as one JSON string: DCP loads only the keys the target already has, and a fresh
        # TrainState's extra is empty, so a nested dict's entries would be dropped on resume
        return {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
                "extra": json.dumps(self.extra, sort_keys=True)}

    def load_state_dict(self, state: Mapping) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.samples_seen = int(state.get("samples_seen", 0))
        extra = state.get("extra", {})
        self.extra = json.loads(extra) if isinstance(extra, str) else dict(extra)
