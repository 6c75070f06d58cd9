"""Does the tiny RAEv2 recipe learn, and does internal guidance help? (issue 16's quality check)

Trains configs/stage2/raev2_tiny_cpu.yaml (DiT-DH-IG, x-prediction, gmuon) for --steps steps on the
digits latents through the real CLI, then:
- loss: the mean of the first 10 logged steps against the mean of the last 10 (ratio < 1: it learns);
- recognisability: a logistic-regression digit classifier fit on 80% of the real (normalised) latents
  labels samples drawn from the EMA with RAEv2's sampler, unguided and with IG (the config's
  ig_scale on [ig_t_min, ig_t_max]), the same seeds and labels for both. The classifier works in
  the RAE latent space, where the model samples: the tiny config has no trained decoder, and a
  random one would make pixel-space scores meaningless. Its accuracy on the held-out 20% of the real
  latents is the ceiling; chance is 10%.

    PYTHONPATH=. .venv/bin/python benchmarks/raev2_tiny_quality.py [--steps 300 --per-class 20 --out DIR] [k=v ...]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/stage2/raev2_tiny_cpu.yaml"


def train(out: Path, steps: int, extra: list[str]) -> list[str]:
    data = out / "data"
    overrides = [*extra, f"run.dir={out / 'run'}", f"training.max_steps={steps}", "logging.every_steps=1",
                 f"logging.sample_every_steps={steps}", f"checkpoint.every_steps={steps}",
                 f"data.url={data / 'shards'}", f"data.latents_url={data / 'latents'}",
                 f"rae.encoder.pretrained={data / 'encoder'}", f"rae.stats_path={data / 'stats.safetensors'}"]
    proc = subprocess.run([sys.executable, "-m", "rae_scale.commands.cli", "train", "stage2", str(CONFIG),
                           *overrides], cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode})")
    return overrides


def real_latents(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Every cached latent (one flip each) in the normalised space the model learns, with its label."""
    from rae_scale.builders import latent_normalizer
    from rae_scale.data import build_latent_loader

    normalize = latent_normalizer(cfg.rae)
    loader = build_latent_loader(cfg.data.latents_url, batch_size=100, shuffle=False, hflip=False, drop_last=False)
    zs, ys = [], []
    for z, y in loader:
        zs.append(normalize(z.float()))
        ys.append(y)
    return torch.cat(zs), torch.cat(ys)


def features(z: torch.Tensor) -> np.ndarray:
    return z.flatten(1).double().numpy()


def main() -> None:
    from rae_scale import config as C
    from rae_scale.commands.generate import load_stage2
    from rae_scale.commands.digit_probe import fit_logistic_regression as _fit_logistic_regression
    from rae_scale.diffusion.sample_fn import sample_latents, sampling_velocity
    from rae_scale.diffusion.sampling import per_sample_noise
    from rae_scale.diffusion.transport import Transport
    from rae_scale.train.metrics import read_metrics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optimizer.lr=3e-3")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="raev2_quality_"))
    overrides = train(out, args.steps, args.overrides)
    cfg = C.load_config(C.Stage2Job, CONFIG, overrides)

    losses = [r["loss"] for r in read_metrics(str(out / "run")) if "loss" in r]
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))

    z, y = real_latents(cfg)
    perm = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    predict = _fit_logistic_regression(features(z[perm[:cut]]), y[perm[:cut]].numpy())
    held_out = float((predict(features(z[perm[cut:]])) == y[perm[cut:]].numpy()).mean())

    job = C.from_generator(C.SampleJob, cfg, checkpoint=str(out / "run"), seed=0)
    model = load_stage2(job, "cpu")
    shape = (cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size)
    shift = Transport.from_config(job.transport).shift_for(shape)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    seeds = list(range(len(labels)))
    scores = {}
    for method in ("none", "ig"):
        job.guidance.method = method
        with torch.no_grad():
            velocity = sampling_velocity(job, model, labels)
            samples = sample_latents(job, velocity, per_sample_noise((len(labels), *shape), seeds), shift=shift,
                                     seeds=seeds)
        scores[method] = float((predict(features(samples)) == labels.numpy()).mean())

    g = cfg.guidance
    print(f"raev2 tiny, {args.steps} steps {' '.join(args.overrides)}: loss first 10 steps {first:.4f}, last 10 {last:.4f}, "
          f"ratio {last / first:.3f}")
    print(f"latent classifier: real held-out {held_out:.1%}, unguided samples {scores['none']:.1%}, "
          f"IG {g.ig_scale:g} on [{g.ig_t_min:g}, {g.ig_t_max:g}] {scores['ig']:.1%}, chance 10.0% "
          f"({len(labels)} samples each, same seeds); outputs under {out}")


if __name__ == "__main__":
    main()
