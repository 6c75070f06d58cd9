"""`rae-scale quickstart`: the whole pipeline on this machine, tiny, on real images.

digits (UCI, bundled) -> prepare (Ray) -> stage 1 (--nproc gloo ranks, 2 by default) -> stats
-> cache latents (Ray) -> stage 2 (--nproc ranks) -> class-conditional sampling + FID with the real
Inception weights; text-to-image on captioned colour digits (quickstart_t2i) -> a Markdown report
with grids, loss curves and metrics. Each step is skipped when
its output is complete, so re-running resumes where a previous run stopped. Every step calls its job
function (rae_scale.commands.jobs, data_pipeline), never the CLI.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rae_scale import config as C
from rae_scale.commands import quickstart_t2i as t2i
from rae_scale.commands.digit_probe import fit_logistic_regression

log = logging.getLogger("rae_scale.commands.quickstart")

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# (full, reduced) sizes; reduced is the CI mode.
STEPS = {"stage1": (200, 10), "stage2": (1200, 20)}
SAMPLES_PER_CLASS = (30, 2)  # 300 samples and 300 real digits through Inception: ~0.17 s an image here
NUM_CLASSES = 10
CFG_SCALE = 3.0  # classifier-free guidance of the report's samples
UNGUIDED_PER_CLASS = (20, 2)  # a smaller unguided set: how well the model alone learned the classes


def _train(stage: str, cfg, cfg_file: Path) -> None:
    """Train one stage on cfg.parallel.nproc local ranks (in this process for 1); fail loudly."""
    from rae_scale.commands.jobs import run_train_job

    code = run_train_job(stage, cfg, ["train", stage, str(cfg_file)])
    if code != 0:
        raise RuntimeError(f"training {stage} ({cfg_file}) exited with code {code}")


def _step(name: str, done: bool, timings: dict):
    """Context-free helper: logs and times a pipeline step unless its output already exists."""
    class _Timer:
        def __enter__(self):
            self.t0 = time.perf_counter()
            log.info("== %s%s", name, " (done already, skipped)" if done else "")
            return self

        def __exit__(self, *exc):
            if not done and exc[0] is None:
                timings[name] = round(time.perf_counter() - self.t0, 1)
    return _Timer()


def _stage_configs(out: Path, reduced: bool, nproc: int = 2) -> tuple[C.Stage1Job, C.Stage2Job]:
    i = 1 if reduced else 0
    enc = str(out / "encoder")
    # the decoder learns grey and colour digits (the text-to-image stage's), half and half
    s1 = C.load_config(C.Stage1Job, REPO_CONFIGS / "stage1/tiny_cpu.yaml", [
        f"run.dir={out / 'stage1'}", *t2i.stage1_sources(out), "data.build_if_missing=false",
        f"rae.encoder.pretrained={enc}", f"training.max_steps={STEPS['stage1'][i]}",
        f"logging.sample_every_steps={STEPS['stage1'][i]}", f"parallel.nproc={nproc}",
        f"checkpoint.every_steps={max(10, STEPS['stage1'][i] // 4)}"])
    s2 = C.load_config(C.Stage2Job, REPO_CONFIGS / "stage2/tiny_cpu.yaml", [
        f"run.dir={out / 'stage2'}", f"data.url={out / 'shards'}", f"data.latents_url={out / 'latents'}",
        "data.build_if_missing=false", f"rae.encoder.pretrained={enc}", f"rae.stats_path={out / 'latent_stats.safetensors'}",
        f"rae.decoder_checkpoint={out / 'stage1'}", f"training.max_steps={STEPS['stage2'][i]}",
        f"logging.sample_every_steps={STEPS['stage2'][i]}", f"parallel.nproc={nproc}",
        f"checkpoint.every_steps={max(10, STEPS['stage2'][i] // 4)}"])
    return s1, s2


def _finished(run_dir: Path, steps: int) -> bool:
    from rae_scale.checkpoint.layout import parse_step, resolve_step_folder

    try:
        return parse_step(resolve_step_folder(str(run_dir))) == steps
    except FileNotFoundError:
        return False


def _encoder_overrides(s1: C.Stage1Job, out: Path) -> list[str]:
    """The frozen encoder of the run, for the stats and latent-cache jobs."""
    enc = s1.rae.encoder
    return [f"rae.encoder.pretrained={out / 'encoder'}", f"rae.encoder.kind={enc.kind}",
            f"rae.encoder.input_size={enc.input_size}"]


def _eval_stamp(run_dir: Path, per_class: int, unguided_per_class: int) -> dict:
    """What the evaluation was made from: the stage-2 step folder, its commit marker, the sizes."""
    from rae_scale.checkpoint.layout import COMMIT_FILE, resolve_step_folder

    step_dir = resolve_step_folder(str(run_dir))
    commit = Path(step_dir.split("://", 1)[-1]) / COMMIT_FILE
    return {"step_dir": step_dir, "commit": commit.read_text() if commit.exists() else None,
            "per_class": per_class, "unguided_per_class": unguided_per_class}


def run_quickstart(out_dir: str = "quickstart_out", reduced: bool = False, nproc: int = 2) -> int:
    from data_pipeline.images import make_digits_folder
    from data_pipeline.prepare import run_prepare

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    if nproc < 1:
        raise C.ConfigError(f"quickstart --nproc must be at least 1, got {nproc}")
    s1, s2 = _stage_configs(out, reduced, nproc)
    i = 1 if reduced else 0
    # the Ray jobs below (prepare, statistics, cache latents) share one local Ray instance, started at the
    # first of them that has work to do and shut down after the last
    ray, ray_started = contextlib.ExitStack(), []

    def shared_ray() -> None:
        if not ray_started:
            from data_pipeline.ray_utils import ray_session

            ray.enter_context(ray_session())
            ray_started.append(True)

    # 1. a real image dataset: the UCI handwritten digits (bundled), upscaled, as class folders
    raw = out / "digits"
    with _step("digits dataset", raw.exists(), timings):
        if not raw.exists():
            counts = make_digits_folder(raw.with_suffix(".tmp"), size=64)
            raw.with_suffix(".tmp").rename(raw)
            log.info("%d images in %d classes at %s", sum(counts.values()), len(counts), raw)

    # 2. shards with the ADM center crop (Ray job)
    shards = out / "shards"
    with _step("prepare shards (Ray)", (shards / "manifest.json").exists(), timings):
        if not (shards / "manifest.json").exists():
            shared_ray()
            run_prepare(input=str(raw), output=str(shards), resolution=s1.rae.image_size, format="mds",
                        image_format="png")

    # 2b. the captioned colour digits for the text-to-image stage (stage 1 trains on both)
    with _step("prepare captioned digits", (t2i.t2i_shards(out) / "manifest.json").exists(), timings):
        t2i.prepare_captioned(out, s1.rae.image_size)

    # 3. the frozen encoder: a seeded random ViT saved in the Hugging Face layout (no downloads here)
    with _step("encoder", (out / "encoder").exists(), timings):
        if not (out / "encoder").exists():
            from rae_scale.builders import save_random_encoder

            save_random_encoder(C.EncoderConfig(**{**dataclasses.asdict(s1.rae.encoder), "pretrained": None}),
                                str(out / "encoder"), seed=0)

    # 4. stage 1: decoder with L1 + LPIPS + GAN on nproc ranks
    cfg1 = out / "stage1.yaml"
    cfg1.write_text(C.to_yaml(s1))
    with _step("stage 1 training", _finished(out / "stage1", s1.training.max_steps), timings):
        if not _finished(out / "stage1", s1.training.max_steps):
            _train("stage1", s1, cfg1)

    # 5. latent statistics over the images through the encoder (exact, float64)
    stats = out / "latent_stats.safetensors"
    with _step("latent statistics", stats.exists(), timings):
        if not stats.exists():
            from rae_scale.commands.jobs import run_stats_job

            shared_ray()
            run_stats_job(C.load_config(C.StatsJob, None, [
                f"input={shards}", "kind=images", f"output={stats}", *_encoder_overrides(s1, out)]))

    # 6. latent cache (Ray job)
    latents = out / "latents"
    with _step("cache latents (Ray)", (latents / "latents.json").exists(), timings):
        if not (latents / "latents.json").exists():
            from rae_scale.commands.jobs import run_cache_latents_job

            shared_ray()
            run_cache_latents_job(C.load_config(C.CacheLatentsJob, None, [
                f"input={shards}", f"output={latents}", *_encoder_overrides(s1, out)]))
    ray.close()  # the last Ray job is done

    # 7. stage 2: DiT-DH on the latents on nproc ranks
    cfg2 = out / "stage2.yaml"
    cfg2.write_text(C.to_yaml(s2))
    with _step("stage 2 training", _finished(out / "stage2", s2.training.max_steps), timings):
        if not _finished(out / "stage2", s2.training.max_steps):
            _train("stage2", s2, cfg2)

    # 8. sampling + FID (real TF-2015 Inception weights) against the prepared real images
    per_class = SAMPLES_PER_CLASS[i]
    eval_dir = out / "eval"
    results, unguided = eval_dir / "results.json", eval_dir / "unguided.npz"
    # results count as done only for this stage-2 checkpoint and these sizes (a full run after a
    # --reduced one retrains stage 2: the reduced run's numbers must not be reported as its own)
    stamp, made_for = eval_dir / "made_for.json", _eval_stamp(out / "stage2", per_class, UNGUIDED_PER_CLASS[i])
    current = results.exists() and unguided.exists() and stamp.exists() and json.loads(stamp.read_text()) == made_for
    with _step("sampling + FID", current, timings):
        if not current:
            if eval_dir.exists():
                shutil.rmtree(eval_dir)
            _evaluate(s2, out, eval_dir, per_class, UNGUIDED_PER_CLASS[i])
            stamp.write_text(json.dumps(made_for))

    # 9. text-to-image: captioned latents, the text-conditioned DiT-DH-IG, one sample per prompt
    s2t = t2i.stage2_t2i_config(out, s1, reduced, nproc)
    with _step("text-to-image latents and text encoder", (out / "latents_t2i" / "latents.json").exists()
               and Path(s2t.rae.stats_path).exists() and Path(s2t.text_encoder.pretrained).exists(), timings):
        t2i.cache_t2i(s2t, out)
    cfg2t = out / "stage2_t2i.yaml"
    cfg2t.write_text(C.to_yaml(s2t))
    with _step("text-to-image stage 2 training", _finished(out / "stage2_t2i", s2t.training.max_steps), timings):
        if not _finished(out / "stage2_t2i", s2t.training.max_steps):
            _train("stage2", s2t, cfg2t)
    t2i_npz, t2i_stamp = out / "eval_t2i" / "samples.npz", out / "eval_t2i" / "made_for.json"
    t2i_made_for = _eval_stamp(out / "stage2_t2i", t2i.PROMPT_SAMPLES[i], 0)
    t2i_current = t2i_npz.exists() and t2i_stamp.exists() and json.loads(t2i_stamp.read_text()) == t2i_made_for
    with _step("text-to-image sampling", t2i_current, timings):
        if not t2i_current:
            t2i.sample_prompts(s2t, out, reduced)
            t2i_stamp.write_text(json.dumps(t2i_made_for))

    # 10. recognisability and the report
    metrics = json.loads(results.read_text())["metrics"]
    metrics["text_to_image"] = t2i.prompt_accuracy(t2i_npz, out)
    metrics["class_accuracy"] = _class_accuracy(eval_dir / "samples.npz", unguided, shards)
    metrics["reconstruction_psnr"] = _recon_psnr(s2, shards)
    timings["total"] = round(time.perf_counter() - t_start, 1)
    report = _write_report(out, metrics, timings, s1, s2, per_class, s2t)
    log.info("quickstart finished in %.0f s; report at %s", timings["total"], report)
    print(json.dumps({"report": str(report), **{k: metrics[k] for k in metrics if not isinstance(metrics[k], dict)}},
                     default=float))
    return 0


def _sample_job(s2: C.Stage2Job, out: Path, cfg_scale: float = CFG_SCALE) -> C.SampleJob:
    guidance = C.GuidanceConfig(method="cfg", scale=cfg_scale) if cfg_scale != 1.0 else C.GuidanceConfig(method="none")
    return C.from_generator(C.SampleJob, s2, dit=dataclasses.replace(s2.dit, checkpoint=None), guidance=guidance,
                            checkpoint=str(out / "stage2"), seed=0, batch_size=50, output=str(out / "eval"))


def _evaluate(s2: C.Stage2Job, out: Path, eval_dir: Path, per_class: int, unguided_per_class: int) -> None:
    from rae_scale.eval.features import evaluate_generator
    from rae_scale.commands.generate import load_rae_for_decoding, load_stage2, save_grid_and_files
    from rae_scale.diffusion.sample_fn import make_sample_fn

    job = _sample_job(s2, out)
    device = torch.device("cpu")
    # reference: as many real digits per class as samples, written as a sample npz (arr_0 uint8 NHWC)
    x, y = _real_digits(out / "shards")
    pick = np.concatenate([np.where(y == c)[0][:per_class] for c in range(NUM_CLASSES)])
    eval_dir.mkdir(parents=True, exist_ok=True)
    reference = eval_dir / "reference_real.npz"
    np.savez(reference, arr_0=(x[pick].transpose(0, 2, 3, 1) * 255).round().astype(np.uint8), arr_1=y[pick])
    model = load_stage2(job, device)
    rae = load_rae_for_decoding(job.rae, device)
    sample_fn = make_sample_fn(job, model, rae, device)
    evaluate_generator(sample_fn, num_samples=per_class * NUM_CLASSES, batch_size=50, label_sampling="equal",
                       num_classes=NUM_CLASSES, seed=0, progress_dir=str(eval_dir / "progress"),
                       save_npz=str(eval_dir / "samples.npz"), reference=str(reference),
                       results_path=str(eval_dir / "results.json"),
                       metadata={"checkpoint": job.checkpoint, "sampler": dataclasses.asdict(job.sampler),
                                 "guidance": dataclasses.asdict(job.guidance)})
    with np.load(eval_dir / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    # a grid: one row per class
    order = np.concatenate([np.where(labels == c)[0][:10] for c in range(NUM_CLASSES)])
    save_grid_and_files(torch.from_numpy(images[order]).permute(0, 3, 1, 2), labels[order].tolist(),
                        str(eval_dir / "grid"), name="samples_grid.png")
    # the same model and decoder without guidance: how well the model alone learned the classes
    unguided_fn = make_sample_fn(_sample_job(s2, out, cfg_scale=1.0), model, rae, device)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(unguided_per_class)
    images = torch.cat([unguided_fn(labels[k:k + 50], torch.arange(k, min(k + 50, len(labels))))
                        for k in range(0, len(labels), 50)])
    np.savez(eval_dir / "unguided.npz", arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=labels.numpy())


def _real_digits(shards: Path) -> tuple[np.ndarray, np.ndarray]:
    from rae_scale.data.loader import build_image_loader

    loader = build_image_loader(str(shards), batch_size=100, shuffle=False, hflip=False, drop_last=False)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.numpy())
        ys.append(y.numpy())
        if sum(len(v) for v in ys) >= 1797:
            break
    return np.concatenate(xs), np.concatenate(ys)


def _features(images_nchw01: np.ndarray) -> np.ndarray:
    """8x8 grayscale, as the digits were made: what the classifier sees."""
    t = torch.from_numpy(images_nchw01).float().mean(dim=1, keepdim=True)
    return torch.nn.functional.adaptive_avg_pool2d(t, 8).flatten(1).numpy()


def _class_accuracy(samples_npz: Path, unguided_npz: Path, shards: Path) -> dict:
    """How recognisable the samples are: a classifier trained on the real digits labels the samples.

    Logistic regression on 8x8 grayscale versions of the real images, fit on 80% of them; its
    accuracy on the held-out 20% is the ceiling, chance is 10%. Scored on the report's (guided)
    samples and on a set sampled without guidance.
    """
    x, y = _real_digits(shards)
    feats = _features(x)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    cut = int(0.8 * len(y))
    predict = fit_logistic_regression(feats[perm[:cut]], y[perm[:cut]])
    held_out = float((predict(feats[perm[cut:]]) == y[perm[cut:]]).mean())

    def score(npz: Path) -> float:  # ADM-format samples: arr_0 uint8 NHWC, arr_1 labels
        with np.load(npz) as f:
            return float((predict(_features(f["arr_0"].transpose(0, 3, 1, 2) / 255.0)) == f["arr_1"]).mean())

    return {"samples": score(samples_npz), "cfg_scale": CFG_SCALE, "samples_unguided": score(unguided_npz),
            "real_held_out": held_out, "chance": 1.0 / NUM_CLASSES}


def _recon_psnr(s2: C.Stage2Job, shards: Path) -> float:
    from rae_scale.eval.metrics import psnr
    from rae_scale.commands.generate import load_rae_for_decoding

    rae = load_rae_for_decoding(s2.rae, "cpu", with_encoder=True)
    x, _ = _real_digits(shards)
    x = torch.from_numpy(x[:200])
    with torch.no_grad():
        recon = rae.decode(rae.encode(x).latent).sample.clamp(0, 1)
    _recon_grid_png(x[:10], recon[:10], shards.parent / "report" / "reconstructions.png")
    return float(psnr(x, recon, data_range=1.0).mean())


def _recon_grid_png(x, recon, path: Path) -> None:
    from rae_scale.train.image_grid import save_image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(torch.cat([x, recon]), str(path), nrow=len(x))


def _loss_plot(run_dir: Path, keys: list[str], path: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import math

    from rae_scale.train.metrics import read_metrics

    rows = read_metrics(str(run_dir))
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:  # a non-finite loss has no point on the curve
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _write_report(out: Path, metrics: dict, timings: dict, s1, s2, per_class: int, s2t) -> Path:
    from rae_scale.train.fid_curve import FID_PLOT

    rep = out / "report"
    rep.mkdir(exist_ok=True)
    _loss_plot(out / "stage1", ["loss", "loss_l1", "loss_lpips"], rep / "loss_stage1.png", "stage 1 (decoder)")
    _loss_plot(out / "stage2", ["loss", "loss_avg"], rep / "loss_stage2.png", "stage 2 (DiT-DH flow matching)")
    _loss_plot(out / "stage2_t2i", ["loss", "loss_avg", "loss_base"], rep / "loss_stage2_t2i.png",
               "text-to-image stage 2 (DiT-DH-IG, x-prediction)")
    shutil.copy(out / "eval" / "grid" / "samples_grid.png", rep / "samples_grid.png")
    fid_curve = []  # stage 2 with online FID (eval.every_steps > 0) left FID against epochs in its run folder
    if (out / "stage2" / FID_PLOT).exists():
        shutil.copy(out / "stage2" / FID_PLOT, rep / FID_PLOT)
        fid_curve = ["## Online FID against epochs (stage 2)", "", f"![online FID]({FID_PLOT})", ""]
    shutil.copy(out / "eval_t2i" / "prompt_grid.png", rep / "prompt_grid.png")
    acc = metrics["class_accuracy"]
    lines = [
        "# rae_scale quickstart report", "",
        f"Pipeline: digits -> prepare (Ray) -> stage 1 ({s1.training.max_steps} steps, {s1.parallel.nproc} ranks, "
        f"grey and captioned colour digits) -> stats -> cache latents (Ray) -> stage 2 ({s2.training.max_steps} "
        f"steps, {s2.parallel.nproc} ranks) -> {per_class * NUM_CLASSES} samples -> FID; and text-to-image on the "
        "colour digits (below).", "",
        "## Metrics", "",
        "| metric | value |", "| --- | --- |",
        f"| FID ({metrics.get('num_samples')} samples vs as many real digits, TF-2015 Inception) "
        f"| {metrics.get('fid', float('nan')):.2f} |",
        f"| sFID | {metrics.get('sfid', float('nan')):.2f} |",
        f"| Inception score | {metrics.get('inception_score', float('nan')):.3f} |"
        if isinstance(metrics.get("inception_score"), float) else "| Inception score | n/a |",
        f"| reconstruction PSNR (stage-1 EMA decoder, 200 real images) | {metrics['reconstruction_psnr']:.2f} dB |",
        f"| samples classified as their class (CFG {acc['cfg_scale']:g}) | {acc['samples']:.1%} "
        f"(chance {acc['chance']:.0%}) |",
        f"| the same without guidance | {acc['samples_unguided']:.1%} |",
        f"| same classifier on held-out real digits | {acc['real_held_out']:.1%} |", "",
        "How recognisability is measured: a logistic-regression classifier is fit on 8x8 grayscale versions of "
        "80% of the real digits and scores the class-conditional samples against the class they were asked "
        "for; its accuracy on the other 20% of the real digits is the ceiling.", "",
        f"## Samples (one row per class, EMA weights, Euler ODE, CFG {acc['cfg_scale']:g})", "",
        "![samples](samples_grid.png)", "",
        "## Reconstructions (top: real, bottom: stage-1 EMA decoder)", "", "![recon](reconstructions.png)", "",
        *t2i.report_lines(metrics["text_to_image"], s2t),
        "## Loss curves", "", "![stage 1](loss_stage1.png)", "", "![stage 2](loss_stage2.png)", "",
        "![text-to-image stage 2](loss_stage2_t2i.png)", "", *fid_curve,
        "## Timings (s)", "", "| step | seconds |", "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in timings.items()], "",
        f"Outputs: shards {out / 'shards'}, runs {out / 'stage1'} and {out / 'stage2'}, samples "
        f"{out / 'eval' / 'samples.npz'} (ADM format: arr_0 uint8 NHWC, arr_1 labels).",
    ]
    path = rep / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (rep / "metrics.json").write_text(json.dumps({"metrics": metrics, "timings": timings}, indent=1, default=float))
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_quickstart())
