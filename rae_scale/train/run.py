"""The harness both training loops run in: everything about a run that is not the method.

It holds no model, no loss and no data. A loop reads::

    run = Run(cfg, "stage2")                     # process group, logging, TF32, batch layout, lease
    stream = ...; run.plan_steps(stream.batches_per_epoch)
    ... build the model; strategy = run.build_strategy(); net = strategy.wrap(...)
    run.resume(strategy, stream)                 # checkpoint wiring, resume or start, metrics, signals
    while run.running():
        ... the method's step ...
        run.end_step(loss=...)                   # counters, progress bar, online evaluation when due
        if run.metrics_due(): run.log_metrics({...the method's columns...})
        if run.grid_due(): ... write a grid ...
        run.save_or_stop()                       # checkpoint when due; a stop signal saves and ends
    return run.finish()                          # exit code: 0, or the stop signal's

The strategy does the parallelism (and its own checkpoint format); the run never asks which.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from rae_scale import config as C
from rae_scale.checkpoint import CheckpointManager, PerRank
from rae_scale.checkpoint.layout import checkpoints_url
from rae_scale.checkpoint.preemption import PreemptionHandler, start_exit_timer
from rae_scale.lifetime import die_with_parent
from rae_scale.logs import progress, setup_logging
from rae_scale.parallel.dist import barrier, init_distributed
from rae_scale.parallel.precision import set_tf32
from rae_scale.parallel.strategy import build_strategy_from_config
from rae_scale.parallel.strategy_base import Strategy
from rae_scale.storage import filesystem, join, share_endpoint
from rae_scale.train.batching import batch_layout, resolve_total_steps
from rae_scale.train.finiteness import check_finite
from rae_scale.train.image_grid import GRID_DIR, save_image_grid
from rae_scale.train.metrics import METRICS_FILE, MetricsLogger, global_sums
from rae_scale.train.online_eval import OnlineEvaluation, fid_k_values
from rae_scale.train.run_folder import end_run, resume_or_start, take_lease
from rae_scale.train.state import TrainState
from rae_scale.train.tripwires import EXIT_CODE_TRIPWIRE, Tripwires
from rae_scale.train.throughput import StepTimer, peak_flops, peak_memory_gb

log = logging.getLogger(__name__)


class Run:
    """One training run's bookkeeping: state, checkpoints, metrics, preemption, online evaluation, the end."""

    def __init__(self, cfg, job: str):
        """job: "stage1" or "stage2" (checkpoint metadata, architecture checks, log lines)."""
        self.cfg, self.job = cfg, job
        # the endpoint rule for a run started without the CLI (e.g. a launcher calling the loop); a
        # second call, after cli.load_job's, changes nothing
        share_endpoint(cfg.run.storage_options)
        self.title = job.replace("stage", "stage ")
        if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun agent's worker: end with the agent
            die_with_parent()
        self.info = init_distributed()
        setup_logging(self.info.rank, self.info.world_size)
        set_tf32(cfg.parallel.tf32)
        t = cfg.training
        self.layout = batch_layout(t.global_batch_size, t.micro_batch_size, t.grad_accum_steps, self.info.world_size)
        take_lease(cfg, self.info)  # one training per run folder
        if self.info.rank == 0:
            log.info("%d rank(s) on %s, global batch %d = %d x %d x %d", self.info.world_size, self.info.device,
                     self.layout.global_batch, self.layout.micro_batch, self.layout.accum_steps,
                     self.layout.world_size)
        self.state = TrainState()
        # stage 2's early checks that the run learns (a job without a `tripwire` section has none)
        self.tripwires = (Tripwires(cfg.tripwire, t.on_tripwire, self.state, self.info.rank)
                          if hasattr(cfg, "tripwire") else None)
        self.timer = StepTimer(self.info.device)
        self.exit_code = 0
        self._stopped = False
        self.eval_row: dict[str, Any] = {}
        self.new_best = False
        self._votes: tuple[int, int] | None = None  # this step's summed stop votes (reduce_step)

    # ------------------------------------------------------------------ set-up
    def plan_steps(self, batches_per_epoch: int) -> int:
        """Steps per epoch and in all, from the micro-batches a rank sees per epoch; returns the total."""
        t, c = self.cfg.training, self.cfg.checkpoint
        self.steps_per_epoch = max(1, batches_per_epoch // self.layout.accum_steps)
        self.total_steps = resolve_total_steps(t.max_steps, t.epochs, self.steps_per_epoch)
        self.every_ckpt = (max(1, int(round(c.every_epochs * self.steps_per_epoch)))
                           if c.every_epochs else c.every_steps)
        return self.total_steps

    def epoch_to_step(self, epochs: float) -> int:
        """The optimizer step at which `epochs` epochs (a config's epoch spelling) have passed."""
        return int(round(epochs * self.steps_per_epoch))

    def build_strategy(self) -> Strategy:
        """The trained model's strategy, as the `parallel` section says."""
        return build_strategy_from_config(self.cfg.parallel, dist=self.info, grad_accum_steps=self.layout.accum_steps,
                                          micro_batch_size=self.layout.micro_batch,
                                          grad_clip=self.cfg.training.clip_grad)

    def resume(self, strategy, stream, *, extra: Mapping[str, Any] | None = None, evaluation=None,
               metric: str = "") -> None:
        """Wire the checkpoints, resume (or start), and open the metrics log, signals and progress bar.

        A checkpoint holds the strategy's state, then `extra` (more Statefuls, e.g. a second
        strategy's), then "train_state" and "data" (the stream's per-rank position). evaluation: the
        online evaluator (None for none); its `metric` (lower is better) picks the pinned best step.
        """
        cfg, info = self.cfg, self.info
        c = cfg.checkpoint
        self.strategy = strategy
        self.stream = stream  # its source_shares() (weighted mixtures) become data_share/<source> columns
        manager = CheckpointManager(cfg.run.dir, keep_last=c.keep_last, keep_every=c.keep_every,
                                    async_save=c.async_save, storage_options=cfg.run.storage_options)
        self.ckpt_io = strategy.checkpoint_io(manager, {**(extra or {}), "train_state": self.state,
                                                        "data": PerRank(stream)})
        resumed = resume_or_start(cfg, info, self.ckpt_io, self.job)
        if resumed:
            log.info("resumed from %s at step %d", resumed, self.state.step)
        self.metrics = MetricsLogger(cfg.run.dir, rank=info.rank, wandb_mode=cfg.logging.wandb,
                                     project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                                     run_name=cfg.run.name, config=C.to_dict(cfg),
                                     storage_options=cfg.run.storage_options, resume_step=self.state.step,
                                     total_steps=self.total_steps)
        self.online_eval = (OnlineEvaluation(evaluation, self.state, metric, cfg.eval.every_steps, info.rank,
                                             tripwires=self.tripwires, fid_k=fid_k_values(cfg, metric, info.rank),
                                             steps_per_epoch=self.steps_per_epoch) if evaluation else None)
        # Ctrl-C too: save, then exit 130 (a second Ctrl-C exits at once)
        self.preempt = PreemptionHandler(signals=("SIGTERM", "SIGINT", c.preemption_signal))
        self.bar = progress(total=self.total_steps, initial=self.state.step, desc=self.title, rank=info.rank)
        self._open_window()

    # ------------------------------------------------------------------ each step
    def running(self) -> bool:
        """True while steps remain and no stop signal has ended the run."""
        return not self._stopped and self.state.step < self.total_steps

    def reduce_step(self, sums: Mapping[str, Any], denom: float) -> dict[str, float]:
        """The step's one blocking collective: the ranks' loss sums become global means (sum / denom),
        and every rank's stop vote (a signal it received) travels in the same all-reduce, so
        save_or_stop() needs none of its own. The means are equal on every rank, so losses_finite()
        needs none either."""
        votes = self.preempt.local_vote()
        values = global_sums([*sums.values(), *votes], self.info.device)
        self._votes = tuple(int(v) for v in values[len(sums):])
        return {name: value / denom for name, value in zip(sums, values)}

    def losses_finite(self, losses: Mapping[str, Any]) -> bool:
        """Whether this step's global losses (reduce_step's, the same on every rank) are finite;
        training.on_nonfinite=stop raises instead."""
        return check_finite(losses, self.state.step, self.cfg.training.on_nonfinite)

    def end_step(self, loss: float | None = None) -> None:
        """Count the finished optimizer step, then run the online evaluation when it is due.

        loss: the step's global loss, averaged over the log window as "loss_avg" (window_loss()).
        """
        s = self.state
        s.step += 1
        s.samples_seen += self.layout.global_batch
        s.epoch = s.step // self.steps_per_epoch
        if loss is not None:
            self._window_loss += float(loss)
        self._window_n += 1
        self.bar.update(1)
        self.eval_row, self.new_best = {}, False
        if self.online_eval is not None and self.online_eval.due(s.step):
            self.eval_row, self.new_best = self.online_eval.run(self.strategy, s.step)
            self._window_t0 += self.eval_row["eval_time_s"]  # throughput counts training time only

    def metrics_due(self) -> bool:
        return (self.state.step % self.cfg.logging.every_steps == 0 or self.state.step == self.total_steps
                or bool(self.eval_row) or (self.tripwires is not None and self.tripwires.has_row()))

    def window_loss(self) -> float:
        """The mean of the losses end_step got since the last metrics row."""
        return self._window_loss / self._window_n

    def log_metrics(self, row: Mapping[str, Any], *, tokens_per_image: float | None = None,
                    trained_params: int | None = None) -> None:
        """Write the method's columns plus throughput, timing, memory and the evaluation's, then start a
        new window. tokens_per_image adds tokens/s, and with trained_params the MFU where the peak
        FLOP/s of the device is known."""
        n, world = self._window_n, self.info.world_size
        elapsed = time.perf_counter() - self._window_t0
        phases = self.timer.pop()
        data, fwd_bwd = phases.pop("data", 0.0), phases.pop("fwd_bwd", 0.0)
        encode = phases.pop("encode", None)  # stage 2's online encoding, inside fwd_bwd
        ips = n * self.layout.global_batch / max(elapsed, 1e-9)
        out = {**row, "images_per_s": ips, "images_per_s_per_device": ips / world}
        if tokens_per_image is not None:
            out["tokens_per_s"] = ips * tokens_per_image
        shares = getattr(getattr(self, "stream", None), "source_shares", None)
        out.update({f"data_share/{name}": share for name, share in (shares() if shares else {}).items()})
        if encode is not None:
            out["time_encode_s"] = encode / n
        out.update(time_data_s=data / n, time_fwd_bwd_s=(fwd_bwd - data - (encode or 0.0)) / n,
                   time_optimizer_s=sum(phases.values()) / n,  # the optimizer step(s), e.g. a discriminator's
                   peak_mem_gb=peak_memory_gb(self.info.device), epoch=self.state.epoch)
        flops = peak_flops(self.info.device)
        if flops and tokens_per_image is not None and trained_params:
            # 6 N per token for a transformer's forward + backward, N the trainable parameters
            out["mfu"] = 6 * trained_params * out["tokens_per_s"] / world / flops
        tripwire_row = self.tripwires.pop_row() if self.tripwires is not None else {}
        self.metrics.log(self.state.step, {**out, **self.eval_row, **tripwire_row})
        self.bar.set_postfix(loss=f"{out.get('loss_avg', out.get('loss', float('nan'))):.4f}")
        self._open_window()

    def grid_due(self) -> bool:
        return self.state.step % self.cfg.logging.sample_every_steps == 0 or self.state.step == self.total_steps

    def save_or_stop(self) -> None:
        """Save when a checkpoint is due (or a new best, or a stop signal); after a stop signal the run ends."""
        cfg, s = self.cfg, self.state
        # the votes came with this step's reduce_step; a loop that did not call it pays a collective here
        stop = self.preempt.decide(*self._votes) if self._votes else self.preempt.should_stop()
        self._votes = None
        if stop:  # armed before the final save: a hung save still ends with the requeue code
            start_exit_timer(cfg.checkpoint.exit_timeout_s, self.preempt.exit_code)
        # a failed tripwire with training.on_tripwire=stop (the same verdict on every rank): save and end
        tripped = not stop and self.tripwires is not None and self.tripwires.stop_reason is not None
        if stop or tripped or self.new_best or s.step % self.every_ckpt == 0 or s.step == self.total_steps:
            self.ckpt_io.save(s.step, metadata={"epoch": s.epoch, "config": C.to_dict(cfg), "job": self.job,
                                                **self.eval_row}, pin=self.new_best)
        if self.new_best:
            self.online_eval.after_save(self.ckpt_io)
        if stop:
            log.warning("stop signal received: saved step %d, exiting with code %d", s.step, self.preempt.exit_code)
            self.exit_code = self.preempt.exit_code
            self._stopped = True
        elif tripped:
            if self.info.rank == 0:
                log.error("%s: saved step %d, exiting with code %d (training.on_tripwire=stop)",
                          self.tripwires.stop_reason, s.step, EXIT_CODE_TRIPWIRE)
            self.exit_code = EXIT_CODE_TRIPWIRE
            self._stopped = True

    def write_grid(self, images: torch.Tensor, name: str, *, key: str, nrow: int, what: str) -> None:
        """Rank 0 writes images in [0, 1] as one PNG grid <run>/<GRID_DIR>/<name>, also to wandb under `key`."""
        if self.info.rank != 0:
            return
        url = save_image_grid(images, join(self.cfg.run.dir, GRID_DIR, name), nrow=nrow,
                              storage_options=self.cfg.run.storage_options)
        self.metrics.log_image(self.state.step, key, url)
        log.info("%s written to %s", what, url)

    def write_text(self, name: str, text: str, *, what: str) -> None:
        """Rank 0 writes a small text file beside the grids (<run>/<GRID_DIR>/<name>), e.g. a grid's prompts."""
        if self.info.rank != 0:
            return
        url = join(self.cfg.run.dir, GRID_DIR, name)
        fs, path = filesystem(url, self.cfg.run.storage_options)
        with fs.open(path, "w") as f:
            f.write(text)
        log.info("%s written to %s", what, url)

    # ------------------------------------------------------------------ the end
    def finish(self) -> int:
        """Close the bar, wait for the last save, close the metrics, release the folder; the exit code."""
        self.bar.close()
        self.ckpt_io.wait()
        self.metrics.close()
        if self.exit_code == 0 and self.info.rank == 0:
            self._write_fid_curve()
        end_run()
        if self.exit_code == 0:
            run_dir = self.cfg.run.dir
            log.info("%s finished at step %d; checkpoints under %s, metrics in %s", self.title, self.state.step,
                     checkpoints_url(run_dir), join(run_dir, METRICS_FILE))
        barrier()
        return self.exit_code

    def _write_fid_curve(self) -> None:
        """Stage 2 with online FID: FID against epochs beside metrics.jsonl (train.fid_curve), the report
        half of E@FID-k; the training succeeded, so a failure here only warns."""
        ev = self.online_eval
        if ev is None or ev.best.metric != "fid":
            return
        from rae_scale.train.fid_curve import write_fid_curve

        try:
            out = write_fid_curve(self.cfg.run.dir, ks=ev.milestones.ks if ev.milestones else [],
                                  steps_per_epoch=self.steps_per_epoch, storage_options=self.cfg.run.storage_options)
        except Exception as exc:  # noqa: BLE001 - e.g. storage or matplotlib; the checkpoints are saved
            log.warning("FID against epochs not written: %r", exc)
            return
        if out:
            log.info("FID against epochs written to %s (numbers in %s)", out["png"], out["csv"])

    def _open_window(self) -> None:
        self._window_loss, self._window_n, self._window_t0 = 0.0, 0, time.perf_counter()

