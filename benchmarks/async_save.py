"""Training stall of an asynchronous checkpoint save vs a synchronous one (CPU), and resume time.

Model: an MLP of `layers` Linear(hidden, hidden) (default 6 x 4096^2 = 100.7 M parameters) with
Adam, so a checkpoint holds ~1.2 GB (weights + two moments). Stall of a save = the time the
training loop loses to it:
  sync:  the blocking save() call (copy + write + commit);
  async: the blocking save() call (copy into host buffers kept from the first save; the first
         save also allocates them and is reported separately) + the extra time of the training steps
         that run while the background thread writes, over the same steps without a save.
Prints the ratio async/sync (target <= 0.20) of the writer thread, and the time to load the
checkpoint back. (A writer in a child process was measured too and removed: see benchmarks/README.md.)
CPU accounting, to tell CPU scarcity from lock waits on a shared host: the training thread's own CPU
time per step (time.thread_time) during the write and without it, and the CPU time the write cost
(this process's CPU minus the training thread's over the write).

    python benchmarks/async_save.py [--hidden 4096 --layers 6 --threads 1]
"""
from __future__ import annotations

import argparse
import os
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


def run_queue_wait_s() -> float:
    """Time this thread has spent runnable but waiting for a CPU (Linux schedstat), in seconds."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except OSError:
        return 0.0


def step(model, opt, x, cpu_log: list | None = None) -> float:
    """One training step; appends (CPU time, run-queue wait) of the training thread to cpu_log.

    wall - CPU - run-queue wait = time the thread slept: lock (GIL) waits, page-fault I/O, ...
    """
    start, cpu, queued = time.perf_counter(), time.thread_time(), run_queue_wait_s()
    loss = model(x).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if cpu_log is not None:
        cpu_log.append((time.thread_time() - cpu, run_queue_wait_s() - queued))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed after)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating sync/async trials; medians are printed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = args.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
    model, opt = build(args.hidden, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, args.hidden)
    for _ in range(2):  # warm-up, creates Adam state
        step(model, opt, x)
    app = {"train": ModelOptimizerState(model, opt)}

    kinds = ["thread"]
    sync = CheckpointManager(f"{root}/sync", keep_last=1, async_save=False)
    managers, firsts = {}, {}
    for kind in kinds:
        managers[kind] = CheckpointManager(f"{root}/async_{kind}", keep_last=1, async_save=True)
        t0 = time.perf_counter()
        managers[kind].save(1, app)  # allocates the host staging buffers
        first_blocking = time.perf_counter() - t0
        managers[kind].wait()
        firsts[kind] = (first_blocking, time.perf_counter() - t0)

    def async_trial(kind: str, save_step: int) -> dict:
        """One steady-state async save: blocking copy, then training steps until the write ends, then
        as many steps (at least 3) without a save as the baseline."""
        amgr = managers[kind]
        t0 = time.perf_counter()
        cpu0, train0 = time.process_time(), time.thread_time()
        amgr.save(save_step, app)
        blocking = time.perf_counter() - t0
        during, during_cpu = [], []
        while amgr._writer.busy:
            during.append(step(model, opt, x, during_cpu))
        amgr.wait()
        writer_cpu = (time.process_time() - cpu0) - (time.thread_time() - train0)
        base_cpu = []
        base_steps = [step(model, opt, x, base_cpu) for _ in range(max(3, len(during)))]
        base = statistics.median(base_steps)
        extra = max(0.0, sum(during) - base * len(during))
        mean = lambda xs: statistics.mean(xs) if xs else 0.0  # noqa: E731
        return dict(blocking=blocking, during=len(during), write_s=amgr._writer.last_duration_s, base=base,
                    extra=extra, stall=blocking + extra, writer_cpu=writer_cpu,
                    wall_during=mean(during), wall_base=mean(base_steps),
                    train_cpu_during=mean([c for c, _ in during_cpu]), train_cpu_base=mean([c for c, _ in base_cpu]),
                    queue_during=mean([q for _, q in during_cpu]), queue_base=mean([q for _, q in base_cpu]))

    # rounds alternate sync and each async writer, so slow drifts of a shared host hit all alike
    sync_stalls, trials = [], {kind: [] for kind in kinds}
    for r in range(args.rounds):
        t0 = time.perf_counter()
        sync.save(r + 1, app)  # the loop waits for everything: copy + write + commit
        sync_stalls.append(time.perf_counter() - t0)
        for kind in kinds:
            trials[kind].append(async_trial(kind, r + 2))
            t = trials[kind][-1]
            print(f"round {r + 1} {kind:7s}: sync stall {sync_stalls[-1]:.2f} s, async blocking {t['blocking']:.2f} s "
                  f"+ overlap slowdown {t['extra']:.2f} s ({t['during']} steps over a {t['write_s']:.1f} s write; "
                  f"step {t['base']:.2f} s) -> ratio {t['stall'] / sync_stalls[-1]:.2f}", flush=True)
    for kind in kinds:
        managers[kind].wait()
    sync_stall = statistics.median(sync_stalls)
    results = {}
    for kind in kinds:
        med = {key: statistics.median(t[key] for t in trials[kind]) for key in trials[kind][0]}
        med["first_blocking"], med["first_write"] = firsts[kind]
        results[kind] = med

    # resume: a fresh model and optimizer loaded from the synchronous checkpoint
    model2, opt2 = build(args.hidden, args.layers, seed=1)
    loader = CheckpointManager(f"{root}/sync", async_save=False)
    t0 = time.perf_counter()
    step_dir = loader.resolve_resume("auto")
    loader.load(step_dir, {"train": ModelOptimizerState(model2, opt2)})
    resume_s = time.perf_counter() - t0

    size_gb = n_params * 4 * 3 / 1e9
    print(f"model: {n_params / 1e6:.1f} M params, checkpoint ~{size_gb:.2f} GB (weights + Adam moments); "
          f"{args.threads} training thread(s), batch {args.batch}")
    print(f"medians over {args.rounds} rounds (load avg {os.getloadavg()[0]:.1f}):")
    print(f"sync save stall:             {sync_stall:.3f} s")
    for kind, r in results.items():
        print(f"async writer={kind}:")
        print(f"  baseline step (median):      {r['base']:.3f} s")
        print(f"  1st save() blocking / until written: {r['first_blocking']:.3f} s / {r['first_write']:.3f} s")
        print(f"  save() blocking copy:        {r['blocking']:.3f} s")
        print(f"  background write:            {r['write_s']:.3f} s over {r['during']:.0f} training steps")
        print(f"  extra step time:             {r['extra']:.3f} s")
        for when in ("during", "base"):
            wall, cpu, queue = r[f"wall_{when}"], r[f"train_cpu_{when}"], r[f"queue_{when}"]
            print(f"  training step {'during the write' if when == 'during' else 'without a write':16s}: wall "
                  f"{wall:.3f} s = CPU {cpu:.3f} + waiting for a CPU {queue:.3f} + asleep {wall - cpu - queue:.3f} s")
        print(f"  CPU time of the write:       {r['writer_cpu']:.3f} s (writer thread)")
        print(f"  total stall:                 {r['stall']:.3f} s")
        print(f"  stall ratio async/sync:      {r['stall'] / sync_stall:.3f}  (target <= 0.20)")
    print(f"resume (find + load):        {resume_s:.3f} s  ({resume_s / sync_stall:.2f} x sync save)")
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
