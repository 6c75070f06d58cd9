"""Training stall of an asynchronous checkpoint save vs a synchronous one (CPU), and resume time.

Model: an MLP of `layers` Linear(hidden, hidden) (default 6 x 4096^2 = 100.7 M parameters) with
Adam, so a checkpoint holds ~1.2 GB (weights + two moments). Stall of a save = the time the
training loop loses to it:
  sync:  the blocking save() call (copy + write + commit);
  async: the blocking save() call (copy into host buffers kept from the first save; the first
         save also allocates them and is reported separately) + the extra time of the training steps
         that run while the background thread writes, over the same steps without a save.
Prints the ratio async/sync (target <= 0.20), and the time to load the checkpoint back.

    python benchmarks/async_save.py [--hidden 4096 --layers 6 --dir /tmp/ckpt_bench]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch

from rae_scale.checkpoint import CheckpointManager, ModelOptimizerState


def build(hidden: int, layers: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    return model, opt


def step(model, opt, x) -> float:
    start = time.perf_counter()
    loss = model(x).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed after)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = args.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
    model, opt = build(args.hidden, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, args.hidden)
    for _ in range(2):  # warm-up, creates Adam state
        step(model, opt, x)
    app = {"train": ModelOptimizerState(model, opt)}

    # synchronous save: the loop waits for everything
    sync = CheckpointManager(f"{root}/sync", keep_last=1, async_save=False)
    t0 = time.perf_counter()
    sync.save(1, app)
    sync_stall = time.perf_counter() - t0

    # asynchronous save: measure steps while the background writer runs, then the same
    # number of steps without any save as the baseline
    amgr = CheckpointManager(f"{root}/async", keep_last=1, async_save=True)
    t0 = time.perf_counter()
    amgr.save(1, app)  # first save allocates the host staging buffers
    first_blocking = time.perf_counter() - t0
    amgr.wait()
    t0 = time.perf_counter()
    amgr.save(2, app)  # steady state: copies into the kept buffers
    blocking = time.perf_counter() - t0
    during = []
    while amgr._writer.busy:
        during.append(step(model, opt, x))
    amgr.wait()
    write_s = amgr._writer.last_duration_s
    baseline = [step(model, opt, x) for _ in range(max(3, len(during)))]
    base = statistics.median(baseline)
    extra = max(0.0, sum(during) - base * len(during))
    async_stall = blocking + extra

    # resume: a fresh model and optimizer loaded from the synchronous checkpoint
    model2, opt2 = build(args.hidden, args.layers, seed=1)
    loader = CheckpointManager(f"{root}/sync", async_save=False)
    t0 = time.perf_counter()
    step_dir = loader.resolve_resume("auto")
    loader.load(step_dir, {"train": ModelOptimizerState(model2, opt2)})
    resume_s = time.perf_counter() - t0

    size_gb = n_params * 4 * 3 / 1e9
    print(f"model: {n_params / 1e6:.1f} M params, checkpoint ~{size_gb:.2f} GB (weights + Adam moments)")
    print(f"baseline step (median):      {base:.3f} s")
    print(f"sync save stall:             {sync_stall:.3f} s")
    print(f"async 1st save() (allocates): {first_blocking:.3f} s")
    print(f"async save() blocking copy:  {blocking:.3f} s")
    print(f"async background write:      {write_s:.3f} s over {len(during)} training steps")
    print(f"async extra step time:       {extra:.3f} s")
    print(f"async total stall:           {async_stall:.3f} s")
    print(f"stall ratio async/sync:      {async_stall / sync_stall:.3f}  (target <= 0.20)")
    print(f"resume (find + load):        {resume_s:.3f} s  ({resume_s / sync_stall:.2f} x sync save)")
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
