"""Online evaluation inside the training loops, and the best checkpoint kept pinned.

Every `eval.every_steps` steps the loops score the EMA weights (or the raw ones with
`eval.use_ema=false`) on `eval.num_samples` images with the same machinery as `rae-scale evaluate`:
stage 2 samples class-conditional images with per-sample seeds and reports FID/sFID against a
reference (an ADM npz, an image folder or MDS shards; by default the run's own image shards);
stage 1 reconstructs the first images of its dataset and reports rFID, PSNR and SSIM. The
work is spread over every rank, and the numbers do not depend on the world size.

The weights are consolidated on rank 0 and broadcast into a plain, unsharded copy of the network
on every rank, so the same code serves DDP, FSDP2 and DeepSpeed, and sampling never has to keep
sharded ranks in lock-step. Lower is better for the metric that picks the best checkpoint (FID or
rFID); its value and step live in the checkpointed TrainState, so resume keeps them, as do the first
step and epoch at which stage 2's unguided FID reached each eval.fid_k (E@FID-k, FIDMilestones).
Stage 2 scores with evaluate_generator's engine (collect_generator_features + compute_metrics) called
directly, so that its first evaluation can keep the per-sample features the tripwires' class check
needs (rae_scale.train.tripwires); the numbers are the same as `rae-scale evaluate`'s.
"""
from __future__ import annotations

import copy
import logging
import math
import time

import torch
import torch.distributed as dist

from rae_scale import config as C

log = logging.getLogger(__name__)


def is_due(every_steps: int, step: int) -> bool:
    return every_steps > 0 and step > 0 and step % every_steps == 0


class BestCheckpoint:
    """Tracks the best (lowest) value of one metric in TrainState.extra, so it survives resume."""

    def __init__(self, state, metric: str):
        self.state = state
        self.metric = metric

    @property
    def value(self) -> float | None:
        return self.state.extra.get("best_value")

    @property
    def step(self) -> int | None:
        return self.state.extra.get("best_step")

    def offer(self, value: float, step: int) -> tuple[bool, int | None]:
        """Record value at step if it beats the best so far: (is_new_best, previous best step)."""
        if not math.isfinite(value) or (self.value is not None and value >= self.value):
            return False, None
        previous = self.step
        self.state.extra.update(best_metric=self.metric, best_value=float(value), best_step=int(step))
        return True, previous


def broadcast_module_state(module: torch.nn.Module, state: dict, rank: int) -> None:
    """Load rank 0's full state dict into `module` on every rank (tensor broadcasts, no pickling)."""
    if rank == 0:
        # names match: the strategies apply AC and compile in place (parallel/ac.py, compile.py)
        missing, _ = module.load_state_dict(state, strict=False)  # extra non-persistent buffers are harmless
        if missing:
            raise RuntimeError(f"online evaluation: the gathered weights lack {missing[:5]} "
                               f"({len(missing)} tensors in all)")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def _from_rank0(obj):
    """Rank 0's object on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _full_weights(strategy, use_ema: bool) -> dict:
    """Consolidated weights on rank 0 ({} elsewhere); collective."""
    if use_ema and strategy.ema is not None:
        return strategy.ema_full_state_dict()
    return strategy.full_state_dict()


class Stage2OnlineFID:
    """FID / sFID of class-conditional samples of the network being trained."""

    def __init__(self, cfg: C.Stage2Job, model: torch.nn.Module, info, batch_size: int, decoding_rae):
        """decoding_rae(): the loop's frozen RAE for decoding samples (None if it could not be built)."""
        self.cfg, self.info, self.batch_size, self.decoding_rae = cfg, info, batch_size, decoding_rae
        e = cfg.eval
        self.reference_source = e.reference or cfg.data.url
        if not self.reference_source:
            raise C.ConfigError("eval.every_steps > 0 needs eval.reference (an ADM npz, an image folder or "
                                "MDS shards) or data.url (the run's image shards)")
        # a plain copy of the network for sampling (built now: the trained one gets wrapped later)
        self.eval_model = copy.deepcopy(model).to(info.device).eval().requires_grad_(False)
        self.sample_cfg = C.from_generator(C.SampleJob, cfg, seed=cfg.run.seed)
        self._inception = self._reference = self._rae = None

    def _setup(self) -> None:
        from rae_scale.eval.inception import build_inception
        from rae_scale.eval.reference import load_reference

        self._inception = build_inception(device=self.info.device)
        self._rae = self.decoding_rae()
        if self._rae is None:
            raise RuntimeError("online FID needs the RAE to decode samples and it could not be built "
                               "(see the warning above); fix rae.* or set eval.every_steps=0")
        if self.info.rank == 0:  # cached by content hash after the first time
            self._reference = load_reference(self.reference_source, inception=self._inception)

    def __call__(self, strategy, step: int, tripwires=None) -> dict:
        """The evaluation row; with `tripwires` (their sample checks due) also the sample checks
        (rae_scale.train.tripwires), recorded there."""
        from rae_scale.diffusion.sample_fn import make_sample_fn

        if self._inception is None:
            self._setup()
        t0 = time.perf_counter()
        broadcast_module_state(self.eval_model, _full_weights(strategy, self.cfg.eval.use_ema), self.info.rank)
        sample_fn = make_sample_fn(self.sample_cfg, self.eval_model, self._rae, self.info.device)
        separation = tripwires is not None and self._can_separate(tripwires.cfg.min_class_separation)
        metrics, features = self._score(sample_fn, keep_pool=separation)
        out = {f"eval_{k}": v for k, v in (metrics or {}).items() if k in ("fid", "sfid", "inception_score")}
        if tripwires is not None:
            tripwires.record(self._sample_checks(metrics, features if separation else None, tripwires.cfg), step)
            tripwires.samples_checked(step)
        out["eval_time_s"] = time.perf_counter() - t0
        out["sampling_spec"] = self.spec(step)
        return out

    def spec(self, step: int) -> dict:
        """How this evaluation sampled, in `evaluate`'s vocabulary (eval.spec): the run's weights at `step`
        (EMA or not), the network, sampler, shift, guidance, and the samples (number, seed, labels)."""
        from rae_scale.eval.spec import sampling_spec

        e = self.cfg.eval
        weights = {"run": self.cfg.run.dir, "step": int(step), "weights": "ema" if e.use_ema else "model"}
        return {**sampling_spec(self.sample_cfg, checkpoint=weights),
                "samples": {"num_samples": e.num_samples, "seed": self.cfg.run.seed, "label_sampling": "equal",
                            "num_classes": self.cfg.dit.num_classes},
                "reference": self.reference_source}

    def _score(self, sample_fn, keep_pool: bool = False):
        """(metrics on every rank, features on rank 0): evaluate_generator's engine, called directly so the
        per-sample pool features can be kept (collective)."""
        from rae_scale.eval.features import collect_generator_features, compute_metrics

        n, world, rank = self.cfg.eval.num_samples, self.info.world_size, self.info.rank
        features = collect_generator_features(
            sample_fn, num_samples=n, batch_size=self.batch_size, num_classes=self.cfg.dit.num_classes,
            seed=self.cfg.run.seed, rank=rank, world_size=world, inception=self._inception,
            unit_size=max(1, -(-n // world)), keep_pool=keep_pool, keep_logits=True)
        metrics = compute_metrics(features, self._reference) if rank == 0 else None
        return _from_rank0(metrics), features

    def _can_separate(self, min_separation: float) -> bool:
        """Whether the class-separation check can run: on, 2+ classes, more samples than classes."""
        n, c = self.cfg.eval.num_samples, self.cfg.dit.num_classes
        if min_separation > 0 and (c < 2 or n <= c) and self.info.rank == 0:
            log.info("tripwire class_separation skipped: it needs 2+ classes and eval.num_samples > dit.num_classes "
                     "(%d samples, %d classes)", n, c)
        return min_separation > 0 and c >= 2 and n > c

    def _sample_checks(self, metrics: dict, features, cfg) -> list:
        """The tripwires' verdicts on this evaluation's samples (the same on every rank; collective):
        FID between the decoded data's floor and decoded noise's, and class separation when `features`
        (rank 0's) are given."""
        from rae_scale.eval.features import sample_labels
        from rae_scale.train import tripwires as T

        results = []
        if self.cfg.rae.decoder_checkpoint:
            latent_shape = (self.cfg.dit.in_channels, self.cfg.dit.input_size, self.cfg.dit.input_size)
            noise_fid = self._score(T.noise_sample_fn(self._rae, latent_shape, self.info.device))[0]["fid"]
            floor_fn, why_not = self._data_floor_fn()
            floor_fid = self._score(floor_fn)[0]["fid"] if floor_fn is not None else 0.0
            result = T.check_samples_vs_noise(metrics["fid"], noise_fid, floor_fid, cfg.max_fid_ratio)
            if result is not None:
                results.append(result)
            if self.info.rank == 0 and floor_fn is None:
                log.info("tripwire samples_vs_noise without its floor (%s): the samples' FID over decoded noise's",
                         why_not)
            elif self.info.rank == 0 and result is None:
                log.info("tripwire samples_vs_noise skipped: through this decoder the data's own latents (FID %.4g) "
                         "are no closer to the reference than decoded noise (FID %.4g)", floor_fid, noise_fid)
        elif self.info.rank == 0:  # measured: decoded data latents scored 379.5, decoded noise 378.2
            log.info("tripwire samples_vs_noise skipped: without rae.decoder_checkpoint the decoder is random, and "
                     "through it even the data's own latents are as far from the reference as noise")
        if features is not None:
            separation = None
            if self.info.rank == 0:
                labels = sample_labels(self.cfg.eval.num_samples, self.cfg.dit.num_classes, self.cfg.run.seed)
                separation = T.check_class_separation(features.pool_features, labels, cfg.min_class_separation)
            results.append(_from_rank0(separation))
        return results

    def _data_floor_fn(self):
        """(sample_fn of the data's own first eval.num_samples latents decoded, None), the samples_vs_noise
        floor; or (None, why) when the data cannot be read by index (webdataset) or holds fewer samples."""
        from functools import partial

        from rae_scale.data import latents as L, loader, mds, schema
        from rae_scale.train import tripwires as T

        d, n = self.cfg.data, self.cfg.eval.num_samples
        if d.source == "latents":
            info = loader.latent_cache_info(d.latents_url)
            url, decode = d.latents_url, partial(L.decode_latent_sample, dtype=info["dtype"], both_flips=False)
            to_latent = self._rae.normalize
        else:  # images encoded by the run's own encoder (the decoding RAE holds it when the run encodes online)
            url = d.url or d.sources[0].url
            if schema.detect_format(url) != "mds":
                return None, f"{url} is not MDS shards, which can be read by index"
            decode, to_latent = loader.decode_image_sample, lambda x: self._rae.encode(x / 255.0).latent
        ds = mds.make_dataset(url, decode=decode, batch_size=1, seed=0, shuffle=False, num_canonical_nodes=None,
                              cache_dir=d.cache_dir, drop_last=False)
        if ds.num_samples < n:
            return None, f"{url} holds {ds.num_samples} samples, fewer than eval.num_samples={n}"
        return T.data_sample_fn(self._rae, lambda i: ds[i][0], to_latent, n, self.cfg.run.seed, self.info.device), None


class Stage1OnlineRecon:
    """rFID, PSNR and SSIM of reconstructions of the first eval.num_samples dataset images."""

    def __init__(self, cfg: C.Stage1Job, encoder, decoder: torch.nn.Module, image_mean, image_std, info,
                 batch_size: int):
        self.cfg, self.info, self.batch_size = cfg, info, batch_size
        self.encoder, self.mean, self.std = encoder, image_mean, image_std
        self.eval_decoder = copy.deepcopy(decoder).to(info.device).eval().requires_grad_(False)
        self._inception = None

    @torch.no_grad()
    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.info.device).float()
        pixels = self.eval_decoder.unpatchify(self.eval_decoder(self.encoder(x)))
        return (pixels.float() * self.std + self.mean).clamp(0, 1)

    def __call__(self, strategy, step: int) -> dict:
        from rae_scale.data.loader import build_image_loader
        from rae_scale.eval.inception import build_inception
        from rae_scale.eval.recon import evaluate_reconstruction

        if self._inception is None:
            self._inception = build_inception(device=self.info.device)
        t0 = time.perf_counter()
        broadcast_module_state(self.eval_decoder, _full_weights(strategy, self.cfg.eval.use_ema), self.info.rank)
        c = self.cfg
        loader = build_image_loader(c.data.url, batch_size=self.batch_size, rank=self.info.rank,
                                    world_size=self.info.world_size, seed=0, shuffle=False, hflip=False,
                                    drop_last=False)
        metrics = evaluate_reconstruction(loader, self._reconstruct, num_samples=c.eval.num_samples,
                                          reference=c.eval.reference, rank=self.info.rank,
                                          world_size=self.info.world_size, inception=self._inception)
        out = {f"eval_{k}": v for k, v in metrics.items() if k in ("rfid", "psnr", "ssim")}
        out["eval_time_s"] = time.perf_counter() - t0
        return out


class FIDMilestones:
    """E@FID-k: the first step (and epoch) at which the online FID reached each k, kept in
    TrainState.extra (so resume keeps them); only an unguided online FID counts (fid_k_values)."""

    KEY = "fid_k_reached"

    def __init__(self, ks, state, steps_per_epoch: int):
        self.ks = sorted({float(k) for k in ks}, reverse=True)
        self.state, self.steps_per_epoch = state, steps_per_epoch

    @property
    def reached(self) -> dict:
        """{k as text: {"step": ..., "epoch": ...}} of every k reached so far."""
        return self.state.extra.setdefault(self.KEY, {})

    def offer(self, fid: float | None, step: int) -> dict:
        """Record the ks that `fid` at `step` reaches for the first time: their metrics columns."""
        columns = {}
        for k in self.ks:
            name = f"{k:g}"
            if fid is None or not math.isfinite(fid) or fid > k or name in self.reached:
                continue
            epoch = step / self.steps_per_epoch
            self.reached[name] = {"step": int(step), "epoch": epoch}
            columns.update({f"eval_steps_to_fid_{name}": int(step), f"eval_epochs_to_fid_{name}": epoch})
        return columns


def fid_k_values(cfg, metric: str, rank: int = 0) -> list:
    """The eval.fid_k values a run tracks: stage 2's (metric fid) when its online FID is unguided."""
    ks = list(getattr(cfg.eval, "fid_k", None) or [])
    if not ks or metric != "fid":
        return []
    method = cfg.guidance.method
    if method != "none":
        if rank == 0:
            log.warning("eval.fid_k is not tracked: E@FID-k counts unguided FID and the online evaluation samples "
                        "with guidance.method=%s", method)
        return []
    return ks


class OnlineEvaluation:
    """What a loop calls: due(step) -> run(strategy, step) -> save with pin=is_best -> after_save()."""

    def __init__(self, evaluate, state, metric: str, every_steps: int, rank: int, tripwires=None,
                 fid_k=(), steps_per_epoch: int = 1):
        """tripwires: the run's Tripwires (stage 2), whose sample checks the first evaluation runs;
        fid_k: the FIDs whose first step and epoch are recorded (fid_k_values)."""
        self.evaluate, self.every_steps, self.rank, self.tripwires = evaluate, every_steps, rank, tripwires
        self.steps_per_epoch = steps_per_epoch
        self.best = BestCheckpoint(state, metric)
        self.milestones = FIDMilestones(fid_k, state, steps_per_epoch) if fid_k else None
        self._unpin: int | None = None

    def due(self, step: int) -> bool:
        return is_due(self.every_steps, step)

    def run(self, strategy, step: int) -> tuple[dict, bool]:
        """Evaluate at `step`: (metrics row, whether it is the best so far and must be saved pinned)."""
        if self.tripwires is not None and self.tripwires.samples_due():
            row = self.evaluate(strategy, step, tripwires=self.tripwires)
        else:
            row = self.evaluate(strategy, step)
        value = row.get(f"eval_{self.best.metric}")
        is_best, previous = self.best.offer(float("nan") if value is None else float(value), step)
        row[f"eval_best_{self.best.metric}"] = self.best.value if self.best.value is not None else float("nan")
        # the fractional epoch (the row's `epoch` is whole epochs): the x axis of FID against epochs (fid_curve)
        row["eval_epoch"] = step / self.steps_per_epoch
        if self.milestones is not None:
            row.update(self.milestones.offer(value, step))
        if self.rank == 0:
            log.info("online evaluation at step %d: %s", step,
                     ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
            if is_best:
                log.info("step %d is the best so far (%s = %.4g): its checkpoint is pinned", step,
                         self.best.metric, value)
        self._unpin = previous if is_best and previous != step else None
        return row, is_best

    def after_save(self, ckpt_io) -> None:
        """Unpin the previous best once the new best is committed (retention may then drop it)."""
        if self._unpin is None:
            return
        ckpt_io.wait()
        if self.rank == 0:
            try:
                ckpt_io.manager.unpin(self._unpin)
            except (FileNotFoundError, OSError) as exc:  # already gone: nothing left to protect
                log.warning("could not unpin the previous best checkpoint (step %d): %r", self._unpin, exc)
        self._unpin = None
