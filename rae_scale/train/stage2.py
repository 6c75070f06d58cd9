"""Stage 2: DiT-DH / LightningDiT (velocity) or RAEv2's DiT-DH-IG (x-prediction) flow matching on RAE
latents, one explicit loop.

Reads top to bottom: data, model and strategy, the loop; the run's bookkeeping (checkpoints,
metrics, preemption, online evaluation) is the harness's (rae_scale.train.run). Per-sample
randomness (time, noise, label dropout) is seeded by (run seed, step, sample index), so a run's
numbers do not depend on how the global batch is split over ranks and micro-batches: 1 rank, 2
ranks, DDP, FSDP2 and DeepSpeed see the same losses, and a resumed run repeats an uninterrupted one.
The draws of the next micro-batch are made in a thread while the current one computes (DrawAhead).
Latents come from the cache, or from image shards through the frozen encoder (data.source=images).
RAEv2's optional REPA loss (dit.repa_depth) needs the images too: its targets are a second frozen encoder's
patch tokens of them (repa.encoder), computed in the step.
A text-to-image model (dit.condition_type=text) is conditioned on the captions that travel with the
batch, encoded inside the step by the frozen text encoder; caption dropout is the label-dropout draw.
"""
from __future__ import annotations

import logging

import torch

from rae_scale import config as C
from rae_scale.builders import build_dit_model, build_frozen_encoder, build_rae, build_text_encoder, latent_normalizer
from rae_scale.data.batch_stream import BatchStream
from rae_scale.diffusion.sample_fn import make_sample_fn
from rae_scale.diffusion.transport import Transport
from rae_scale.models.encoders import tokens_to_grid
from rae_scale.optim import lr_factor_fn, optimizer_factory
from rae_scale.parallel.frozen import prepare_frozen
from rae_scale.seeding import Stream, per_sample_seeds, seeded_bernoulli, seeded_normal, seeded_uniform
from rae_scale.train.online_eval import Stage2OnlineFID
from rae_scale.train.draw_ahead import DrawAhead
from rae_scale.train.errors import TrainingSetupError
from rae_scale.train.run import Run
from rae_scale.train.throughput import count_params
from rae_scale.train.tripwires import zero_prediction_loss

log = logging.getLogger(__name__)


def main(cfg: C.Stage2Job) -> int:
    run = Run(cfg, "stage2")
    info, layout = run.info, run.layout

    # ------------------------------------------------------------------ data
    online = cfg.data.source == "images"  # encode image shards inside the step instead of reading a latent cache
    latent_shape = C.latent_shape(cfg.rae)  # what dit.in_channels and dit.input_size were derived from
    text = cfg.dit.condition_type == "text"  # text-to-image: the batches carry captions
    if online:
        # each sample flipped exactly when a latent cache with both flips would hand out its flipped variant
        stream = BatchStream.for_images(cfg.data, micro_batch=layout.micro_batch, rank=info.rank,
                                        world_size=info.world_size, seed=cfg.run.seed, flip_like_latent_cache=True,
                                        with_captions=text, virtual_epoch_steps=cfg.training.virtual_epoch_steps,
                                        accum_steps=layout.accum_steps)
    else:
        stream = BatchStream.for_latents(cfg.data, micro_batch=layout.micro_batch, rank=info.rank,
                                         world_size=info.world_size, seed=cfg.run.seed, with_captions=text,
                                         latent_shape=latent_shape, virtual_epoch_steps=cfg.training.virtual_epoch_steps,
                                         accum_steps=layout.accum_steps)
    # the cache holds raw encoder latents; the model learns (and sampling decodes) normalised ones
    normalize = latent_normalizer(cfg.rae, info.device)
    if info.rank == 0:
        log.info("latents normalised with %s", cfg.rae.stats_path or "nothing (rae.stats_path is empty)")
    total_steps = run.plan_steps(stream.batches_per_epoch)

    # one frozen decoder for sample grids and online FID, built now: a bad rae.decoder_checkpoint stops
    # the run here, not hours later at the first grid (built before the seed: it leaves the model as is)
    rae = _sampling_rae(cfg, info.device, with_encoder=online)
    encoder = _online_encoder(cfg, rae, info.device) if online else None
    # RAEv2's explicit REPA (dit.repa_depth set; config load made sure data.source=images): targets are a second
    # frozen encoder's patch tokens of the same images, computed in the step (no random draws)
    repa = cfg.dit.repa_depth is not None
    repa_encoder = _repa_target_encoder(cfg, info.device) if repa else None
    # frozen, unsharded, in inference mode: captions -> condition tokens inside the step (RAEv2 does the same)
    text_encoder = build_text_encoder(cfg.text_encoder, info.device) if text else None

    # ------------------------------------------------------------------ model, optimizer, EMA
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    model = build_dit_model(cfg.dit)
    if hasattr(model, "y_embedder"):
        # Label dropout happens below with per-sample seeds; the model's own (global-RNG) dropout is off.
        model.y_embedder.dropout_prob = 0.0
    null_label = cfg.dit.num_classes
    n_params = count_params(model)
    log.info("%s: %.2f M trainable parameters; %d steps (%d per epoch)", cfg.dit.model, n_params / 1e6,
             total_steps, run.steps_per_epoch)
    # online FID samples from a plain copy, made before the strategy wraps (and maybe shards) the model
    fid_eval = Stage2OnlineFID(cfg, model, info, layout.micro_batch, lambda: rae) if cfg.eval.every_steps else None
    strategy = run.build_strategy()
    net = strategy.wrap(model, blocks=model.transformer_blocks(), optimizer_factory=optimizer_factory(cfg.optimizer),
                        lr_lambda=lr_factor_fn(cfg.schedule, total_steps, run.steps_per_epoch, cfg.optimizer.lr),
                        ema_decay=cfg.training.ema_decay)
    transport = Transport.from_config(cfg.transport)
    shift = transport.shift_for(latent_shape)

    def draws(batch: dict, step: int) -> dict:
        """The per-sample draws of a micro-batch: time, noise, label or caption dropout (see the module
        docstring)."""
        seeds = per_sample_seeds(cfg.run.seed, step, batch["index"])
        return {"t": transport.time_from_uniform(seeded_uniform(seeds, Stream.TIME), shift),
                "noise": seeded_normal(seeds, latent_shape, Stream.NOISE),
                "label_drop": seeded_bernoulli(seeds, cfg.dit.class_dropout_prob, Stream.LABEL_DROP)}

    # the next micro-batch and its draws are made in a thread while this one computes
    batches = DrawAhead(stream, draws, accum_steps=layout.accum_steps, pin_memory=info.device.type == "cuda")
    run.resume(strategy, batches, evaluation=fid_eval, metric="fid")
    batches.start(run.state.step)

    # ------------------------------------------------------------------ the loop
    while run.running():
        step = run.state.step
        net.train()
        loss_sum = torch.zeros((), device=info.device, dtype=torch.float64)
        base_sum = torch.zeros((), device=info.device, dtype=torch.float64)  # an IG model's base-head loss
        repa_sum = torch.zeros((), device=info.device, dtype=torch.float64)  # the unweighted REPA term
        with run.timer.phase("fwd_bwd"):
            for micro in range(layout.accum_steps):
                with run.timer.phase("data"):
                    batch = batches.next_batch(step, micro)
                repa_target = None
                if online:
                    with run.timer.phase("encode"):
                        images = batch["image"].to(info.device, non_blocking=True)
                        raw = encode_images(encoder, images, strategy)
                        if repa:
                            repa_target = repa_targets(repa_encoder, images, strategy)
                else:
                    raw = batch["latent"].to(info.device, non_blocking=True)
                z = normalize(raw.float())
                t = batch["t"].to(info.device, non_blocking=True)
                eps = batch["noise"].to(info.device, non_blocking=True)
                drop = batch["label_drop"].to(info.device, non_blocking=True)
                if text:  # a dropped caption is the null condition: every text token masked
                    with run.timer.phase("encode_text"):
                        y = text_encoder.condition(batch["caption"], drop)
                else:
                    y = batch["label"].to(info.device, non_blocking=True)
                    y = torch.where(drop, torch.full_like(y, null_label), y)
                with strategy.accumulate(is_last=micro == layout.accum_steps - 1):
                    parts = transport.loss_parts(_predict(strategy, net, y, intermediate=repa), z, t, eps,
                                                 repa_target, cfg.repa.coeff)
                    # micro-batch mean; the strategy divides by the accumulation steps and the
                    # gradient all-reduce averages over ranks: the gradient of the global-batch mean
                    strategy.backward(parts.total.mean())
                loss_sum += parts.total.detach().double().sum()
                if parts.base is not None:
                    base_sum += parts.base.detach().double().sum()
                if repa:
                    repa_sum += parts.repa.detach().double().sum()
        sums = {"loss": loss_sum, "loss_base": base_sum, **({"loss_repa": repa_sum} if repa else {})}
        means = run.reduce_step(sums, layout.global_batch)
        global_loss = means["loss"]
        extra = {"loss_base": means["loss_base"]} if parts.base is not None else {}
        if repa:  # as RAEv2 logs it: the term's share of the loss, repa.coeff x MSE
            extra["loss_repa"] = cfg.repa.coeff * means["loss_repa"]
        ok = run.losses_finite({"loss": global_loss})
        with run.timer.phase("optimizer"):
            grad_norm = strategy.step() if ok else strategy.skip_step()
        run.end_step(loss=global_loss)
        if run.tripwires.loss_due(run.state.step):  # a loss no better than predicting zero trips (train/tripwires.py)
            run.tripwires.loss_check(run.state.step, run.window_loss(), zero_prediction_loss(
                transport, z, t, eps, two_heads=parts.base is not None, device=info.device, repa_target=repa_target,
                repa_coeff=cfg.repa.coeff))

        if run.metrics_due():
            run.log_metrics({"loss": global_loss, "loss_avg": run.window_loss(), **extra, "lr": strategy.current_lr(),
                             "grad_norm": float(grad_norm)},
                            tokens_per_image=cfg.dit.input_size ** 2 / cfg.dit.patch_size ** 2,
                            trained_params=n_params)
        if run.grid_due():
            _sample_grid(run, strategy, rae, text_encoder, batch.get("caption"))
        run.save_or_stop()
    batches.close()
    return run.finish()


def _online_encoder(cfg: C.Stage2Job, rae, device):
    """The frozen encoder of online encoding (the sampling RAE's when it was built), compiled when
    parallel.compile is on."""
    encoder = rae.encoder if rae is not None else build_frozen_encoder(cfg.rae.encoder)
    encoder = prepare_frozen(encoder, device)
    return torch.compile(encoder) if cfg.parallel.compile else encoder


def _repa_target_encoder(cfg: C.Stage2Job, device):
    """The REPA target encoder (repa.encoder): frozen, in inference mode and never sharded, like the online
    encoder (compiled when parallel.compile is on). Its width and token grid must be the configured ones:
    dit.repa_dim and the DiT's patch grid were checked against them when the config was loaded."""
    enc = cfg.repa.encoder
    encoder = prepare_frozen(build_frozen_encoder(enc, key="repa.encoder"), device)
    grid = enc.input_size // enc.patch_size
    if encoder.latent_shape != (enc.hidden_size, grid, grid):
        raise C.ConfigError(f"the REPA target encoder {enc.pretrained!r} gives tokens of width {encoder.hidden_size} on "
                            f"a {encoder.grid_size}x{encoder.grid_size} grid, but config keys 'repa.encoder.hidden_size' "
                            f"/ 'repa.encoder.patch_size' say {enc.hidden_size} and patch {enc.patch_size}; set them to "
                            "the weights' sizes")
    return torch.compile(encoder) if cfg.parallel.compile else encoder


@torch.no_grad()
def repa_targets(encoder, images: torch.Tensor, strategy) -> torch.Tensor:
    """Images in [0, 1] -> REPA targets [B, N, D] in float32: the target encoder's patch tokens, under the run's
    autocast like encode_images. RAEv2 feeds images * 255 to its encoder's preprocessing (/ 255, ImageNet
    mean/std, bicubic resize without antialias to 224 px); the FrozenEncoder resizes first, then standardises:
    the same map, as a per-channel affine map commutes with a resize whose weights sum to 1."""
    with strategy.autocast():
        return encoder(images).float()


@torch.no_grad()
def encode_images(encoder, images: torch.Tensor, strategy) -> torch.Tensor:
    """Images in [0, 1] -> raw latents [B, C, h, w] in float32, what the latent cache stores (no noise, no
    normalisation), under the run's autocast (bf16 runs encode in bf16)."""
    with strategy.autocast():
        tokens = encoder(images)
    return tokens_to_grid(tokens).float()


def _predict(strategy, net, y, intermediate: bool = False):
    """The network as the transport's loss calls it, (x_t, t) -> its prediction (a velocity, an
    x-prediction, or an IG model's (full, base) pair), under the strategy's autocast; intermediate: also
    the REPA projector output, (prediction, projected), dit_dh_ig's return_intermediate."""
    def predict(x_t, t):
        with strategy.autocast():
            return net(x_t, t, y, return_intermediate=True) if intermediate else net(x_t, t, y)

    return predict


def _sampling_rae(cfg: C.Stage2Job, device, with_encoder: bool):
    """The decoder for sample grids and online FID (frozen, eval), with the encoder only when the run
    encodes images itself. A decoder checkpoint that cannot be loaded is an error; without one (a random
    decoder) a failure only costs the grids."""
    try:
        return build_rae(cfg.rae, storage_options=cfg.run.storage_options,
                         with_encoder=with_encoder).to(device).eval()
    except Exception as exc:
        if cfg.rae.decoder_checkpoint:
            raise TrainingSetupError(f"rae.decoder_checkpoint={cfg.rae.decoder_checkpoint!r} could not be loaded "
                                     f"for sample grids and online evaluation: {exc}") from exc
        log.warning("no sample grids: the RAE for decoding could not be built (%s)", exc)
        return None


def _grid_sampler(cfg: C.Stage2Job) -> tuple[C.SampleJob, str]:
    """The sampling settings of the grids: the run's sampler, mode and guidance (autoguidance needs a
    second trained model the run does not have: its grids are unguided), and a line that says so."""
    job = C.from_generator(C.SampleJob, cfg, seed=cfg.run.seed, precision=cfg.parallel.precision)
    g, s = job.guidance, job.sampler
    if g.method == "autoguidance":
        g.method = "none"
    scales = {"none": "", "ig": f" {g.ig_scale:g}", "ig_cfg": f" {g.ig_scale:g} + cfg {g.scale:g}"}
    guidance = g.method + scales.get(g.method, f" {g.scale:g}")
    return job, f"{s.mode} {s.method}, {s.num_steps} steps, guidance {guidance}"


@torch.no_grad()
def _sample_grid(run: Run, strategy, rae, text_encoder=None, captions=None) -> None:
    """EMA samples of a few classes (text-to-image: of the last batch's captions, cycled), decoded and
    written as a PNG grid (rank 0 writes); every rank samples (a sharded EMA's forward is collective)."""
    if not rae:
        return
    cfg, device = run.cfg, run.info.device
    ema = strategy.ema.module if strategy.ema is not None else strategy.module
    ema.eval()
    job, settings = _grid_sampler(cfg)
    n = cfg.logging.num_sample_images
    if text_encoder is not None:
        conditions = [captions[i % len(captions)] for i in range(n)]
    else:
        conditions = torch.arange(n) % cfg.dit.num_classes
    images = make_sample_fn(job, ema, rae, device, text_encoder=text_encoder)(conditions, torch.arange(n))
    if run.info.rank != 0:
        return
    run.write_grid(images.float() / 255, f"step-{run.state.step:08d}.png", key="samples", nrow=min(n, 10),
                   what=f"sample grid ({settings})")
    if text_encoder is not None:
        run.write_text(f"step-{run.state.step:08d}.txt", "\n".join(conditions) + "\n", what="the grid's prompts")
