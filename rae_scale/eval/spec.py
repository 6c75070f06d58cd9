"""What a set of samples depends on, as JSON: the weights (resolved to one checkpoint version), the
network and decoder settings, sampler, time shift, guidance, precision (and a text encoder). `evaluate`
records it with its results and compares it before reusing work units; online evaluation records it on
every evaluation row, so an online number says how it was sampled (and `evaluate --from-results` can
repeat it from a checkpoint of that step)."""
from __future__ import annotations

import dataclasses
import hashlib
import os

from rae_scale import config as C
from rae_scale.checkpoint.layout import is_run_or_step, resolve_step_folder


def source_identity(path: str | None, storage_options: dict | None = None) -> dict | None:
    """One version of a weights (or reference) source: whether earlier results came from the same one.

    A run folder resolves to its newest committed step: step folder, step, which weights (EMA) and a
    hash of the commit marker (it holds the save time, so it changes when the folder is rewritten). A
    file is its path, size and modification time. None when there is no source (random weights).
    """
    if not path:
        return None
    from rae_scale.checkpoint.layout import COMMIT_FILE, parse_step
    from rae_scale.checkpoint.storage import Storage
    from rae_scale.storage import join, normalize

    if is_run_or_step(path, storage_options):
        step_url = resolve_step_folder(path, storage_options)
        store = Storage(step_url, storage_options)
        marker = join(step_url, COMMIT_FILE)
        commit = hashlib.sha256(store.read_bytes(marker)).hexdigest()[:16] if store.exists(marker) else None
        return {"path": step_url, "step": parse_step(step_url), "commit": commit, "weights": "ema"}
    url = normalize(path)
    store = Storage(url, storage_options)
    try:
        info = store.fs.info(store.path(url))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path!r} does not exist (neither a run/step folder nor a file)") from None
    modified = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag")
    return {"path": url, "size": info.get("size"), "modified": str(modified) if modified is not None else None}


def _network(dit: C.DiTConfig) -> dict:
    """The DiT settings that shape the network (weights and init-only settings are not among them)."""
    return {k: v for k, v in dataclasses.asdict(dit).items() if k not in ("checkpoint", "label_embed_std")}


def sampling_spec(cfg: C.SampleJob, checkpoint: dict | None = None) -> dict:
    """Everything a sample job's images depend on besides seeds and labels, as JSON: the weights
    (resolved to one checkpoint version), network and decoder settings, sampler, time shift, guidance
    and precision. Evaluation records it with its results and compares it before reusing work units.
    Settings that do not act (a scale without guidance, tolerances of a fixed-step method) are left out.
    checkpoint: the weights' identity when they are not a file or folder (online evaluation: the run and
    step); by default that of cfg.checkpoint / dit.checkpoint."""
    from rae_scale.diffusion.transport import Transport

    so = cfg.run.storage_options
    latent_shape = (cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size)
    shift = Transport(shift_dim=cfg.transport.shift_dim, shift_base=cfg.transport.shift_base).shift_for(latent_shape)
    s = cfg.sampler
    sampler = {"mode": s.mode, "num_steps": s.num_steps}
    if s.mode == "ode":
        sampler["method"] = s.method
        if s.method == "dopri5":
            sampler.update(atol=s.atol, rtol=s.rtol)
    if s.grid != "rae":
        sampler["grid"] = s.grid
    g = cfg.guidance
    guidance: dict = {"method": g.method}
    if g.method in ("cfg", "autoguidance", "ig_cfg"):
        guidance.update(scale=g.scale, t_min=g.t_min, t_max=g.t_max)
    if g.method in ("ig", "ig_cfg"):
        guidance.update(ig_scale=g.ig_scale, ig_t_min=g.ig_t_min, ig_t_max=g.ig_t_max,
                        ig_unconditional_scale=g.ig_unconditional_scale)
    if g.method == "autoguidance" and g.guidance_model is not None:
        guidance["guidance_model"] = {
            "weights": source_identity(g.guidance_model.checkpoint, so) or "random",
            "network": _network(g.guidance_model)}
    stats = cfg.rae.stats_path
    return {
        "checkpoint": checkpoint or source_identity(cfg.checkpoint or cfg.dit.checkpoint, so) or "random",
        "decoder": source_identity(cfg.rae.decoder_checkpoint, so) or "random",
        "latent_stats": source_identity(stats, so) if stats else None,
        "network": _network(cfg.dit),
        "decoder_network": dataclasses.asdict(cfg.rae.decoder),
        "sampler": sampler,
        "time_shift": {"shift": shift, "shift_dim": cfg.transport.shift_dim, "shift_base": cfg.transport.shift_base},
        "guidance": guidance,
        "precision": cfg.precision,
        **({"text_encoder": {"weights": source_identity(cfg.text_encoder.pretrained, so)
                             if os.path.exists(cfg.text_encoder.pretrained) else cfg.text_encoder.pretrained,
                             "max_length": cfg.text_encoder.max_length}}
           if cfg.dit.condition_type == "text" else {}),
        # velocity networks' specs stay as they were before x-prediction existed (resumable evaluations)
        **({"prediction": {"kind": "x", "t_eps": cfg.transport.t_eps}} if cfg.transport.prediction == "x" else {}),
    }
