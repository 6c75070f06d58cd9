"""Sampling jobs: weights from any supported source, a per-sample-seeded sampler, grids and files.

Weight sources (for `checkpoint` of a sample job and `rae.decoder_checkpoint`): a rae_scale run
folder (its newest committed checkpoint, EMA weights), a step folder, an exported `.safetensors`, or
an upstream `.pt` (stage-2: `ema` entry if present; stage-1 decoders: `model` / `ema`). The jobs refuse
to run when a trained part (stage-2 model, decoder) has no source, unless random weights are asked for.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from rae_scale import config as C
from rae_scale.diffusion.sample_fn import make_sample_fn
from rae_scale.builders import build_dit_model, build_rae, ema_weights, is_run_or_step

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- weights


def load_stage2(cfg: C.SampleJob, device) -> torch.nn.Module:
    """The stage-2 network of a sample job with its weights (EMA where there is one)."""
    model = build_dit_model(cfg.dit, load_weights=cfg.checkpoint is None)
    if cfg.checkpoint:
        if is_run_or_step(cfg.checkpoint):
            from rae_scale.interop.upstream import load_checked

            load_checked(model, ema_weights(cfg.checkpoint, cfg.run.storage_options),
                         config=f"EMA of {cfg.checkpoint}")
            log.info("loaded stage-2 EMA weights from %s", cfg.checkpoint)
        else:
            from rae_scale.builders import load_dit_weights_into

            load_dit_weights_into(model, cfg.checkpoint)
    return model.to(device).eval()


def load_rae_for_decoding(rae_cfg: C.RAEConfig, device, storage_options: dict | None = None,
                          with_encoder: bool = False):
    """The RAE with its stage-1 decoder (a run folder's EMA decoder or any decoder file), eval mode; the
    encoder's weights only with_encoder (reconstruction encodes; sampling only decodes)."""
    return build_rae(rae_cfg, storage_options=storage_options, with_encoder=with_encoder).to(device).eval()


def missing_trained_weights(cfg: C.SampleJob, *, stage2: bool = True, prefix: str = "",
                            checkpoint_is_decoder: bool = False) -> list[str]:
    """The trained parts of a job that have no weights source, each with how to give one.

    Only trained parts count (stage-2 model, autoguidance model, decoder): the frozen encoder of a
    config that gives sizes instead of `pretrained` is random on purpose (tiny configs, tests).
    `prefix` is where the sample job sits in the job's config ("sample." for evaluate);
    `checkpoint_is_decoder`: the job's --checkpoint flag names the decoder (reconstruct, evaluate recon).
    """
    missing = []
    if stage2 and not (cfg.checkpoint or cfg.dit.checkpoint):
        missing.append(f"the stage-2 model (give --checkpoint RUN|FILE or {prefix}dit.checkpoint=FILE)")
    g = cfg.guidance
    if stage2 and g.method == "autoguidance" and g.guidance_model is not None and not g.guidance_model.checkpoint:
        missing.append(f"the autoguidance model (give {prefix}guidance.guidance_model.checkpoint=FILE)")
    if not cfg.rae.decoder_checkpoint:
        how = ("--checkpoint STAGE1_RUN|FILE" if checkpoint_is_decoder
               else f"{prefix}rae.decoder_checkpoint=STAGE1_RUN|FILE")
        missing.append(f"the decoder (give {how})")
    return missing


def require_trained_weights(cfg: C.SampleJob, job: str, *, allow_random_weights: bool = False, **kw) -> None:
    """Refuse to sample or decode with random trained parts unless asked to: a forgotten checkpoint
    would otherwise give plausible-looking numbers (PSNR, FID) of an untrained model."""
    missing = missing_trained_weights(cfg, **kw)
    if not missing:
        return
    if allow_random_weights:
        log.warning("%s runs with random weights for %s (--allow-random-weights)", job,
                    ", ".join(m.split(" (")[0] for m in missing))
        return
    listed = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
    raise C.ConfigError(f"{job} would use random weights for {listed}; pass --allow-random-weights "
                        "to run with random weights on purpose")


# ----------------------------------------------------------------------------- the sampler


def load_guide_model(cfg: C.SampleJob, device):
    if cfg.guidance.method != "autoguidance":
        return None
    if cfg.guidance.guidance_model is None:
        raise C.ConfigError("guidance.method=autoguidance needs guidance.guidance_model (the smaller model)")
    return build_dit_model(cfg.guidance.guidance_model).to(device).eval()


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_grid_and_files(images: torch.Tensor, labels, out_dir: str, name: str = "grid.png") -> dict:
    from PIL import Image

    from rae_scale.train.image_grid import save_image_grid

    os.makedirs(out_dir, exist_ok=True)
    files = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        path = os.path.join(out_dir, f"{i:05d}_class{int(lab)}.png")
        Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).save(path)
        files.append(path)
    grid = save_image_grid(images.float() / 255, os.path.join(out_dir, name),
                           nrow=min(len(images), max(1, int(math.ceil(math.sqrt(len(images)))))))
    return {"grid": grid, "files": files}


def read_prompts(path: str) -> list[str]:
    """The prompts of a prompts file: one per line, surrounding blanks stripped, empty lines skipped.
    A missing or empty file is a one-line error."""
    from rae_scale.storage import open_url

    try:
        with open_url(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise C.ConfigError(f"prompts file {path!r} does not exist") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise C.ConfigError(f"prompts file {path!r} holds no prompt; allowed: one prompt per line")
    return prompts


def job_prompts(cfg: C.SampleJob) -> list[str]:
    """A text-to-image sample job's prompts: `prompts`, then those of `prompts_file`; one is needed."""
    prompts = list(cfg.prompts) + (read_prompts(cfg.prompts_file) if cfg.prompts_file else [])
    if not prompts:
        raise C.ConfigError("a text-to-image model (dit.condition_type=text) samples from prompts: give --prompt "
                            "\"...\" (repeatable) or --prompts-file FILE")
    return prompts


def load_text_encoder_for(cfg: C.SampleJob, device):
    """The generator's frozen text encoder (text-to-image), or None for a class-conditional model."""
    if cfg.dit.condition_type != "text":
        if cfg.prompts or cfg.prompts_file:
            raise C.ConfigError("prompts are for a text-to-image model; this one is class-conditional "
                                "(dit.condition_type=label): give --class-ids instead")
        return None
    from rae_scale.builders import build_text_encoder

    return build_text_encoder(cfg.text_encoder, device)


def save_prompt_grid(images: torch.Tensor, prompts: list[str], path: str, ncol: int) -> str:
    """uint8 images [N, 3, H, W] in a grid with each image's prompt written under it (wrapped), as PNG."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, 128 // images.shape[-1])  # tiny images are enlarged (nearest) to be seen beside their text
    images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, _, h, w = images.shape
    cell_w = max(w, 160)
    font = ImageFont.load_default()
    lines = [textwrap.wrap(p, width=max(8, cell_w // 7)) or [""] for p in prompts]
    text_h = 12 * max(len(x) for x in lines) + 6
    ncol = max(1, min(ncol, n))
    rows = -(-n // ncol)
    grid = Image.new("RGB", (ncol * cell_w, rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % ncol) * cell_w, (i // ncol) * (h + text_h)
        grid.paste(Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy()), (x + (cell_w - w) // 2, y))
        for k, line in enumerate(lines[i]):
            draw.text((x + 3, y + h + 3 + 12 * k), line, fill="black", font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)
    return path


def _generate_from_prompts(cfg: C.SampleJob, sample_fn, prompts: list[str]) -> dict:
    """num_samples images per prompt: one PNG each (prompts.json maps files to prompts) and a grid
    captioned with the prompts."""
    import json

    from PIL import Image

    conditions = [p for p in prompts for _ in range(cfg.num_samples)]
    seeds = torch.arange(len(conditions)) + cfg.seed * 1_000_003
    images = torch.cat([sample_fn(conditions[i:i + cfg.batch_size], seeds[i:i + cfg.batch_size])
                        for i in range(0, len(conditions), cfg.batch_size)])
    os.makedirs(cfg.output, exist_ok=True)
    files = []
    for i, (img, prompt) in enumerate(zip(images, conditions)):
        name = f"{i:05d}_prompt{i // cfg.num_samples:03d}.png"
        Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).save(os.path.join(cfg.output, name))
        files.append({"file": name, "prompt": prompt, "seed": int(seeds[i])})
    with open(os.path.join(cfg.output, "prompts.json"), "w") as f:
        json.dump(files, f, indent=1)
    grid = save_prompt_grid(images, conditions, os.path.join(cfg.output, "grid.png"), ncol=max(cfg.num_samples, 4))
    log.info("wrote %d images for %d prompt(s), prompts.json and a captioned grid to %s", len(images), len(prompts),
             cfg.output)
    return {"grid": grid, "num_images": len(images), "num_prompts": len(prompts), "output": cfg.output}


def generate(cfg: C.SampleJob, *, allow_random_weights: bool = False) -> dict:
    """`rae-scale generate`: num_samples images per requested class (text-to-image: per prompt), a grid
    and one PNG each."""
    prompts = job_prompts(cfg) if cfg.dit.condition_type == "text" else None
    require_trained_weights(cfg, "generate", allow_random_weights=allow_random_weights)
    device = _device()
    text_encoder = load_text_encoder_for(cfg, device)
    model = load_stage2(cfg, device)
    rae = load_rae_for_decoding(cfg.rae, device, cfg.run.storage_options)
    sample_fn = make_sample_fn(cfg, model, rae, device, load_guide_model(cfg, device), text_encoder=text_encoder)
    if prompts is not None:
        return _generate_from_prompts(cfg, sample_fn, prompts)
    class_ids = cfg.class_ids or list(range(min(cfg.dit.num_classes, 8)))
    for c in class_ids:
        if not 0 <= c < cfg.dit.num_classes:
            raise C.ConfigError(f"class id {c} is outside 0..{cfg.dit.num_classes - 1}")
    labels = torch.tensor([c for c in class_ids for _ in range(cfg.num_samples)])
    seeds = torch.arange(len(labels)) + cfg.seed * 1_000_003
    chunks = [sample_fn(labels[i:i + cfg.batch_size], seeds[i:i + cfg.batch_size])
              for i in range(0, len(labels), cfg.batch_size)]
    images = torch.cat(chunks)
    out = save_grid_and_files(images, labels.tolist(), cfg.output)
    log.info("wrote %d images and a grid to %s", len(images), out["grid"])
    return {"grid": out["grid"], "num_images": len(images), "output": cfg.output}


def reconstruct_image(cfg: C.SampleJob, image_path: str, *, allow_random_weights: bool = False) -> dict:
    """`rae-scale reconstruct`: encode + decode one image with the decoder of `rae.decoder_checkpoint`
    (a stage-1 run's EMA decoder, a safetensors export or an upstream .pt), save the pair side by
    side, report PSNR."""
    from PIL import Image

    from rae_scale.data.transforms import adm_center_crop

    require_trained_weights(cfg, "reconstruct", stage2=False, checkpoint_is_decoder=True,
                            allow_random_weights=allow_random_weights)
    device = _device()
    rae = load_rae_for_decoding(cfg.rae, device, cfg.run.storage_options, with_encoder=True)
    size = rae.decoder.image_size
    with Image.open(image_path) as img:
        img = adm_center_crop(img.convert("RGB"), size)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].to(device)
    with torch.no_grad():
        recon = rae.decode(rae.encode(x).latent).sample.clamp(0, 1)
    x8 = (x * 255).round()
    r8 = (recon * 255).round()
    mse = torch.mean((x8 - r8) ** 2).item()
    psnr = float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
    out_dir = cfg.output
    os.makedirs(out_dir, exist_ok=True)
    pair = torch.cat([x8, r8], dim=3)[0].permute(1, 2, 0).byte().cpu().numpy()
    out = os.path.join(out_dir, Path(image_path).stem + "_reconstruction.png")
    Image.fromarray(pair).save(out)
    result = {"psnr": psnr, "output": out}
    log.info("PSNR %.2f dB; input | reconstruction written to %s", psnr, out)
    return result
