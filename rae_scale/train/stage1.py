"""Stage 1: train the RAE's ViT decoder on a frozen encoder with L1 + LPIPS + GAN, one explicit loop.

Per step (rae_method.md 2.6): generator step on noise-augmented reconstructions (L1 + LPIPS, plus
the adaptive-weighted GAN loss once it is on), EMA update; then, once discriminator updates are on,
a discriminator step on a fresh noise-free, 8-bit-quantised reconstruction. Unlike upstream, the
discriminator's gradients are averaged across ranks (it is wrapped in DDP like any trained model).
The frozen encoder, LPIPS and the DINO backbone are never wrapped and run in inference mode.
"""
from __future__ import annotations

import logging
import time
import warnings

import torch

from rae_scale import config as C
from rae_scale.builders import build_discriminator, build_rae
from rae_scale.checkpoint import CheckpointManager, PerRank
from rae_scale.checkpoint.preemption import PreemptionHandler, start_exit_timer
from rae_scale.logs import progress
from rae_scale.losses.gan import d_loss_fn, g_loss_fn
from rae_scale.losses.perceptual import build_lpips
from rae_scale.models.discriminator import DiffAug
from rae_scale.parallel.dist import barrier
from rae_scale.parallel.frozen import prepare_frozen
from rae_scale.parallel.strategy import build_strategy
from rae_scale.train import common
from rae_scale.train.online_eval import OnlineEvaluation, Stage1OnlineRecon
from rae_scale.train.loop_utils import (
    BatchStream,
    LastLayerGrad,
    drop_step_gradients,
    per_sample_seeds,
    seeded_normal,
    seeded_uniform,
    strategy_checkpoint_io,
)

log = logging.getLogger(__name__)


def main(cfg: C.Stage1Job) -> int:
    # ------------------------------------------------------------------ set-up
    info, layout = common.start_run(cfg)
    run_dir = cfg.run.dir

    # ------------------------------------------------------------------ data
    stream = BatchStream.for_images(cfg.data, micro_batch=layout.micro_batch, rank=info.rank,
                                    world_size=info.world_size, seed=cfg.run.seed)
    steps_per_epoch = max(1, stream.batches_per_epoch // layout.accum_steps)
    total_steps = common.resolve_total_steps(cfg.training.max_steps, cfg.training.epochs, steps_per_epoch)
    g = cfg.gan
    gan_start = int(round(g.disc_start_epoch * steps_per_epoch))
    disc_start = int(round(g.disc_update_start_epoch * steps_per_epoch))
    lpips_start = int(round(g.lpips_start_epoch * steps_per_epoch))

    # ------------------------------------------------------------------ models
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    rae = build_rae(cfg.rae, load_decoder_weights=True, load_stats=False)  # trained on raw latents (1.4)
    encoder = prepare_frozen(rae.encoder, info.device)
    decoder = rae.decoder
    image_mean = encoder.image_mean.to(info.device)
    image_std = encoder.image_std.to(info.device)
    disc = build_discriminator(g, seed=cfg.run.seed).to(info.device)
    backbone = prepare_frozen(disc.backbone, info.device)  # differentiable w.r.t. its input, never trained
    heads = HeadStack(disc.heads)
    diffaug = DiffAug(prob=g.diffaug_prob, cutout=g.diffaug_cutout)
    lpips = prepare_frozen(build_lpips(vgg_weights=g.lpips_vgg_weights, pretrained_backbone=not g.lpips_random_backbone),
                           info.device)
    log.info("decoder: %.2f M trainable parameters; discriminator heads: %.2f M; %d steps (%d per epoch); "
             "discriminator from step %d, GAN loss from step %d", common.count_params(decoder) / 1e6,
             common.count_params(disc) / 1e6, total_steps, steps_per_epoch, disc_start, gan_start)

    base_lr = cfg.optimizer.lr
    lr_factor = common.lr_factor_fn(cfg.schedule, total_steps, steps_per_epoch, base_lr)
    # online rFID reconstructs through a plain copy, made before the strategy wraps (and maybe shards) it
    recon_eval = (Stage1OnlineRecon(cfg, encoder, decoder, image_mean, image_std, info, layout.micro_batch)
                  if cfg.eval.every_steps else None)
    p, o, do = cfg.parallel, cfg.optimizer, g.disc_optimizer
    strategy = common.strategy_from_config(p, info, layout, grad_clip=cfg.training.clip_grad)
    dec_net = strategy.wrap(
        decoder, blocks=decoder.transformer_blocks(),
        optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=base_lr, betas=tuple(o.betas),
                                                       weight_decay=o.weight_decay, eps=o.eps),
        lr_lambda=lr_factor, ema_decay=cfg.training.ema_decay)
    # The discriminator heads are small: plain DDP whatever the decoder's strategy.
    d_strategy = build_strategy("ddp", dist=info, precision=p.precision, grad_accum_steps=layout.accum_steps)
    d_lr_factor = common.lr_factor_fn(cfg.schedule, total_steps, steps_per_epoch, do.lr)
    heads_net = d_strategy.wrap(
        heads, blocks=list(heads.heads),
        optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=do.lr, betas=tuple(do.betas),
                                                       weight_decay=do.weight_decay, eps=do.eps),
        lr_lambda=lambda s: d_lr_factor(max(0, s)))
    last_layer = LastLayerGrad(decoder.decoder_pred)
    d_loss, g_loss = d_loss_fn(g.disc_loss), g_loss_fn(g.gen_loss)

    def reconstruct(x, seeds, noisy: bool):
        """x in [0,1] -> x_hat through the frozen encoder and the (wrapped) decoder."""
        with torch.inference_mode():
            tokens = encoder(x)
        tokens = tokens.clone()  # leave inference mode: the decoder needs autograd
        if noisy and cfg.rae.noise_tau > 0:
            sigma = cfg.rae.noise_tau * seeded_uniform(seeds, stream=1).to(tokens)
            tokens = tokens + sigma.view(-1, 1, 1) * seeded_normal(seeds, tokens.shape[1:], stream=2).to(tokens)
        with strategy.autocast():
            pixels = decoder.unpatchify(dec_net(tokens))
        return pixels.float() * image_std + image_mean

    def aug_generator(step: int, micro: int, use: int) -> torch.Generator:
        # DiffAug draws from its own generator keyed by (seed, step, rank, micro-batch, use): the global
        # RNG is also drawn by data-loader iterators, which a resumed run creates at other steps.
        key = per_sample_seeds(cfg.run.seed, step, [((info.rank * 1024 + micro) << 2) + use])[0]
        return torch.Generator(device=info.device).manual_seed(key)

    # ------------------------------------------------------------------ checkpoint and resume
    state = common.TrainState()
    ckpt = CheckpointManager(run_dir, keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
                             async_save=cfg.checkpoint.async_save, storage_options=cfg.run.storage_options)
    d_states = {f"disc_{k}": v for k, v in d_strategy.checkpoint_states().items()}
    ckpt_io = strategy_checkpoint_io(strategy, ckpt, extra={**d_states, "train_state": state,
                                                            "data": PerRank(stream)})
    resumed = common.resume_or_start(cfg, info, ckpt_io, "stage1")
    if resumed:
        log.info("resumed from %s at step %d", resumed, state.step)
    every_ckpt = (max(1, int(round(cfg.checkpoint.every_epochs * steps_per_epoch)))
                  if cfg.checkpoint.every_epochs else cfg.checkpoint.every_steps)
    metrics = common.MetricsLogger(run_dir, rank=info.rank, wandb_mode=cfg.logging.wandb,
                                   project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                                   run_name=cfg.run.name, config=C.to_dict(cfg),
                                   storage_options=cfg.run.storage_options, resume_step=state.step,
                                   total_steps=total_steps)
    online_eval = (OnlineEvaluation(recon_eval, state, "rfid", cfg.eval.every_steps, info.rank)
                   if recon_eval else None)
    # Ctrl-C too: save, then exit 130 (a second Ctrl-C exits at once)
    preempt = PreemptionHandler(signals=("SIGTERM", "SIGINT", cfg.checkpoint.preemption_signal))
    timer = common.StepTimer(info.device)
    grid_batch = None

    # ------------------------------------------------------------------ the loop
    bar = progress(total=total_steps, initial=state.step, desc="stage 1", rank=info.rank)
    window_t0, window_n = time.perf_counter(), 0
    exit_code = 0
    while state.step < total_steps:
        step = state.step
        use_gan = step >= gan_start
        use_lpips = step >= lpips_start
        update_disc = step >= disc_start
        terms = {k: torch.zeros((), device=info.device, dtype=torch.float64)
                 for k in ("l1", "lpips", "gan", "total", "d_weight", "disc", "logits_real", "logits_fake")}
        micro_batches = []
        dec_net.train()

        # ---- generator step
        with timer.phase("fwd_bwd"):
            for micro in range(layout.accum_steps):
                with timer.phase("data"):
                    batch = stream.next_batch()
                x = batch["image"].to(info.device, non_blocking=True).float()
                seeds = per_sample_seeds(cfg.run.seed, step, batch["index"])
                micro_batches.append((x, seeds))
                if grid_batch is None:
                    grid_batch = x[: cfg.logging.num_sample_images].clone()
                with strategy.accumulate(is_last=micro == layout.accum_steps - 1):
                    x_hat = reconstruct(x, seeds, noisy=True)
                    l1 = (x_hat - x).abs().mean()
                    rec = l1
                    lp = torch.zeros((), device=info.device)
                    if use_lpips and g.perceptual_weight > 0:
                        lp = lpips(x_hat * 2 - 1, x * 2 - 1).mean()
                        rec = rec + g.perceptual_weight * lp
                    loss = rec
                    gan = torch.zeros((), device=info.device)
                    weight = torch.zeros((), device=info.device)
                    if use_gan and g.disc_weight > 0:
                        # the bare heads: the generator's GAN loss must not run the heads' DDP reducer
                        logits = heads(backbone(diffaug(x_hat * 2 - 1, generator=aug_generator(step, micro, 0))))
                        gan = g_loss(logits)
                        weight = last_layer.adaptive_weight(rec, gan, max_weight=g.max_d_weight)
                        loss = rec + g.disc_weight * weight * gan
                    strategy.backward(loss)
                n = layout.accum_steps
                for k, v in (("l1", l1), ("lpips", lp), ("gan", gan), ("total", loss), ("d_weight", weight)):
                    terms[k] += v.detach().double() / n
        ok = common.all_finite_across_ranks(
            common.check_finite({"l1": terms["l1"], "lpips": terms["lpips"], "gan": terms["gan"],
                                 "total": terms["total"]}, step, cfg.training.on_nonfinite), info.device)
        with timer.phase("optimizer"):
            grad_norm = strategy.step() if ok else drop_step_gradients(strategy)
            d_strategy.optimizer.zero_grad(set_to_none=True)  # the G loss reached the heads too

        # ---- discriminator step (fresh, noise-free, 8-bit-quantised reconstructions)
        if update_disc:
            with timer.phase("disc"):
                for micro, (x, seeds) in enumerate(micro_batches):
                    with torch.no_grad():
                        dec_net.eval()
                        fake = reconstruct(x, seeds, noisy=False)
                        dec_net.train()
                        fake = torch.round((fake * 2 - 1).clamp(-1, 1).add(1).mul(127.5)).div(127.5).sub(1)
                    with d_strategy.accumulate(is_last=micro == layout.accum_steps - 1):
                        real_logits = heads_net(backbone(diffaug(x * 2 - 1, generator=aug_generator(step, micro, 1))))
                        fake_logits = heads_net(backbone(diffaug(fake, generator=aug_generator(step, micro, 2))))
                        ld = d_loss(real_logits, fake_logits)
                        d_strategy.backward(ld)
                    n = layout.accum_steps
                    terms["disc"] += ld.detach().double() / n
                    terms["logits_real"] += real_logits.detach().double().mean() / n
                    terms["logits_fake"] += fake_logits.detach().double().mean() / n
                if common.all_finite_across_ranks(bool(torch.isfinite(terms["disc"])), info.device):
                    d_strategy.step()
                else:
                    d_strategy.optimizer.zero_grad(set_to_none=True)
        else:
            with warnings.catch_warnings():  # the discriminator has not stepped yet; its schedule still follows the step
                warnings.simplefilter("ignore", UserWarning)
                d_strategy.scheduler.step()

        state.step += 1
        state.samples_seen += layout.global_batch
        state.epoch = state.step // steps_per_epoch
        window_n += 1
        bar.update(1)

        # -------------------------------------------------------------- online evaluation (rFID of EMA decoder)
        eval_row, new_best = {}, False
        if online_eval is not None and online_eval.due(state.step):
            eval_row, new_best = online_eval.run(strategy, state.step)
            window_t0 += eval_row["eval_time_s"]  # throughput counts training time only

        # -------------------------------------------------------------- metrics
        if state.step % cfg.logging.every_steps == 0 or state.step == total_steps or eval_row:
            reduced = {k: common.global_mean(v, info.world_size) for k, v in terms.items()}
            elapsed = time.perf_counter() - window_t0
            phases = timer.pop()
            ips = window_n * layout.global_batch / max(elapsed, 1e-9)
            row = {"loss": reduced["total"], "loss_l1": reduced["l1"], "loss_lpips": reduced["lpips"],
                   "loss_gan": reduced["gan"], "gan_weight": reduced["d_weight"], "loss_disc": reduced["disc"],
                   "disc_logits_real": reduced["logits_real"], "disc_logits_fake": reduced["logits_fake"],
                   "lr": strategy.optimizer.param_groups[0]["lr"], "lr_disc": d_strategy.optimizer.param_groups[0]["lr"],
                   "grad_norm": float(grad_norm), "images_per_s": ips, "images_per_s_per_device": ips / info.world_size,
                   "time_data_s": phases.get("data", 0.0) / window_n,
                   "time_fwd_bwd_s": (phases.get("fwd_bwd", 0.0) - phases.get("data", 0.0)) / window_n,
                   "time_optimizer_s": (phases.get("optimizer", 0.0) + phases.get("disc", 0.0)) / window_n,
                   "peak_mem_gb": common.peak_memory_gb(info.device), "epoch": state.epoch,
                   "gan_active": int(use_gan), "disc_active": int(update_disc), **eval_row}
            metrics.log(state.step, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            window_t0, window_n = time.perf_counter(), 0

        # -------------------------------------------------------------- reconstruction grid (EMA)
        if state.step % cfg.logging.sample_every_steps == 0 or state.step == total_steps:
            _recon_grid(cfg, strategy, encoder, decoder, grid_batch, image_mean, image_std, info, metrics, state.step)

        # -------------------------------------------------------------- checkpoint / preemption
        stop = preempt.should_stop()
        if stop:  # armed before the final save: a hung save still ends with the requeue code
            start_exit_timer(cfg.checkpoint.exit_timeout_s, preempt.exit_code)
        if stop or new_best or state.step % every_ckpt == 0 or state.step == total_steps:
            ckpt_io.save(state.step, metadata={"epoch": state.epoch, "config": C.to_dict(cfg), "job": "stage1",
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
        log.info("stage 1 finished at step %d; checkpoints under %s/checkpoints, metrics in %s/metrics.jsonl",
                 state.step, run_dir, run_dir)
    barrier()
    return exit_code


class HeadStack(torch.nn.Module):
    """The discriminator's trainable heads as one module: backbone taps -> logits [B, heads * tokens]."""

    def __init__(self, heads: torch.nn.ModuleList):
        super().__init__()
        self.heads = heads

    def forward(self, taps):
        return torch.cat([head(t).flatten(1) for head, t in zip(self.heads, taps)], dim=1)


@torch.no_grad()
def _recon_grid(cfg, strategy, encoder, decoder, x, mean, std, info, metrics, step) -> None:
    """Inputs over EMA reconstructions (noise-free) as one PNG grid."""
    if x is None:
        return
    ema = strategy.ema.module if strategy.ema is not None else decoder
    tokens = encoder(x)
    with strategy.autocast():
        pixels = decoder.unpatchify(ema(tokens))
    if info.rank != 0:
        return
    recon = (pixels.float() * std + mean).clamp(0, 1)
    url = common.save_image_grid(torch.cat([x, recon]), f"{cfg.run.dir.rstrip('/')}/samples/recon-{step:08d}.png",
                                 nrow=x.shape[0], storage_options=cfg.run.storage_options)
    metrics.log_image(step, "reconstructions", url)
    log.info("reconstruction grid (inputs over EMA reconstructions) written to %s", url)
