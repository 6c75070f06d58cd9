"""Pieces of the two loops that are not about the model: per-sample seeding, the batch stream, and
checkpoint I/O that speaks DCP (ddp, fsdp) or DeepSpeed's own format."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: decorrelates nearby integers (seed, step, index)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def per_sample_seeds(seed: int, step: int, indices) -> list[int]:
    """One seed per sample from (run seed, optimizer step, dataset index of the sample)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    base = _mix(_mix(int(seed)) ^ int(step))
    return [_mix(base ^ _mix(int(i) + 1)) for i in indices]


def _generators(seeds: Sequence[int], stream: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(_mix(s ^ _mix(stream))) for s in seeds]


def seeded_uniform(seeds: Sequence[int], stream: int) -> torch.Tensor:
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in _generators(seeds, stream)])


def seeded_normal(seeds: Sequence[int], shape, stream: int) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in _generators(seeds, stream)])


def seeded_bernoulli(seeds: Sequence[int], p: float, stream: int) -> torch.Tensor:
    return seeded_uniform(seeds, stream) < p


def seeded_times(transport, seeds: Sequence[int], shift: float, stream: int) -> torch.Tensor:
    """Training times, one per sample, each drawn by the transport from its sample's own generator.

    Bit-identical to ``transport.sample_time(1, shift=shift, generator=g)`` per sample, at a fraction
    of the cost (that call builds a Normal distribution and runs ~15 tiny ops per sample: ~0.6 ms
    each, 20 ms for 32 samples on CPU): each sample's uniform is drawn from its own generator as
    sample_time draws it, and the transform then runs once over the batch. The first call for each
    (transport, shift) compares against the per-sample path and keeps using that path if they differ
    (a changed Transport.sample_time), so the loop's numbers never silently depend on this shortcut.
    """
    key = (repr(transport), float(shift))
    fast = _FAST_TIMES_OK.get(key)
    if fast is None:
        probe = list(seeds[:4]) + [_mix(i) for i in range(60)]
        slow = _per_sample_times(transport, probe, shift, stream)
        fast = _FAST_TIMES_OK[key] = torch.equal(
            _times_from_uniform(transport, seeded_uniform(probe, stream), shift), slow)
        if not fast:
            log.warning("seeded_times: the batched transform disagrees with Transport.sample_time; "
                        "drawing times per sample (slower)")
    if not fast:
        return _per_sample_times(transport, seeds, shift, stream)
    return _times_from_uniform(transport, seeded_uniform(seeds, stream), shift)


_FAST_TIMES_OK: dict[tuple[str, float], bool] = {}


def _per_sample_times(transport, seeds: Sequence[int], shift: float, stream: int) -> torch.Tensor:
    return torch.cat([transport.sample_time(1, shift=shift, generator=g) for g in _generators(seeds, stream)])


def _scalar_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Element-wise 1 / (1 + exp(-x)) as torch's scalar kernel computes it (libm exp, float64).

    torch.sigmoid on a batch takes a SIMD path whose exp differs from libm's in the last bit for a
    few % of float64 inputs; a batch of one (what each per-sample draw is) takes the scalar path.
    Doing it per element keeps a sample's time independent of its position in the batch.
    """
    out = []
    for v in x.tolist():
        try:
            out.append(1.0 / (1.0 + math.exp(-v)))
        except OverflowError:  # exp(-v) = inf in C: the sigmoid is 0
            out.append(0.0)
    return torch.tensor(out, dtype=torch.float64)


def _times_from_uniform(transport, u: torch.Tensor, shift: float) -> torch.Tensor:
    """Transport.sample_time's transform of its float64 uniforms u, applied to a batch.

    Same operations in the same order; every one is exact per element (IEEE arithmetic, clamp) or
    has no SIMD variant (erfinv), except the sigmoid, done the scalar way (see _scalar_sigmoid).
    """
    from rae_scale.diffusion.transport import time_shift

    if transport.time_dist == "uniform":
        t = u * transport.t_max
    else:
        normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                            torch.tensor(1.0, dtype=torch.float64))
        if transport.t_max < 1.0:
            b = (math.log(transport.t_max / (1 - transport.t_max)) - transport.mu) / transport.sigma
            u = u * normal.cdf(torch.tensor(b, dtype=torch.float64))
        u = u.clamp(1e-300, 1.0 - 1e-16)
        t = _scalar_sigmoid(transport.mu + transport.sigma * normal.icdf(u)).clamp(0.0, transport.t_max)
    return time_shift(t, shift).to(dtype=torch.float32)


# ----------------------------------------------------------------------------- checkpoint I/O


class CheckpointIO:
    """Save / resume the whole training state through one CheckpointManager.

    ddp / fsdp: the strategy's Statefuls (model, optimizer, LR schedule, EMA) go through DCP beside
    the loop's own entries. deepspeed: the engine writes its native sharded checkpoint to local
    staging, which is uploaded into the step folder before the manager writes the loop's entries and
    commits; on a different world size the native checkpoint is converted to DeepSpeed's universal
    format before loading.
    """

    def __init__(self, strategy, manager, extra: Mapping[str, Any]):
        self.strategy = strategy
        self.manager = manager
        self.extra = dict(extra)
        self.is_deepspeed = getattr(strategy, "kind", "") == "deepspeed"

    def _app_state(self) -> dict[str, Any]:
        if self.is_deepspeed:
            return dict(self.extra)
        return {**self.strategy.checkpoint_states(), **self.extra}

    def _staging(self, step: int) -> str:
        key = hashlib.sha1(self.manager.run_url.encode()).hexdigest()[:12]
        root = os.environ.get("RAE_SCALE_STAGING") or os.path.join(tempfile.gettempdir(), "rae_scale_staging")
        return os.path.join(root, key, f"step-{step:08d}")

    def save(self, step: int, metadata: Mapping[str, Any] | None = None, pin: bool = False) -> None:
        upload = None
        if self.is_deepspeed:
            from rae_scale.checkpoint.deepspeed_format import DEEPSPEED_FILES_KEY

            upload, records = self._save_deepspeed(step)
            metadata = {**(metadata or {}), DEEPSPEED_FILES_KEY: records}
        self.manager.save(step, self._app_state(), metadata=metadata, pin=pin, before_commit=upload)

    def _save_deepspeed(self, step: int):
        """Write the engine's native checkpoint to local staging; return the upload for the manager and
        the files' CRC-32 records (for metadata.json: the manager's own records cover only its files).

        The upload runs inside the manager's write, after it removed any crash leftovers of this
        step folder and before the commit vote, so the native files are covered by COMMITTED (a
        job killed before the commit leaves no checkpoint that lacks them).
        """
        import torch.distributed as dist

        from rae_scale.checkpoint import upload_dir
        from rae_scale.checkpoint.deepspeed_format import deepspeed_file_records

        # the previous async save must be finished: its commit happens on the main thread's next save
        self.manager.wait()
        staging = self._staging(step)
        self.strategy.save_native(staging, "native")
        if dist.is_initialized():
            dist.barrier()  # every rank of this node has written its partition to staging
        uploads = int(os.environ.get("LOCAL_RANK", "0")) == 0  # each node's local rank 0 uploads its node's files
        records = deepspeed_file_records(staging) if uploads else {}
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, records)
            records = {}
            for part in parts:
                for name, record in (part or {}).items():
                    records.setdefault(name, record)
        target = self.manager.step_url(step) + "/deepspeed"
        options = self.manager.storage_options
        uploaded = []

        def upload() -> None:
            # idempotent across write retries
            if uploaded or not uploads:
                return
            upload_dir(staging, target, storage_options=options)
            shutil.rmtree(staging, ignore_errors=True)
            uploaded.append(True)

        return upload, dict(sorted(records.items()))

    def resume(self, resume: str) -> str | None:
        step_dir = self.manager.resolve_resume(resume)
        if not step_dir:
            return None
        meta = self.manager.load(step_dir, self._app_state())
        step_dir = meta.get("step_dir", step_dir)
        if self.is_deepspeed:
            self._load_deepspeed(step_dir, meta)
        return step_dir

    def _load_deepspeed(self, step_dir: str, meta: Mapping[str, Any]) -> None:
        """Download the step's native DeepSpeed checkpoint, check it, convert it for another world size,
        load it.

        DeepSpeed and ds_to_universal unpickle these files without restriction, so the rank that
        downloads (each node's local rank 0) first checks them against the CRC-32 records of the commit
        and through safe_load's restricted unpickler; its verdict reaches every rank, so a refused file
        stops all of them with the same one-line error instead of leaving the others in a collective.
        """
        import torch.distributed as dist

        from rae_scale.checkpoint import convert_deepspeed_to_universal, download_dir, needs_universal
        from rae_scale.checkpoint.deepspeed_format import DEEPSPEED_FILES_KEY, verify_deepspeed_files
        from rae_scale.checkpoint.safe_load import validate_deepspeed_dir

        world = dist.get_world_size() if dist.is_initialized() else 1
        saved_world = int(meta.get("world_size", 1))
        local = self._staging(int(step_dir.rstrip("/").rsplit("-", 1)[-1])) + "-load"
        remote = step_dir.rstrip("/") + "/deepspeed"
        universal = needs_universal(saved_world, world)
        error: BaseException | None = None
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            try:
                shutil.rmtree(local, ignore_errors=True)
                download_dir(remote, local, storage_options=self.manager.storage_options)
                if not verify_deepspeed_files(local, meta.get(DEEPSPEED_FILES_KEY), step_dir.rstrip("/")):
                    log.warning("%s records no checksums of its DeepSpeed files (written before they were "
                                "recorded): loading them unverified", step_dir)
                validate_deepspeed_dir(local, shown_as=remote)
                if universal:
                    convert_deepspeed_to_universal(os.path.join(local, "native"), os.path.join(local, "universal"))
            except Exception as exc:
                shutil.rmtree(local, ignore_errors=True)
                error = exc
        self._raise_if_any_rank_failed(error, step_dir)
        self.strategy.load_native(local, "universal" if universal else "native", load_universal=universal)
        if universal:
            log.warning("DeepSpeed checkpoint written by %d ranks resumed on %d through the universal format",
                        saved_world, world)
        if dist.is_initialized():
            dist.barrier()
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            shutil.rmtree(local, ignore_errors=True)

    @staticmethod
    def _raise_if_any_rank_failed(error: BaseException | None, step_dir: str) -> None:
        """Every rank learns the first failure among the ranks (the all-gather is also the barrier after
        the download); the failing rank re-raises its own error, the others the same class and line."""
        import torch.distributed as dist

        from rae_scale.checkpoint import CheckpointCorruptError, CheckpointLoadError, UnsafeCheckpointError

        def summary(exc: BaseException) -> tuple[str, str]:
            kind = next((c.__name__ for c in (UnsafeCheckpointError, CheckpointCorruptError, CheckpointLoadError)
                         if isinstance(exc, c)), "")
            return kind, (str(exc).splitlines() or [type(exc).__name__])[0]

        mine = None if error is None else summary(error)
        failures = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            failures = [None] * dist.get_world_size()
            dist.all_gather_object(failures, mine)
        first = next(((rank, f) for rank, f in enumerate(failures) if f is not None), None)
        if first is None:
            return
        if error is not None:
            if isinstance(error, CheckpointLoadError):
                raise error from None
            raise error
        rank, (kind, line) = first
        classes = {c.__name__: c for c in (UnsafeCheckpointError, CheckpointCorruptError, CheckpointLoadError)}
        if kind:
            raise classes[kind](line) from None
        raise RuntimeError(f"rank {rank} could not prepare the DeepSpeed checkpoint of {step_dir}: {line}")

    def wait(self) -> None:
        self.manager.wait()


def strategy_checkpoint_io(strategy, manager, extra: Mapping[str, Any]) -> CheckpointIO:
    return CheckpointIO(strategy, manager, extra)


def as_numpy_seed(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


class LastLayerGrad:
    """Gradient norms w.r.t. a Linear layer's weight, from its recorded input and output.

    dL/dW = sum over positions of (dL/dout) (x)^T, so the norm needs only autograd.grad w.r.t. the
    layer's output: it works the same whether the layer sits in DDP, an FSDP2 shard (where the
    weight itself is a sharded DTensor outside the autograd graph) or a DeepSpeed engine.
    """

    def __init__(self, linear: torch.nn.Module):
        self._io = None
        linear.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if torch.is_grad_enabled():
            self._io = (inputs[0], output)

    def weight_grad(self, loss: torch.Tensor) -> torch.Tensor:
        """dL/dW of the rank's local loss, averaged over ranks: the gradient of the global-batch loss."""
        import torch.distributed as dist

        if self._io is None:
            raise RuntimeError("the last layer has not run forward with gradients enabled")
        x, out = self._io
        (g_out,) = torch.autograd.grad(loss, out, retain_graph=True)
        gw = torch.einsum("no,ni->oi", g_out.reshape(-1, g_out.shape[-1]).float(),
                          x.reshape(-1, x.shape[-1]).float())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(gw, op=dist.ReduceOp.SUM)
            gw /= dist.get_world_size()
        return gw

    def adaptive_weight(self, rec_loss: torch.Tensor, gan_loss: torch.Tensor, max_weight: float = 1e4,
                        eps: float = 1e-6) -> torch.Tensor:
        """VQGAN's lambda = ||dL_rec/dW|| / (||dL_gan/dW|| + eps), clamped to [0, max_weight], detached.

        Unlike upstream (each rank's local graph) the gradients are those of the global batch, so the
        weight, and the run, do not depend on the number of ranks.
        """
        w = self.weight_grad(rec_loss).norm() / (self.weight_grad(gan_loss).norm() + eps)
        return w.clamp(0.0, max_weight).detach()


class BatchStream:
    """An endless stream of micro-batches over epochs, with the loader's exact position as its state.

    Each batch is a dict: "image" or "latent", "label" and "index" (the samples' dataset ids, which
    seed the per-sample randomness of the loops).
    """

    def __init__(self, loader, key: str):
        self.loader = loader
        self.key = key
        self._it = None

    @classmethod
    def for_latents(cls, data, *, micro_batch: int, rank: int, world_size: int, seed: int) -> "BatchStream":
        from rae_scale.data.loader import build_latent_loader

        if not data.latents_url:
            raise ValueError("data.latents_url is empty: stage 2 reads cached latents by default; run "
                             "`rae-scale cache-latents` first or set data.source=images")
        loader = build_latent_loader(data.latents_url, batch_size=micro_batch, rank=rank, world_size=world_size,
                                     seed=seed, hflip=data.hflip, num_workers=data.num_workers,
                                     cache_dir=data.cache_dir, num_canonical_nodes=data.num_canonical_nodes,
                                     with_ids=True)
        return cls(loader, "latent")

    @classmethod
    def for_images(cls, data, *, micro_batch: int, rank: int, world_size: int, seed: int) -> "BatchStream":
        from rae_scale.data.loader import build_image_loader

        if not data.url:
            raise ValueError("data.url is empty: point it at shards made by `rae-scale prepare`")
        loader = build_image_loader(data.url, batch_size=micro_batch, rank=rank, world_size=world_size, seed=seed,
                                    hflip=data.hflip, num_workers=data.num_workers, cache_dir=data.cache_dir,
                                    format=data.format, num_canonical_nodes=data.num_canonical_nodes,
                                    with_ids=True)
        return cls(loader, "image")

    @property
    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def next_batch(self) -> dict:
        for _ in range(2):  # a fresh iterator once at an epoch boundary
            if self._it is None:
                self._it = iter(self.loader)
            try:
                x, y, ids = next(self._it)
                return {self.key: x, "label": y, "index": ids}
            except StopIteration:
                self._it = None
        raise RuntimeError("the data loader yields no batch: the dataset is smaller than one global batch "
                           "(lower training.global_batch_size or add data)")

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def drop_step_gradients(strategy) -> torch.Tensor:
    """Discard this step's gradients (a skipped non-finite step); returns NaN for the grad norm."""
    engine = getattr(strategy, "engine", None)
    if engine is not None:
        engine.zero_grad()
    else:
        strategy.optimizer.zero_grad(set_to_none=True)
    return torch.tensor(float("nan"))
