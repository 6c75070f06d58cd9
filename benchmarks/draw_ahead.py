"""Per-sample draws on the critical path of a stage-2 step: drawn inline vs drawn ahead (DrawAhead).

DiT-DH-S (configs/stage2/dit_dh_s_256.yaml: body 384 x 12, the DDT head) on DINOv2-B latents
[768, 16, 16], `--batch` samples per micro-batch, AdamW. Each step needs the samples' time, noise
and label-dropout draws keyed by (seed, step, sample id) (rae_scale.seeding). The baseline draws
them inline, as the loop did; the other run wraps the same batch source in DrawAhead, which draws
the next micro-batch's values in a thread while this one computes. Printed for each: the median
step time and the share of it the main thread spends drawing (inline) or waiting for the draws
(ahead), and the ratio of step times. Same process, same model and batches.

    PYTHONPATH=. .venv/bin/python benchmarks/draw_ahead.py [--batch 8 --steps 6 --threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from rae_scale import config as C
from rae_scale.builders import build_dit_model
from rae_scale.diffusion.transport import Transport
from rae_scale.seeding import Stream, per_sample_seeds, seeded_bernoulli, seeded_normal, seeded_uniform
from rae_scale.train.draw_ahead import DrawAhead

SHAPE = (768, 16, 16)


class Batches:
    """An endless source of latent batches with dataset ids, with a position (as BatchStream has)."""

    def __init__(self, batch: int):
        self.batch, self.k = batch, 0
        self.latent = torch.randn((batch, *SHAPE), generator=torch.Generator().manual_seed(0))

    def next_batch(self) -> dict:
        ids = torch.arange(self.k * self.batch, (self.k + 1) * self.batch)
        self.k += 1
        return {"latent": self.latent, "label": ids % 1000, "index": ids}

    def state_dict(self) -> dict:
        return {"k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = state["k"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = C.load_config(C.Stage2Job, "configs/stage2/dit_dh_s_256.yaml")
    torch.manual_seed(0)
    model = build_dit_model(cfg.dit, load_weights=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    transport = Transport.from_config(cfg.transport)
    shift = transport.shift_for(SHAPE)

    def draws(batch: dict, step: int) -> dict:
        seeds = per_sample_seeds(0, step, batch["index"])
        return {"t": transport.time_from_uniform(seeded_uniform(seeds, Stream.TIME), shift),
                "noise": seeded_normal(seeds, SHAPE, Stream.NOISE),
                "label_drop": seeded_bernoulli(seeds, 0.1, Stream.LABEL_DROP)}

    def train_step(batch: dict) -> None:
        y = torch.where(batch["label_drop"], torch.full_like(batch["label"], 1000), batch["label"])
        parts = transport.loss_parts(lambda x_t, t: model(x_t, t, y), batch["latent"], batch["t"], batch["noise"])
        parts.total.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    results = {}
    for mode in ("inline (baseline)", "ahead"):
        source = Batches(args.batch)
        ahead = DrawAhead(source, draws, accum_steps=1) if mode == "ahead" else None
        if ahead:
            ahead.start(0)
        steps, waits = [], []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            if ahead:
                batch = ahead.next_batch(step, 0)
            else:
                batch = source.next_batch()
                batch.update(draws(batch, step))
            t1 = time.perf_counter()
            train_step(batch)
            if step:  # the first step warms up
                steps.append(time.perf_counter() - t0)
                waits.append(t1 - t0)
        if ahead:
            ahead.close()
        results[mode] = (statistics.median(steps), statistics.median(waits))
    print(f"DiT-DH-S, latents {SHAPE}, batch {args.batch}, {args.steps} timed steps, {args.threads} threads")
    base = results["inline (baseline)"][0]
    for mode, (step, wait) in results.items():
        print(f"{mode}: {step:.3f} s/step, drawing on the critical path {wait * 1e3:.1f} ms "
              f"({100 * wait / step:.1f}% of the step); step time ratio {step / base:.3f}")


if __name__ == "__main__":
    main()
