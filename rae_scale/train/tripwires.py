"""Tripwires: cheap checks early in a stage-2 run that it is learning, not silently failing.

Upstream RAE users trained 200 epochs into pure noise (gFID about 400) before anyone looked. Three
checks catch such a run within its first evaluation (settings: the `tripwire` section):

- loss_vs_zero, at the steps `tripwire.loss_steps`: the window-mean training loss must be below
  `max_loss_ratio` times the loss of predicting zero on the same kind of batch (for velocity
  prediction E||eps - z||^2; for x-prediction the velocity-space loss of x_hat = 0). A network whose
  output never moved from its zero initialisation (learning rate 0, frozen weights) scores exactly 1.
- samples_vs_noise, at the first online evaluation: where the samples' FID lies between two FIDs of
  as many images, decoded by the same decoder and featurised the same way: the data's own first latents
  (the floor: what a perfect generator reaches through this decoder at this sample count) and
  Gaussian-noise latents (the sampler's own starting noise, same seeds). (fid - floor) / (noise - floor)
  must be below `max_fid_ratio`. Without the floor, small-sample bias and a blurry decoder dominate
  both FIDs: on the quickstart's healthy 32-px digits (200 samples) the plain ratio is 0.96, the
  normalised one 0.56; a network that never moved its noise scores exactly 1. The floor needs data
  readable by index (a latent cache, MDS image shards) with at least eval.num_samples samples; without
  one the check falls back to the plain ratio and says so.
- class_separation, same evaluation: the F-ratio of the samples' Inception pool features,
  (sum_c n_c ||mu_c - mu||^2 / (C - 1)) / (sum_i ||x_i - mu_{c_i}||^2 / (N - C)), must reach
  `min_class_separation`. When samples do not depend on their class both parts estimate the trace of
  the feature covariance, so the ratio is about 1; classes that shape the samples push it above.

A failed check logs one WARNING naming the check and its numbers; every result becomes
`tripwire_*` columns of metrics.jsonl. training.on_tripwire=stop also saves and ends the run with
EXIT_CODE_TRIPWIRE (not the preemption code: a launcher must not requeue it); off runs no check.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger(__name__)

EXIT_CODE_TRIPWIRE = 3  # a run stopped by a failed tripwire (training.on_tripwire=stop)
SAMPLES_CHECKED = "tripwire_samples_step"  # TrainState.extra key: the sample checks ran (once per run)


@dataclass
class TripwireResult:
    """One check's verdict: `value` against `limit` (`below`: value must be < limit, else >= limit)."""

    check: str
    value: float
    limit: float
    below: bool
    detail: str  # the numbers behind value, for the warning
    inputs: dict = field(default_factory=dict)  # the numbers behind value, as metrics columns

    @property
    def passed(self) -> bool:
        return self.value < self.limit if self.below else self.value >= self.limit

    def columns(self) -> dict:
        return {f"tripwire_{self.check}": self.value, f"tripwire_{self.check}_passed": self.passed,
                **{f"tripwire_{self.check}_{k}": v for k, v in self.inputs.items()}}

    def message(self, step: int) -> str:
        relation = "must be below" if self.below else "must reach"
        return (f"tripwire {self.check} failed at step {step}: {self.value:.4g} {relation} {self.limit:.4g} "
                f"({self.detail})")


# ----------------------------------------------------------------------------- the checks


def check_loss(loss: float, zero_loss: float, max_ratio: float) -> TripwireResult:
    """loss / zero_loss must be below max_ratio (a loss no better than predicting zero trips)."""
    ratio = float(loss) / float(zero_loss) if zero_loss > 0 else float("inf")
    return TripwireResult("loss_vs_zero", ratio, max_ratio, True,
                          f"window-mean loss {float(loss):.4g}, loss of predicting zero {float(zero_loss):.4g}")


def check_samples_vs_noise(fid: float, noise_fid: float, floor_fid: float, max_ratio: float) -> TripwireResult | None:
    """(fid - floor_fid) / (noise_fid - floor_fid) must be below max_ratio: samples that close no more of
    the gap between decoded data and decoded noise than max_ratio trip. None when the decoder makes the
    data's own latents look no closer to the reference than noise (floor_fid >= noise_fid): then FID
    cannot tell samples from noise through it, and the check has nothing to say."""
    fid, noise_fid, floor_fid = float(fid), float(noise_fid), float(floor_fid)
    if not noise_fid > floor_fid:
        return None
    return TripwireResult("samples_vs_noise", (fid - floor_fid) / (noise_fid - floor_fid), max_ratio, True,
                          f"FID of the samples {fid:.4g}, of decoded Gaussian noise {noise_fid:.4g}, of the data's "
                          f"own latents decoded {floor_fid:.4g}: the share of the data-to-noise gap left",
                          {"fid": fid, "noise_fid": noise_fid, "floor_fid": floor_fid})


def class_separation(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class over within-class mean square of features [N, D] with labels [N] (about 1 when
    the features do not depend on the label; see the module docstring). Needs 2+ classes and N > C."""
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"class_separation needs features [N, D] and labels [N]; got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    x = features.double()
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n, c = x.shape[0], len(classes)
    if c < 2 or n <= c:
        raise ValueError(f"class_separation needs samples of 2 or more classes and more samples than classes; "
                         f"got {n} samples of {c} class(es)")
    means = torch.zeros(c, x.shape[1], dtype=x.dtype).index_add_(0, inverse, x) / counts[:, None]
    between = (counts * (means - x.mean(0)).pow(2).sum(1)).sum() / (c - 1)
    within = (x - means[inverse]).pow(2).sum() / (n - c)
    return float(between / within) if within > 0 else float("inf") if between > 0 else 1.0


def check_class_separation(features: torch.Tensor, labels: torch.Tensor, min_separation: float) -> TripwireResult:
    """The samples' class separation (class_separation) must reach min_separation."""
    value = class_separation(features, labels)
    return TripwireResult("class_separation", value, min_separation, False,
                          f"between-class / within-class variance of the samples' Inception features over "
                          f"{len(labels)} samples of {len(torch.unique(labels))} classes; about 1 when samples "
                          f"ignore their class")


# ----------------------------------------------------------------------------- what the checks need


@torch.no_grad()
def zero_prediction_loss(transport, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, *, two_heads: bool,
                         device: torch.device, repa_target: torch.Tensor | None = None,
                         repa_coeff: float = 0.0) -> float:
    """The transport's loss of a network that predicts zero, averaged over these samples of every rank
    (collective). two_heads: the network also has an internal-guidance base head (both predict zero);
    repa_target: the run trains the REPA term too (the projector predicts zero: the loss compares like
    with like)."""
    from rae_scale.train.metrics import global_sums

    def zeros(x_t, t):
        out = torch.zeros_like(x_t)
        out = (out, out) if two_heads else out
        return out if repa_target is None else (out, torch.zeros_like(repa_target))

    per_sample = transport.loss_parts(zeros, z.float(), t, eps, repa_target, repa_coeff).total
    total, count = global_sums([per_sample.double().sum(), float(per_sample.numel())], device)
    return total / count


def noise_sample_fn(rae, latent_shape, device):
    """sample_fn(labels, seeds) -> uint8 images of the sampler's starting noise (per-sample seeds, as
    make_sample_fn draws it) decoded as make_sample_fn decodes a sample: what a network that never
    moved the noise would produce."""
    from rae_scale.diffusion.sampling import per_sample_noise

    @torch.no_grad()
    def sample_fn(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        z = per_sample_noise((len(labels), *latent_shape), [int(s) for s in seeds], device=device)
        return (rae.decode(z).sample.float().clamp(0, 1) * 255).to(torch.uint8)

    return sample_fn


def data_sample_fn(rae, item: Callable[[int], torch.Tensor], to_latent, num_samples: int, seed: int, device):
    """sample_fn(labels, seeds) -> uint8 images of the data's own first num_samples items (`item(i)`: a latent
    or an image; `to_latent` makes a batch of them normalised latents) decoded as make_sample_fn decodes a
    sample: the samples_vs_noise floor. Sample i of the evaluation (seeded by index_seed(seed, i)) is item i."""
    from rae_scale.eval.features import sample_seeds

    index_of = {s: i for i, s in enumerate(sample_seeds(seed, torch.arange(num_samples)).tolist())}

    @torch.no_grad()
    def sample_fn(labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        z = to_latent(torch.stack([item(index_of[int(s)]) for s in seeds]).to(device).float())
        return (rae.decode(z).sample.float().clamp(0, 1) * 255).to(torch.uint8)

    return sample_fn


# ----------------------------------------------------------------------------- the run's tripwires


class Tripwires:
    """A stage-2 run's tripwires: when each check is due, its verdicts as metrics columns, the warning,
    and whether the run must stop (training.on_tripwire=stop). Every rank holds one and sees the same
    numbers (the checks' inputs are global), so every rank decides alike."""

    def __init__(self, cfg, policy: str, state, rank: int):
        """cfg: the job's `tripwire` section; policy: warn | stop | off; state: the TrainState (its extra
        records that the sample checks ran, so a resumed run does not repeat them)."""
        if policy not in ("warn", "stop", "off"):
            raise ValueError(f"training.on_tripwire must be warn, stop or off; got {policy!r}")
        self.cfg, self.policy, self.state, self.rank = cfg, policy, state, rank
        self.stop_reason: str | None = None
        self._row: dict = {}

    def loss_due(self, step: int) -> bool:
        return self.policy != "off" and step in self.cfg.loss_steps

    def samples_due(self) -> bool:
        return self.policy != "off" and SAMPLES_CHECKED not in self.state.extra

    def samples_checked(self, step: int) -> None:
        """The sample checks ran (or could not) at `step`: not again in this run, nor after a resume."""
        self.state.extra[SAMPLES_CHECKED] = int(step)

    def record(self, results: list[TripwireResult], step: int) -> dict:
        """Log the failed checks, remember the stop, and return (and keep for pop_row) their columns."""
        columns = {}
        for result in results:
            columns.update(result.columns())
            if result.passed:
                continue
            if self.rank == 0:
                log.warning("%s; %s", result.message(step),
                            "stopping the run (training.on_tripwire=stop)" if self.policy == "stop"
                            else "the run goes on (training.on_tripwire=warn; stop ends it, off skips the checks)")
            if self.policy == "stop" and self.stop_reason is None:
                self.stop_reason = result.message(step)
        self._row.update(columns)
        return columns

    def loss_check(self, step: int, loss: float, zero_loss: float) -> TripwireResult:
        """The loss check at `step` (a loss_due step) with the window-mean loss and zero_prediction_loss."""
        result = check_loss(loss, zero_loss, self.cfg.max_loss_ratio)
        self.record([result], step)
        return result

    def has_row(self) -> bool:
        return bool(self._row)

    def pop_row(self) -> dict:
        """The columns recorded since the last metrics row (the run merges them into the next one)."""
        row, self._row = self._row, {}
        return row
