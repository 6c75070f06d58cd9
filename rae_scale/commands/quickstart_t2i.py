"""The quickstart's text-to-image stage: colour digits captioned "a green seven on a dark background".

captioned webdataset tars -> prepare (in this process; before stage 1, whose decoder then learns both grey and colour
digits from a two-source mixture) -> a seeded random tiny Qwen3 (one token per caption word) -> latent
statistics and a latent cache that carries the captions -> text-conditioned DiT-DH-IG (stage 2 on nproc
ranks) -> one sample per (digit, colour) prompt with CFG -> how often an independent digit classifier
reads the digit the prompt names, and how often the dominant hue is the colour it names.
"""
from __future__ import annotations

import colorsys
import json
import logging
from pathlib import Path

import numpy as np
import torch

from rae_scale import config as C

log = logging.getLogger("rae_scale.commands.quickstart")

T2I_STEPS = (2400, 20)  # (full, reduced) stage-2 steps: the digit needs about 2400 (configs/stage2/tiny_t2i_cpu.yaml)
T2I_CFG_SCALE = 4.0  # RAEv2's text recipe guides with 6; the tiny model saturates earlier
PROMPT_SAMPLES = (2, 1)  # samples per (digit, colour) prompt: 120 / 60 images


def t2i_shards(out: Path) -> Path:
    return out / "shards_t2i"


def prepare_captioned(out: Path, resolution: int) -> None:
    """The captioned colour digits as MDS shards (the real `prepare` of webdataset tars)."""
    from data_pipeline.tiny_captions import build_captioned_digits

    if not (t2i_shards(out) / "manifest.json").exists():  # 8 tars: in this process, no Ray start-up
        build_captioned_digits(str(t2i_shards(out)), root=out, resolution=resolution, num_workers=0)


def stage1_sources(out: Path) -> list[str]:
    """Overrides that train the quickstart's decoder on grey and colour digits, half and half."""
    sources = [{"name": "digits", "url": str(out / "shards"), "weight": 1.0},
               {"name": "digits_t2i", "url": str(t2i_shards(out)), "weight": 1.0}]
    return ["data.url=", f"data.sources={json.dumps(sources)}"]


def stage2_t2i_config(out: Path, s1: C.Stage1Job, reduced: bool, nproc: int) -> C.Stage2Job:
    i = 1 if reduced else 0
    steps = T2I_STEPS[i]
    enc = s1.rae.encoder
    return C.load_config(C.Stage2Job, Path(__file__).resolve().parents[2] / "configs/stage2/tiny_t2i_cpu.yaml", [
        f"run.dir={out / 'stage2_t2i'}", f"data.url={t2i_shards(out)}", f"data.latents_url={out / 'latents_t2i'}",
        "data.build_if_missing=false", f"rae.encoder.pretrained={out / 'encoder'}", f"rae.encoder.kind={enc.kind}",
        f"rae.stats_path={out / 'latent_stats_t2i.safetensors'}", f"rae.decoder_checkpoint={out / 'stage1'}",
        f"text_encoder.pretrained={out / 'qwen3'}", f"training.max_steps={steps}",
        f"logging.sample_every_steps={steps}", f"parallel.nproc={nproc}",
        f"checkpoint.every_steps={max(10, steps // 4)}"])


def cache_t2i(s2: C.Stage2Job, out: Path) -> None:
    """The random text encoder, the latent statistics and the captioned latent cache of the colour digits."""
    from data_pipeline.tiny_captions import ensure_random_text_encoder

    from data_pipeline.stats import run_stats
    from rae_scale.commands.jobs import run_cache_latents_job

    ensure_random_text_encoder(s2.text_encoder)
    enc = [f"rae.encoder.pretrained={s2.rae.encoder.pretrained}", f"rae.encoder.kind={s2.rae.encoder.kind}",
           f"rae.encoder.input_size={s2.rae.encoder.input_size}"]
    if not (Path(s2.data.latents_url) / "latents.json").exists():  # 8 shards: in this process, no Ray
        run_cache_latents_job(C.load_config(C.CacheLatentsJob, None, [
            f"input={s2.data.url}", f"output={s2.data.latents_url}", "num_workers=0", *enc]))
    if not Path(s2.rae.stats_path).exists():
        run_stats(input=s2.data.latents_url, kind="latents", num_workers=0, output_path=s2.rae.stats_path)


def prompts() -> list[tuple[int, str, str]]:
    """(digit, colour, prompt) for every digit and colour of the captions."""
    from data_pipeline.tiny_captions import COLOURS, caption

    return [(d, c, caption(d, c)) for d in range(10) for c in COLOURS]


def sample_prompts(s2: C.Stage2Job, out: Path, reduced: bool) -> Path:
    """PROMPT_SAMPLES EMA samples per prompt with CFG, as an npz (arr_0 uint8 NHWC, arr_1 digit, arr_2
    colour index), and the captioned grid of one sample per prompt."""
    from rae_scale.commands.generate import load_rae_for_decoding, load_stage2, load_text_encoder_for, save_prompt_grid
    from rae_scale.diffusion.sample_fn import make_sample_fn

    from data_pipeline.tiny_captions import COLOURS

    per = PROMPT_SAMPLES[1 if reduced else 0]
    job = C.from_generator(C.SampleJob, s2, guidance=C.GuidanceConfig(method="cfg", scale=T2I_CFG_SCALE),
                           checkpoint=str(out / "stage2_t2i"), seed=0)
    device = torch.device("cpu")
    text_encoder = load_text_encoder_for(job, device)
    fn = make_sample_fn(job, load_stage2(job, device), load_rae_for_decoding(job.rae, device), device,
                        text_encoder=text_encoder)
    rows = [p for p in prompts() for _ in range(per)]
    texts = [p[2] for p in rows]
    images = torch.cat([fn(texts[k:k + 60], torch.arange(k, min(k + 60, len(texts)))) for k in range(0, len(texts), 60)])
    path = out / "eval_t2i" / "samples.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=np.array([p[0] for p in rows]),
             arr_2=np.array([list(COLOURS).index(p[1]) for p in rows]), prompts=np.array(texts))
    first = list(range(0, len(rows), per))[:30]  # one sample per prompt: digits 0-4 in all colours
    save_prompt_grid(images[first], [texts[k] for k in first], str(out / "eval_t2i" / "prompt_grid.png"), ncol=6)
    return path


def hue_names(images_nhwc: np.ndarray) -> np.ndarray:
    """The named colour (index into tiny_captions.COLOURS) nearest in hue to each image's foreground:
    the mean RGB of its brightest 15% of pixels (the stroke), converted to a hue."""
    from data_pipeline.tiny_captions import COLOURS

    ref = np.array([colorsys.rgb_to_hsv(*rgb)[0] for rgb in COLOURS.values()])
    x = images_nhwc.reshape(len(images_nhwc), -1, 3).astype(np.float64) / 255.0
    out = []
    for img in x:
        bright = img[img.max(1) >= np.quantile(img.max(1), 0.85)]
        h = colorsys.rgb_to_hsv(*bright.mean(0))[0]
        d = np.abs(ref - h)
        out.append(int(np.argmin(np.minimum(d, 1 - d))))
    return np.array(out)


def _digit_features(images_nhwc: np.ndarray) -> np.ndarray:
    """8x8 stroke intensity (the per-pixel maximum over channels, scaled to the image's own maximum), so
    that the colour of a digit does not change what the classifier sees."""
    t = torch.from_numpy(images_nhwc).float().amax(dim=3, keepdim=True).permute(0, 3, 1, 2)
    t = t - t.amin(dim=(1, 2, 3), keepdim=True)
    t = t / t.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return torch.nn.functional.adaptive_avg_pool2d(t, 8).flatten(1).numpy()


def _real_captioned(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 NHWC images, digits, colour indices) of the prepared colour digits, colour read from the caption."""
    from data_pipeline.tiny_captions import COLOURS
    from rae_scale.data.loader import build_image_loader

    loader = build_image_loader(str(t2i_shards(out)), batch_size=100, shuffle=False, hflip=False, drop_last=False,
                                with_captions=True)
    xs, ys, cs = [], [], []
    for x, y, caps in loader:
        xs.append((x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        ys.append(y.numpy())
        cs += [list(COLOURS).index(c.split()[1]) for c in caps]
        if sum(len(v) for v in ys) >= 1797:
            break
    return np.concatenate(xs), np.concatenate(ys), np.array(cs)


def prompt_accuracy(samples_npz: Path, out: Path) -> dict:
    """How often the samples show what their prompt names: the digit (logistic regression on the real colour
    digits' stroke features, fit on 80%, held-out 20% = its ceiling) and the colour (nearest named hue of the
    foreground, scored on the real digits too). Chance: 10% and 1/6."""
    from data_pipeline.tiny_captions import COLOURS

    from rae_scale.commands.digit_probe import fit_logistic_regression

    x, y, colours = _real_captioned(out)
    feats = _digit_features(x)
    perm = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    predict = fit_logistic_regression(feats[perm[:cut]], y[perm[:cut]])
    with np.load(samples_npz) as f:
        images, digits, hues = f["arr_0"], f["arr_1"], f["arr_2"]
    return {"digit": float((predict(_digit_features(images)) == digits).mean()),
            "colour": float((hue_names(images) == hues).mean()),
            "digit_real_held_out": float((predict(feats[perm[cut:]]) == y[perm[cut:]]).mean()),
            "colour_real": float((hue_names(x) == colours).mean()),
            "digit_chance": 0.1, "colour_chance": 1.0 / len(COLOURS), "cfg_scale": T2I_CFG_SCALE,
            "num_samples": int(len(digits))}


def report_lines(acc: dict, s2: C.Stage2Job) -> list[str]:
    return [
        "## Text-to-image", "",
        f"A text-conditioned DiT-DH-IG ({s2.training.max_steps} steps, {s2.parallel.nproc} ranks) on colour digits "
        "captioned like \"a green seven on a dark background\", conditioned on a frozen random tiny Qwen3 (one token "
        f"per word), sampled once per (digit, colour) prompt with CFG {acc['cfg_scale']:g}.", "",
        "| metric | value |", "| --- | --- |",
        f"| samples whose digit is the prompt's ({acc['num_samples']} samples) | {acc['digit']:.1%} "
        f"(chance {acc['digit_chance']:.0%}; real held-out {acc['digit_real_held_out']:.1%}) |",
        f"| samples whose dominant hue is the prompt's colour | {acc['colour']:.1%} "
        f"(chance {acc['colour_chance']:.0%}; real {acc['colour_real']:.1%}) |", "",
        "The digit classifier is a logistic regression on 8x8 stroke intensities of 80% of the real colour "
        "digits (colour removed); the colour is the named hue nearest to the mean of each image's brightest "
        "pixels.", "", "![prompts](prompt_grid.png)", "",
    ]
