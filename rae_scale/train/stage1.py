"""Stage 1: train the RAE's ViT decoder on a frozen encoder with L1 + LPIPS + GAN, one explicit loop.

Per step (rae_method.md 2.6): generator step on noise-augmented reconstructions (L1 + LPIPS, plus
the adaptive-weighted GAN loss once it is on), EMA update; then, once discriminator updates are on,
a discriminator step on a fresh noise-free, 8-bit-quantised reconstruction. Unlike upstream, the
discriminator's gradients are averaged across ranks (it is wrapped in DDP like any trained model).
The frozen encoder, LPIPS and the DINO backbone are never wrapped and run in inference mode. The
run's bookkeeping (checkpoints, metrics, preemption, online evaluation) is the harness's
(rae_scale.train.run).
"""
from __future__ import annotations

import logging
import math
import warnings

import torch

from rae_scale import config as C
from rae_scale.builders import build_discriminator, build_rae
from rae_scale.data.batch_stream import BatchStream
from rae_scale.losses.adaptive_weight import LastLayerGrad
from rae_scale.losses.gan import d_loss_fn, g_loss_fn
from rae_scale.losses.perceptual import build_lpips
from rae_scale.models.discriminator import DiffAug, HeadStack
from rae_scale.optim import lr_factor_fn, optimizer_factory
from rae_scale.parallel.frozen import prepare_frozen
from rae_scale.parallel.strategy import replicated_strategy
from rae_scale.seeding import AugmentDraw, DecoderStream, augment_seed, per_sample_seeds, seeded_normal, seeded_uniform
from rae_scale.train.metrics import global_sums
from rae_scale.train.online_eval import Stage1OnlineRecon
from rae_scale.train.run import Run
from rae_scale.train.throughput import count_params

log = logging.getLogger(__name__)

# the step's loss terms: the generator's, reduced every step; the discriminator's, while it trains
GENERATOR_TERMS = ("l1", "lpips", "gan", "total", "d_weight")
DISC_TERMS = ("disc", "logits_real", "logits_fake")


def main(cfg: C.Stage1Job) -> int:
    run = Run(cfg, "stage1")
    info, layout = run.info, run.layout

    # ------------------------------------------------------------------ data
    stream = BatchStream.for_images(cfg.data, micro_batch=layout.micro_batch, rank=info.rank,
                                    world_size=info.world_size, seed=cfg.run.seed,
                                    virtual_epoch_steps=cfg.training.virtual_epoch_steps,
                                    accum_steps=layout.accum_steps)
    total_steps = run.plan_steps(stream.batches_per_epoch)
    g = cfg.gan
    gan_start = run.epoch_to_step(g.disc_start_epoch)
    disc_start = run.epoch_to_step(g.disc_update_start_epoch)
    lpips_start = run.epoch_to_step(g.lpips_start_epoch)

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
    lpips = prepare_frozen(build_lpips(vgg_weights=g.lpips_vgg_weights,
                                       pretrained_backbone=not g.lpips_random_backbone), info.device)
    log.info("decoder: %.2f M trainable parameters; discriminator heads: %.2f M; %d steps (%d per epoch); "
             "discriminator from step %d, GAN loss from step %d", count_params(decoder) / 1e6,
             count_params(disc) / 1e6, total_steps, run.steps_per_epoch, disc_start, gan_start)

    lr_factor = lr_factor_fn(cfg.schedule, total_steps, run.steps_per_epoch, cfg.optimizer.lr)
    # online rFID reconstructs through a plain copy, made before the strategy wraps (and maybe shards) it
    recon_eval = (Stage1OnlineRecon(cfg, encoder, decoder, image_mean, image_std, info, layout.micro_batch)
                  if cfg.eval.every_steps else None)
    strategy = run.build_strategy()
    dec_net = strategy.wrap(decoder, blocks=decoder.transformer_blocks(),
                            optimizer_factory=optimizer_factory(cfg.optimizer),
                            lr_lambda=lr_factor, ema_decay=cfg.training.ema_decay)
    # The discriminator heads are small: plain data parallelism whatever the decoder's strategy.
    d_strategy = replicated_strategy(dist=info, precision=cfg.parallel.precision, grad_accum_steps=layout.accum_steps)
    d_lr_factor = lr_factor_fn(cfg.schedule, total_steps, run.steps_per_epoch, g.disc_optimizer.lr)
    heads_net = d_strategy.wrap(heads, blocks=list(heads.heads),
                                optimizer_factory=optimizer_factory(g.disc_optimizer),
                                lr_lambda=lambda s: d_lr_factor(max(0, s)))
    last_layer = LastLayerGrad(decoder.decoder_pred)
    d_loss, g_loss = d_loss_fn(g.disc_loss), g_loss_fn(g.gen_loss)

    def reconstruct(x, seeds, noisy: bool):
        """x in [0,1] -> x_hat through the frozen encoder and the (wrapped) decoder."""
        with torch.inference_mode():
            tokens = encoder(x)
        tokens = tokens.clone()  # leave inference mode: the decoder needs autograd
        if noisy and cfg.rae.noise_tau > 0:
            sigma = cfg.rae.noise_tau * seeded_uniform(seeds, DecoderStream.ENCODER_NOISE_SIGMA).to(tokens)
            noise = seeded_normal(seeds, tokens.shape[1:], DecoderStream.ENCODER_NOISE).to(tokens)
            tokens = tokens + sigma.view(-1, 1, 1) * noise
        with strategy.autocast():
            pixels = decoder.unpatchify(dec_net(tokens))
        return pixels.float() * image_std + image_mean

    def augment(x, step: int, micro: int, draw: AugmentDraw):
        generator = torch.Generator(device=info.device).manual_seed(
            augment_seed(cfg.run.seed, step, info.rank, micro, draw))
        return diffaug(x, generator=generator)

    disc_states = {f"disc_{k}": v for k, v in d_strategy.checkpoint_states().items()}
    run.resume(strategy, stream, extra=disc_states, evaluation=recon_eval, metric="rfid")
    grid_batch = None

    # ------------------------------------------------------------------ the loop
    while run.running():
        step = run.state.step
        use_gan = step >= gan_start
        use_lpips = step >= lpips_start
        update_disc = step >= disc_start
        terms = {k: torch.zeros((), device=info.device, dtype=torch.float64)
                 for k in GENERATOR_TERMS + DISC_TERMS}
        micro_batches = []
        dec_net.train()
        n = layout.accum_steps

        # ---- generator step
        with run.timer.phase("fwd_bwd"):
            for micro in range(n):
                with run.timer.phase("data"):
                    batch = stream.next_batch()
                x = batch["image"].to(info.device, non_blocking=True).float()
                seeds = per_sample_seeds(cfg.run.seed, step, batch["index"])
                micro_batches.append((x, seeds))
                if grid_batch is None:
                    grid_batch = x[: cfg.logging.num_sample_images].clone()
                with strategy.accumulate(is_last=micro == n - 1):
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
                        logits = heads(backbone(augment(x_hat * 2 - 1, step, micro, AugmentDraw.GENERATOR_FAKE)))
                        gan = g_loss(logits)
                        weight = last_layer.adaptive_weight(rec, gan, max_weight=g.max_d_weight)
                        loss = rec + g.disc_weight * weight * gan
                    strategy.backward(loss)
                for k, v in (("l1", l1), ("lpips", lp), ("gan", gan), ("total", loss), ("d_weight", weight)):
                    terms[k] += v.detach().double() / n
        # one collective: the generator terms' global means (every rank alike) and the stop votes
        reduced = run.reduce_step({k: terms[k] for k in GENERATOR_TERMS}, info.world_size)
        ok = run.losses_finite({k: reduced[k] for k in ("l1", "lpips", "gan", "total")})
        with run.timer.phase("optimizer"):
            grad_norm = strategy.step() if ok else strategy.skip_step()
            d_strategy.optimizer.zero_grad(set_to_none=True)  # the G loss reached the heads too

        # ---- discriminator step (fresh, noise-free, 8-bit-quantised reconstructions)
        if update_disc:
            with run.timer.phase("disc"):
                for micro, (x, seeds) in enumerate(micro_batches):
                    with torch.no_grad():
                        dec_net.eval()
                        fake = reconstruct(x, seeds, noisy=False)
                        dec_net.train()
                        fake = torch.round((fake * 2 - 1).clamp(-1, 1).add(1).mul(127.5)).div(127.5).sub(1)
                    with d_strategy.accumulate(is_last=micro == n - 1):
                        real_logits = heads_net(backbone(augment(x * 2 - 1, step, micro, AugmentDraw.DISC_REAL)))
                        fake_logits = heads_net(backbone(augment(fake, step, micro, AugmentDraw.DISC_FAKE)))
                        ld = d_loss(real_logits, fake_logits)
                        d_strategy.backward(ld)
                    terms["disc"] += ld.detach().double() / n
                    terms["logits_real"] += real_logits.detach().double().mean() / n
                    terms["logits_fake"] += fake_logits.detach().double().mean() / n
                # the step's second collective, while the discriminator trains: its terms, agreed by all
                disc = dict(zip(DISC_TERMS, (v / info.world_size for v in
                                             global_sums([terms[k] for k in DISC_TERMS], info.device))))
                reduced.update(disc)
                if math.isfinite(disc["disc"]):
                    d_strategy.step()
                else:
                    d_strategy.skip_step()
        else:
            # the discriminator has not stepped yet; its schedule still follows the step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                d_strategy.scheduler.step()
        run.end_step()

        if run.metrics_due():
            reduced.update({k: 0.0 for k in DISC_TERMS if k not in reduced})  # no discriminator step yet
            run.log_metrics({
                "loss": reduced["total"], "loss_l1": reduced["l1"], "loss_lpips": reduced["lpips"],
                "loss_gan": reduced["gan"], "gan_weight": reduced["d_weight"], "loss_disc": reduced["disc"],
                "disc_logits_real": reduced["logits_real"], "disc_logits_fake": reduced["logits_fake"],
                "lr": strategy.current_lr(), "lr_disc": d_strategy.current_lr(), "grad_norm": float(grad_norm),
                "gan_active": int(use_gan), "disc_active": int(update_disc)})
        if run.grid_due():
            _recon_grid(run, strategy, encoder, decoder, grid_batch, image_mean, image_std)
        run.save_or_stop()
    return run.finish()


@torch.no_grad()
def _recon_grid(run: Run, strategy, encoder, decoder, x, mean, std) -> None:
    """Inputs over EMA reconstructions (noise-free) as one PNG grid (rank 0 writes)."""
    if x is None:
        return
    ema = strategy.ema.module if strategy.ema is not None else decoder
    tokens = encoder(x)
    with strategy.autocast():
        pixels = decoder.unpatchify(ema(tokens))
    if run.info.rank != 0:
        return
    recon = (pixels.float() * std + mean).clamp(0, 1)
    run.write_grid(torch.cat([x, recon]), f"recon-{run.state.step:08d}.png", key="reconstructions",
                   nrow=x.shape[0], what="reconstruction grid (inputs over EMA reconstructions)")
