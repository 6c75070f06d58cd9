"""Stage-2 training loop overhead: the real loop's steady-state step time against a bare PyTorch loop.

Both sides train the same network on the same latents with the same batch, in one process, with
their steps interleaved one for one so both see the same load on a shared machine:

- real: ``rae_scale.train.stage2.main(cfg)`` in this process, config = configs/stage2/tiny_cpu.yaml
  (the tiny digits latent cache, [32, 8, 8], built through data_pipeline/tiny.py when missing) with
  the DiT-DH enlarged to a few M parameters so the compute is realistic on CPU. With
  ``logging.every_steps=1`` the loop logs one metrics row per step. A wrapper around
  MetricsLogger.log (it calls the real method) reads the wall and CPU clocks after each row, then runs
  one step of a bare loop, then reads the clocks again; a real step's time is the gap from the end of
  that bare step to the next row: everything the loop does per step (data, per-sample seeded draws,
  forward + backward through the DDP wrapper, clip, AdamW, LR schedule, EMA, finiteness check,
  metrics). Warm-up steps are dropped; checkpoint and sample-grid intervals lie beyond max_steps, and
  the loop's final save and grid come after the last row, so no save is timed. The rows' own
  images_per_s (a window that leaves out the log call) are printed as a cross-check.
- bare: a plain model + AdamW + the same flow-matching loss, global-RNG draws, no strategy wrapper,
  no metrics. Three variants take turns, one step each after every real step:
    bare/memory/plain      the brief's baseline: batches sliced from an in-memory tensor
    bare/memory/clip+ema   + grad-norm clip and an EMA lerp (the algorithm the config asks for)
    bare/loader/clip+ema   + the same MDS latent loader (BatchStream) the real loop reads from
  The last one differs from the real loop only by the loop's machinery (per-sample seeds, DDP on one
  rank, timers, metrics), so real / bare-loader-clip+ema is the loop overhead proper.
Wall and CPU time are both reported; with --threads 1 the process's CPU time (time.process_time;
idle loader threads add nothing to it) swings far less with other jobs than wall time does.

    PYTHONPATH=. .venv/bin/python benchmarks/loop_overhead.py [--threads 1 --batch 32 --steps 60]
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def clocks() -> tuple[float, float]:
    """(wall, CPU time of the process: the training thread plus helpers such as gloo's for DDP)."""
    return time.perf_counter(), time.process_time()


# ----------------------------------------------------------------------------- shared with stage2_throughput.py


def stage2_config(yaml_path: str | Path, overrides: list[str]):
    """A validated Stage2Job from a YAML file and dotted overrides (what the CLI builds)."""
    from rae_scale import config as C

    return C.load_config(C.Stage2Job, str(yaml_path), list(overrides))


def quiet_overrides(run_dir: str, max_steps: int) -> list[str]:
    """Overrides that keep saves and sample grids out of the timed steps and log every step."""
    return [f"run.dir={run_dir}", f"training.max_steps={max_steps}", "training.epochs=null",
            "logging.every_steps=1", "logging.wandb='off'", f"logging.sample_every_steps={10 * max_steps}",
            f"checkpoint.every_steps={10 * max_steps}", "checkpoint.every_epochs=null", "checkpoint.resume=never",
            "data.num_workers=0"]


def run_real_loop(cfg, after_row=None) -> tuple[list[dict], dict[int, tuple[float, float]]]:
    """Run the stage-2 loop in this process; return its metrics.jsonl rows and each step's (wall, CPU)
    time, measured from the previous row (or the end of after_row there) to the step's own row.

    after_row(step), when given, runs after each row is logged, outside the measured time.
    """
    from rae_scale.train import metrics
    from rae_scale.train.stage2 import main as stage2_main

    times: dict[int, tuple[float, float]] = {}
    last: list[tuple[float, float]] = []
    real_log = metrics.MetricsLogger.log

    def log_and_time(self, step, metrics):
        real_log(self, step, metrics)
        now = clocks()
        if last:
            times[int(step)] = (now[0] - last[0][0], now[1] - last[0][1])
        if after_row is not None:
            after_row(int(step))
        last[:] = [clocks()]

    metrics.MetricsLogger.log = log_and_time
    try:
        code = stage2_main(cfg)
    finally:
        metrics.MetricsLogger.log = real_log
    if code:
        raise RuntimeError(f"stage 2 exited with code {code}")
    return metrics.read_metrics(cfg.run.dir), times


def steady_state(rows: list[dict], times: dict[int, tuple[float, float]], warmup: int, global_batch: int) -> dict:
    """Median step wall / CPU time and the rows' phase times after the warm-up steps."""
    rows = [r for r in rows if r["step"] > warmup]
    steps = [s for s in sorted(times) if s > warmup]
    if not rows or not steps:
        raise RuntimeError("no metrics rows after the warm-up steps")
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {"steps": len(steps),
            "wall_s": statistics.median(times[s][0] for s in steps),
            "cpu_s": statistics.median(times[s][1] for s in steps),
            "row_step_s": statistics.median(global_batch / r["images_per_s"] for r in rows),
            "images_per_s": med("images_per_s"), "tokens_per_s": med("tokens_per_s"),
            "data_s": med("time_data_s"), "fwd_bwd_s": med("time_fwd_bwd_s"), "optimizer_s": med("time_optimizer_s")}


# ----------------------------------------------------------------------------- the bare loop


class BareLoop:
    """A plain PyTorch flow-matching loop on the config's model, batch and latents, one step per call.

    data="memory": batches sliced from latents read once into a tensor; "loader": the real BatchStream.
    extras: also clip the gradient norm and update an EMA copy, as the config asks the real loop to.
    """

    def __init__(self, cfg, *, data: str, extras: bool):
        from rae_scale.builders import build_dit_model
        from rae_scale.diffusion.transport import Transport
        from rae_scale.data.batch_stream import BatchStream

        self.name = f"bare/{data}/{'clip+ema' if extras else 'plain'}"
        self.cfg, self.extras = cfg, extras
        self.batch = cfg.training.global_batch_size
        torch.manual_seed(cfg.run.seed)
        self.model = build_dit_model(cfg.dit)
        self.model.y_embedder.dropout_prob = 0.0  # label dropout below, as in the real loop
        self.model.train()
        o = cfg.optimizer
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                     eps=o.eps)
        self.ema_params = list(copy.deepcopy(self.model).requires_grad_(False).parameters()) if extras else []
        tr = cfg.transport
        self.transport = Transport(time_dist=tr.time_dist, mu=tr.time_mu, sigma=tr.time_sigma,
                                   shift_dim=tr.shift_dim, shift_base=tr.shift_base)
        self.shift = self.transport.shift_for((cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size))
        self.stream = BatchStream.for_latents(cfg.data, micro_batch=self.batch, rank=0, world_size=1,
                                              seed=cfg.run.seed)
        self.memory = data == "memory"
        if self.memory:
            first = [self.stream.next_batch() for _ in range(min(4, self.stream.batches_per_epoch))]
            self.pool_z = torch.cat([b["latent"] for b in first]).float()
            self.pool_y = torch.cat([b["label"] for b in first])
        self.times: list[tuple[float, float]] = []

    def _next_batch(self):
        if self.memory:
            idx = torch.randint(0, len(self.pool_y), (self.batch,))
            return self.pool_z[idx], self.pool_y[idx]
        b = self.stream.next_batch()
        return b["latent"].float(), b["label"]

    def step(self) -> None:
        cfg, n = self.cfg, self.batch
        start = clocks()
        z, y = self._next_batch()
        t = self.transport.sample_time(n, shift=self.shift)
        eps = torch.randn_like(z)
        y = torch.where(torch.rand(n) < cfg.dit.class_dropout_prob, torch.full_like(y, cfg.dit.num_classes), y)
        x_t, target = self.transport.interpolate(z, eps, t)
        loss = (self.model(x_t, t, y) - target).pow(2).flatten(1).mean(dim=1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.extras and cfg.training.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.training.clip_grad)
        self.opt.step()
        if self.extras:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_params, self.params, 1.0 - cfg.training.ema_decay)
        float(loss.detach())
        end = clocks()
        self.times.append((end[0] - start[0], end[1] - start[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60, help="timed real steps after the warm-up (each bare "
                                                           "variant gets a third of them)")
    ap.add_argument("--warmup", type=int, default=6, help="real steps dropped (each bare variant gets a third)")
    ap.add_argument("--hidden", default="192,384", help="DiT-DH body,head widths")
    ap.add_argument("--depth", default="4,1", help="DiT-DH body,head depths")
    ap.add_argument("--heads", default="3,6")
    ap.add_argument("--config", default=str(REPO / "configs/stage2/tiny_cpu.yaml"))
    ap.add_argument("--per-sample-times", action="store_true",
                    help="draw training times with one Transport.sample_time call per sample, as the loop did "
                         "before the time transform was batched (same values, for a before/after comparison)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.per_sample_times:
        from rae_scale.diffusion.transport import Transport

        batched = Transport.time_from_uniform  # one transform call per sample instead, as before batching
        Transport.time_from_uniform = lambda self, u, shift: torch.cat(
            [batched(self, u[i:i + 1], shift) for i in range(len(u))])
    os.chdir(REPO)  # the tiny config's data paths are relative to the repo root
    work = tempfile.mkdtemp(prefix="bench_loop_")
    try:
        overrides = quiet_overrides(os.path.join(work, "run"), args.warmup + args.steps) + [
            f"training.global_batch_size={args.batch}", f"dit.hidden_size=[{args.hidden}]",
            f"dit.depth=[{args.depth}]", f"dit.num_heads=[{args.heads}]"]
        cfg = stage2_config(args.config, overrides)
        if cfg.data.build_if_missing:
            from data_pipeline.tiny import ensure_tiny_data

            ensure_tiny_data(cfg, stage="stage2")
        bare = [BareLoop(cfg, data="memory", extras=False), BareLoop(cfg, data="memory", extras=True),
                BareLoop(cfg, data="loader", extras=True)]
        n_params = sum(p.numel() for p in bare[0].params)
        tokens = (cfg.dit.input_size // cfg.dit.patch_size) ** 2
        print(f"DiT-DH hidden {cfg.dit.hidden_size} depth {cfg.dit.depth} heads {cfg.dit.num_heads}: "
              f"{n_params / 1e6:.2f} M params; latents {cfg.dit.in_channels}x{cfg.dit.input_size}x"
              f"{cfg.dit.input_size} ({tokens} tokens), batch {args.batch}, {args.threads} thread(s), "
              f"{args.warmup} warm-up + {args.steps} timed steps; seeded times "
              f"{'per sample (old path)' if args.per_sample_times else 'batched'}; load avg "
              f"{os.getloadavg()[0]:.1f}", flush=True)

        def bare_turn(step: int) -> None:
            bare[step % len(bare)].step()
            if step == args.warmup:  # the bare loops' own warm-up steps are dropped too
                for b in bare:
                    b.times.clear()

        rows, times = run_real_loop(cfg, after_row=bare_turn)
        real = steady_state(rows, times, args.warmup, args.batch)
        print(f"\n{'real stage2.main':22s} median step wall {real['wall_s'] * 1e3:8.1f} ms  cpu "
              f"{real['cpu_s'] * 1e3:8.1f} ms  ({real['steps']} steps; its rows: step {real['row_step_s'] * 1e3:.1f} ms"
              f" = data {real['data_s'] * 1e3:.1f} + fwd/bwd incl. draws {real['fwd_bwd_s'] * 1e3:.1f} + optimizer "
              f"{real['optimizer_s'] * 1e3:.1f} ms; {real['images_per_s']:.1f} img/s)")
        print(f"real loop step time / bare step time (load avg {os.getloadavg()[0]:.1f}):")
        for b in bare:
            wall = statistics.median(w for w, _ in b.times)
            cpu = statistics.median(c for _, c in b.times)
            print(f"  vs {b.name:22s} wall {wall * 1e3:8.1f} ms ratio {real['wall_s'] / wall:.3f}   cpu "
                  f"{cpu * 1e3:8.1f} ms ratio {real['cpu_s'] / cpu:.3f}  ({len(b.times)} steps; overhead "
                  f"{100 * (real['cpu_s'] / cpu - 1):+.1f}% cpu)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
