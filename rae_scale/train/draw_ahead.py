"""The next micro-batch and its per-sample random draws, made in a background thread during the step.

A stage-2 step needs, besides its batch, each sample's time, noise and label-dropout draw, keyed by
(run seed, step, sample id). Drawn inline they sit on the critical path: at DiT-DH-XL speeds a GPU
waits while one CPU core draws millions of normals. Here a worker thread fetches micro-batch k+1 and
draws its values while the device runs micro-batch k; the values are the same numbers (same
functions, same keys), only made earlier.

The data position stays exact: the thread snapshots the stream's state before it fetches a batch,
and that snapshot (the position after the last batch the loop consumed) is what a checkpoint saves.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from rae_scale.data.mixture import shares_of


class DrawAhead:
    """Wraps a BatchStream: next_batch(step, micro) returns the batch with `draw(batch, step)` merged in.

    start(step) begins (or, after a resume, restarts) the read-ahead at optimizer step `step`, micro-batch
    0. state_dict / load_state_dict are the stream's position as the loop has consumed it, so the
    checkpoint wiring takes this object in the stream's place.
    """

    def __init__(self, stream, draw: Callable[[dict, int], dict], *, accum_steps: int, pin_memory: bool = False):
        """pin_memory: put the batch's tensors in page-locked memory (in the thread), so that copies to a
        GPU with non_blocking=True overlap the step."""
        self.stream, self.draw, self.accum_steps = stream, draw, int(accum_steps)
        self.pin_memory = bool(pin_memory)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draw-ahead")
        self._pending: Future | None = None  # -> (stream state before the batch, batch with draws)
        self._position: tuple[int, int] | None = None  # (step, micro) of the pending batch

    @property
    def batches_per_epoch(self) -> int:
        return self.stream.batches_per_epoch

    def start(self, step: int) -> None:
        self._drop_pending()
        self._position = (int(step), 0)
        self._submit()

    def next_batch(self, step: int, micro: int) -> dict:
        if self._position != (step, micro):
            raise RuntimeError(f"DrawAhead read ahead for (step, micro-batch) {self._position}, the loop asked for "
                               f"{(step, micro)}: call start(step) after a resume")
        _, batch = self._pending.result()
        micro += 1
        self._position = (step + 1, 0) if micro == self.accum_steps else (step, micro)
        self._submit()
        return batch

    def state_dict(self) -> dict:
        if self._pending is None:
            return self.stream.state_dict()
        return self._pending.result()[0]

    def source_shares(self) -> dict[str, float]:
        """The realised share of each mixture source among the samples the loop has consumed (the batch read
        ahead not counted); {} unless the stream mixes sources."""
        if not self.stream.source_shares():  # one folder: no need to wait for the batch being read ahead
            return {}
        state = self.state_dict()
        return shares_of(state.get("mixture"), state.get("source_counts"))

    def load_state_dict(self, state: dict) -> None:
        self._drop_pending()
        self.stream.load_state_dict(state)

    def close(self) -> None:
        """Stop reading ahead (a batch read ahead is discarded, the stream left where it is)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        self._pool.shutdown(wait=True)

    def _submit(self) -> None:
        self._pending = self._pool.submit(self._fetch, self._position[0])

    def _fetch(self, step: int) -> tuple[dict, dict]:
        before = self.stream.state_dict()
        batch = self.stream.next_batch()
        batch.update(self.draw(batch, step))
        if self.pin_memory:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return before, batch

    def _drop_pending(self) -> None:
        """Forget a batch read ahead (it is not consumed: the stream goes back to the snapshot)."""
        if self._pending is not None:
            before, _ = self._pending.result()
            self._pending = None
            self.stream.load_state_dict(before)
