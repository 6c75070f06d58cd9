"""Stage 2: DiT-DH / LightningDiT flow matching on RAE latents, one explicit loop.

Reads top to bottom: set-up, data, model and strategy, resume, the loop, the end. Per-sample
randomness (time, noise, label dropout) is seeded by (run seed, step, sample index), so a run's
numbers do not depend on how the global batch is split over ranks and micro-batches: 1 rank, 2
ranks, DDP, FSDP2 and DeepSpeed see the same losses, and a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import functools
import logging
import time

import torch

from rae_scale import config as C
from rae_scale.builders import build_dit_model, build_rae, latent_normalizer
from rae_scale.checkpoint import CheckpointManager, PerRank
from rae_scale.checkpoint.preemption import PreemptionHandler, start_exit_timer
from rae_scale.diffusion.sampling import sample_ode
from rae_scale.diffusion.transport import Transport
from rae_scale.logs import progress
from rae_scale.parallel.dist import barrier
from rae_scale.train import common
from rae_scale.train.online_eval import OnlineEvaluation, Stage2OnlineFID
from rae_scale.train.loop_utils import (
    BatchStream,
    drop_step_gradients,
    per_sample_seeds,
    seeded_bernoulli,
    seeded_normal,
    seeded_times,
    strategy_checkpoint_io,
)

log = logging.getLogger(__name__)


def main(cfg: C.Stage2Job) -> int:
    # ------------------------------------------------------------------ set-up
    info, layout = common.start_run(cfg)
    run_dir = cfg.run.dir

    # ------------------------------------------------------------------ data
    stream = BatchStream.for_latents(cfg.data, micro_batch=layout.micro_batch, rank=info.rank,
                                     world_size=info.world_size, seed=cfg.run.seed)
    # the cache holds raw encoder latents; the model learns (and sampling decodes) normalised ones
    normalize = latent_normalizer(cfg.rae, info.device)
    if info.rank == 0:
        log.info("latents normalised with %s", cfg.rae.stats_path or "nothing (rae.stats_path is empty)")
    steps_per_epoch = max(1, stream.batches_per_epoch // layout.accum_steps)
    total_steps = common.resolve_total_steps(cfg.training.max_steps, cfg.training.epochs, steps_per_epoch)

    # ------------------------------------------------------------------ model, optimizer, EMA
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    model = build_dit_model(cfg.dit)
    # Label dropout happens below with per-sample seeds; the model's own (global-RNG) dropout is off.
    model.y_embedder.dropout_prob = 0.0
    null_label = cfg.dit.num_classes
    log.info("%s: %.2f M trainable parameters; %d steps (%d per epoch)", cfg.dit.model,
             common.count_params(model) / 1e6, total_steps, steps_per_epoch)
    base_lr = cfg.optimizer.lr
    lr_factor = common.lr_factor_fn(cfg.schedule, total_steps, steps_per_epoch, base_lr)
    # one frozen decoder, built on first use, for sample grids and online FID
    decoding_rae = functools.cache(lambda: _sampling_rae(cfg, info.device))
    # online FID samples from a plain copy, made before the strategy wraps (and maybe shards) the model
    fid_eval = (Stage2OnlineFID(cfg, model, info, layout.micro_batch, decoding_rae)
                if cfg.eval.every_steps else None)
    p = cfg.parallel
    strategy = common.strategy_from_config(p, info, layout, grad_clip=cfg.training.clip_grad)
    o = cfg.optimizer
    net = strategy.wrap(
        model, blocks=model.transformer_blocks(),
        optimizer_factory=lambda params: torch.optim.AdamW(params, lr=base_lr, betas=tuple(o.betas),
                                                           weight_decay=o.weight_decay, eps=o.eps),
        lr_lambda=lr_factor, ema_decay=cfg.training.ema_decay)
    transport = Transport(time_dist=cfg.transport.time_dist, mu=cfg.transport.time_mu,
                          sigma=cfg.transport.time_sigma, shift_dim=cfg.transport.shift_dim,
                          shift_base=cfg.transport.shift_base)
    latent_shape = (cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size)
    shift = transport.shift_for(latent_shape)

    # ------------------------------------------------------------------ checkpoint and resume
    state = common.TrainState()
    ckpt = CheckpointManager(run_dir, keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
                             async_save=cfg.checkpoint.async_save, storage_options=cfg.run.storage_options)
    ckpt_io = strategy_checkpoint_io(strategy, ckpt, extra={"train_state": state, "data": PerRank(stream)})
    resumed = common.resume_or_start(cfg, info, ckpt_io, "stage2")
    if resumed:
        log.info("resumed from %s at step %d", resumed, state.step)
    every_ckpt = (max(1, int(round(cfg.checkpoint.every_epochs * steps_per_epoch)))
                  if cfg.checkpoint.every_epochs else cfg.checkpoint.every_steps)
    metrics = common.MetricsLogger(run_dir, rank=info.rank, wandb_mode=cfg.logging.wandb,
                                   project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                                   run_name=cfg.run.name, config=C.to_dict(cfg),
                                   storage_options=cfg.run.storage_options, resume_step=state.step,
                                   total_steps=total_steps)
    online_eval = OnlineEvaluation(fid_eval, state, "fid", cfg.eval.every_steps, info.rank) if fid_eval else None
    # Ctrl-C too: save, then exit 130 (a second Ctrl-C exits at once)
    preempt = PreemptionHandler(signals=("SIGTERM", "SIGINT", cfg.checkpoint.preemption_signal))
    timer = common.StepTimer(info.device)

    # ------------------------------------------------------------------ the loop
    bar = progress(total=total_steps, initial=state.step, desc="stage 2", rank=info.rank)
    window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
    exit_code = 0
    while state.step < total_steps:
        step = state.step
        net.train()
        loss_sum = torch.zeros((), device=info.device, dtype=torch.float64)
        with timer.phase("fwd_bwd"):
            for micro in range(layout.accum_steps):
                with timer.phase("data"):
                    batch = stream.next_batch()
                z = normalize(batch["latent"].to(info.device, non_blocking=True).float())
                y = batch["label"].to(info.device)
                seeds = per_sample_seeds(cfg.run.seed, step, batch["index"])
                # per-sample draws: time, noise, label dropout (see the module docstring)
                t = seeded_times(transport, seeds, shift, stream=1).to(info.device)
                eps = seeded_normal(seeds, z.shape[1:], stream=2).to(info.device)
                drop = seeded_bernoulli(seeds, cfg.dit.class_dropout_prob, stream=3).to(info.device)
                y = torch.where(drop, torch.full_like(y, null_label), y)
                x_t, target = transport.interpolate(z, eps, t)
                with strategy.accumulate(is_last=micro == layout.accum_steps - 1):
                    with strategy.autocast():
                        v = net(x_t, t, y)
                    per_sample = (v.float() - target.float()).pow(2).flatten(1).mean(dim=1)
                    # micro-batch mean; the strategy divides by the accumulation steps and the
                    # gradient all-reduce averages over ranks: the gradient of the global-batch mean
                    strategy.backward(per_sample.mean())
                loss_sum += per_sample.detach().double().sum()
        global_loss = common.global_mean(loss_sum, layout.global_batch)
        ok = common.all_finite_across_ranks(
            common.check_finite({"loss": global_loss}, step, cfg.training.on_nonfinite), info.device)
        with timer.phase("optimizer"):
            grad_norm = strategy.step() if ok else drop_step_gradients(strategy)
        state.step += 1
        state.samples_seen += layout.global_batch
        state.epoch = state.step // steps_per_epoch
        window_loss += float(global_loss)
        window_n += 1
        bar.update(1)

        # -------------------------------------------------------------- online evaluation (FID of EMA samples)
        eval_row, new_best = {}, False
        if online_eval is not None and online_eval.due(state.step):
            eval_row, new_best = online_eval.run(strategy, state.step)
            window_t0 += eval_row["eval_time_s"]  # throughput counts training time only

        # -------------------------------------------------------------- metrics
        if state.step % cfg.logging.every_steps == 0 or state.step == total_steps or eval_row:
            elapsed = time.perf_counter() - window_t0
            phases = timer.pop()
            ips = window_n * layout.global_batch / max(elapsed, 1e-9)
            row = {"loss": float(global_loss), "loss_avg": window_loss / window_n,
                   "lr": strategy.optimizer.param_groups[0]["lr"] if strategy.optimizer else base_lr * lr_factor(step),
                   "grad_norm": float(grad_norm), "images_per_s": ips, "images_per_s_per_device": ips / info.world_size,
                   "tokens_per_s": ips * cfg.dit.input_size ** 2 / cfg.dit.patch_size ** 2,
                   "time_data_s": phases.get("data", 0.0) / window_n,
                   "time_fwd_bwd_s": (phases.get("fwd_bwd", 0.0) - phases.get("data", 0.0)) / window_n,
                   "time_optimizer_s": phases.get("optimizer", 0.0) / window_n,
                   "peak_mem_gb": common.peak_memory_gb(info.device), "epoch": state.epoch}
            flops = common.peak_flops(info.device)
            if flops:
                # 6 N per token for a transformer's forward + backward, N the trainable parameters
                n_params = common.count_params(model)
                row["mfu"] = 6 * n_params * row["tokens_per_s"] / info.world_size / flops
            metrics.log(state.step, {**row, **eval_row})
            bar.set_postfix(loss=f"{row['loss_avg']:.4f}")
            window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()

        # -------------------------------------------------------------- sample grid
        if state.step % cfg.logging.sample_every_steps == 0 or state.step == total_steps:
            _sample_grid(cfg, strategy, decoding_rae(), transport, shift, latent_shape, info, metrics, state.step)

        # -------------------------------------------------------------- checkpoint / preemption
        stop = preempt.should_stop()
        if stop:  # armed before the final save: a hung save still ends with the requeue code
            start_exit_timer(cfg.checkpoint.exit_timeout_s, preempt.exit_code)
        if stop or new_best or state.step % every_ckpt == 0 or state.step == total_steps:
            ckpt_io.save(state.step, metadata={"epoch": state.epoch, "config": C.to_dict(cfg), "job": "stage2",
                                               **eval_row}, pin=new_best)
        if new_best:
            online_eval.after_save(ckpt_io)
        if stop:
            log.warning("stop signal received: saved step %d, exiting with code %d", state.step,
                        preempt.exit_code)
            exit_code = preempt.exit_code
            break

    # ------------------------------------------------------------------ the end
    bar.close()
    ckpt_io.wait()
    metrics.close()
    common.end_run()
    if exit_code == 0:
        log.info("stage 2 finished at step %d; checkpoints under %s/checkpoints, metrics in %s/metrics.jsonl",
                 state.step, run_dir, run_dir)
    barrier()
    return exit_code


def _sampling_rae(cfg: C.Stage2Job, device):
    """The decoder for sample grids and online FID (frozen, eval); None when it cannot be built here."""
    try:
        return build_rae(cfg.rae, storage_options=cfg.run.storage_options).to(device).eval()
    except Exception as exc:  # grids are a convenience; training goes on without them
        log.warning("no sample grids: the RAE for decoding could not be built (%s)", exc)
        return None


@torch.no_grad()
def _sample_grid(cfg, strategy, rae, transport, shift, latent_shape, info, metrics, step) -> None:
    """EMA samples of a few classes, decoded and written as a PNG grid (rank 0 writes)."""
    ema = strategy.ema.module if strategy.ema is not None else strategy.module
    if not rae:
        return
    n = cfg.logging.num_sample_images
    labels = torch.arange(n, device=info.device) % cfg.dit.num_classes
    from rae_scale.diffusion.sampling import per_sample_noise

    x1 = per_sample_noise((n, *latent_shape), list(range(n)), device=info.device)
    ema.eval()
    z0 = sample_ode(lambda x, t: ema(x, t, labels), x1, num_steps=cfg.sampler.num_steps, shift=shift,
                    method="euler" if cfg.sampler.method == "dopri5" else cfg.sampler.method)
    if info.rank != 0:
        return
    images = rae.decode(z0.float()).sample
    url = common.save_image_grid(images, f"{cfg.run.dir.rstrip('/')}/samples/step-{step:08d}.png",
                                 nrow=min(n, 10), storage_options=cfg.run.storage_options)
    metrics.log_image(step, "samples", url)
    log.info("sample grid written to %s", url)
