"""Stage 2: DiT-DH / LightningDiT flow matching on RAE latents, one explicit loop.

Reads top to bottom: data, model and strategy, the loop; the run's bookkeeping (checkpoints,
metrics, preemption, online evaluation) is the harness's (rae_scale.train.run). Per-sample
randomness (time, noise, label dropout) is seeded by (run seed, step, sample index), so a run's
numbers do not depend on how the global batch is split over ranks and micro-batches: 1 rank, 2
ranks, DDP, FSDP2 and DeepSpeed see the same losses, and a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import functools
import logging

import torch

from rae_scale import config as C
from rae_scale.builders import build_dit_model, build_rae, latent_normalizer
from rae_scale.data.batch_stream import BatchStream
from rae_scale.diffusion.sampling import per_sample_noise, sample_ode
from rae_scale.diffusion.transport import Transport
from rae_scale.optim import adamw, lr_factor_fn
from rae_scale.seeding import Stream, per_sample_seeds, seeded_bernoulli, seeded_normal, seeded_uniform
from rae_scale.train.metrics import global_mean
from rae_scale.train.online_eval import Stage2OnlineFID
from rae_scale.train.run import Run
from rae_scale.train.throughput import count_params

log = logging.getLogger(__name__)


def main(cfg: C.Stage2Job) -> int:
    run = Run(cfg, "stage2")
    info, layout = run.info, run.layout

    # ------------------------------------------------------------------ data
    stream = BatchStream.for_latents(cfg.data, micro_batch=layout.micro_batch, rank=info.rank,
                                     world_size=info.world_size, seed=cfg.run.seed)
    # the cache holds raw encoder latents; the model learns (and sampling decodes) normalised ones
    normalize = latent_normalizer(cfg.rae, info.device)
    if info.rank == 0:
        log.info("latents normalised with %s", cfg.rae.stats_path or "nothing (rae.stats_path is empty)")
    total_steps = run.plan_steps(stream.batches_per_epoch)

    # ------------------------------------------------------------------ model, optimizer, EMA
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    model = build_dit_model(cfg.dit)
    # Label dropout happens below with per-sample seeds; the model's own (global-RNG) dropout is off.
    model.y_embedder.dropout_prob = 0.0
    null_label = cfg.dit.num_classes
    n_params = count_params(model)
    log.info("%s: %.2f M trainable parameters; %d steps (%d per epoch)", cfg.dit.model, n_params / 1e6,
             total_steps, run.steps_per_epoch)
    # one frozen decoder, built on first use, for sample grids and online FID
    decoding_rae = functools.cache(lambda: _sampling_rae(cfg, info.device))
    # online FID samples from a plain copy, made before the strategy wraps (and maybe shards) the model
    fid_eval = Stage2OnlineFID(cfg, model, info, layout.micro_batch, decoding_rae) if cfg.eval.every_steps else None
    strategy = run.build_strategy()
    net = strategy.wrap(model, blocks=model.transformer_blocks(), optimizer_factory=adamw(cfg.optimizer),
                        lr_lambda=lr_factor_fn(cfg.schedule, total_steps, run.steps_per_epoch, cfg.optimizer.lr),
                        ema_decay=cfg.training.ema_decay)
    transport = Transport(time_dist=cfg.transport.time_dist, mu=cfg.transport.time_mu,
                          sigma=cfg.transport.time_sigma, shift_dim=cfg.transport.shift_dim,
                          shift_base=cfg.transport.shift_base)
    latent_shape = (cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size)
    shift = transport.shift_for(latent_shape)
    run.resume(strategy, stream, evaluation=fid_eval, metric="fid")

    # ------------------------------------------------------------------ the loop
    while run.running():
        step = run.state.step
        net.train()
        loss_sum = torch.zeros((), device=info.device, dtype=torch.float64)
        with run.timer.phase("fwd_bwd"):
            for micro in range(layout.accum_steps):
                with run.timer.phase("data"):
                    batch = stream.next_batch()
                z = normalize(batch["latent"].to(info.device, non_blocking=True).float())
                y = batch["label"].to(info.device)
                seeds = per_sample_seeds(cfg.run.seed, step, batch["index"])
                # per-sample draws: time, noise, label dropout (see the module docstring)
                t = transport.time_from_uniform(seeded_uniform(seeds, Stream.TIME), shift).to(info.device)
                eps = seeded_normal(seeds, z.shape[1:], Stream.NOISE).to(info.device)
                drop = seeded_bernoulli(seeds, cfg.dit.class_dropout_prob, Stream.LABEL_DROP).to(info.device)
                y = torch.where(drop, torch.full_like(y, null_label), y)
                with strategy.accumulate(is_last=micro == layout.accum_steps - 1):
                    per_sample = transport.training_loss(_velocity(strategy, net, y), z, t, eps)
                    # micro-batch mean; the strategy divides by the accumulation steps and the
                    # gradient all-reduce averages over ranks: the gradient of the global-batch mean
                    strategy.backward(per_sample.mean())
                loss_sum += per_sample.detach().double().sum()
        global_loss = global_mean(loss_sum, layout.global_batch)
        ok = run.losses_finite({"loss": global_loss})
        with run.timer.phase("optimizer"):
            grad_norm = strategy.step() if ok else strategy.skip_step()
        run.end_step(loss=global_loss)

        if run.metrics_due():
            run.log_metrics({"loss": global_loss, "loss_avg": run.window_loss(), "lr": strategy.current_lr(),
                             "grad_norm": float(grad_norm)},
                            tokens_per_image=cfg.dit.input_size ** 2 / cfg.dit.patch_size ** 2,
                            trained_params=n_params)
        if run.grid_due():
            _sample_grid(run, strategy, decoding_rae(), transport, shift, latent_shape)
        run.save_or_stop()
    return run.finish()


def _velocity(strategy, net, y):
    """The network as the transport's loss calls it, (x_t, t) -> v, under the strategy's autocast."""
    def velocity(x_t, t):
        with strategy.autocast():
            return net(x_t, t, y)

    return velocity


def _sampling_rae(cfg: C.Stage2Job, device):
    """The decoder for sample grids and online FID (frozen, eval); None when it cannot be built here."""
    try:
        return build_rae(cfg.rae, storage_options=cfg.run.storage_options).to(device).eval()
    except Exception as exc:  # grids are a convenience; training goes on without them
        log.warning("no sample grids: the RAE for decoding could not be built (%s)", exc)
        return None


@torch.no_grad()
def _sample_grid(run: Run, strategy, rae, transport, shift, latent_shape) -> None:
    """EMA samples of a few classes, decoded and written as a PNG grid (rank 0 writes)."""
    cfg, device = run.cfg, run.info.device
    ema = strategy.ema.module if strategy.ema is not None else strategy.module
    if not rae:
        return
    n = cfg.logging.num_sample_images
    labels = torch.arange(n, device=device) % cfg.dit.num_classes
    x1 = per_sample_noise((n, *latent_shape), list(range(n)), device=device)
    ema.eval()
    z0 = sample_ode(lambda x, t: ema(x, t, labels), x1, num_steps=cfg.sampler.num_steps, shift=shift,
                    method="euler" if cfg.sampler.method == "dopri5" else cfg.sampler.method)
    if run.info.rank != 0:
        return
    images = rae.decode(z0.float()).sample
    run.write_grid(images, f"step-{run.state.step:08d}.png", key="samples", nrow=min(n, 10), what="sample grid")
