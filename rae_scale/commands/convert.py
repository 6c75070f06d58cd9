"""`rae-scale convert`: checkpoint formats in and out.

  ema-safetensors  run/step folder -> EMA weights as one safetensors file (fp32 or bf16)
  consolidate      run/step folder -> one .pt with the full (unsharded) state, loadable weights_only
  to-upstream      run/step folder -> upstream's .pt layout ({"model", "ema"}; stage-1: decoder only)
  from-upstream    upstream .pt (stage-2 or decoder) -> safetensors rae_scale loads
  to-diffusers     stage-1 run/step folder or decoder file + --config -> diffusers AutoencoderRAE folder
  from-diffusers   diffusers AutoencoderRAE folder -> decoder safetensors, stats .pt, encoder folder
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from rae_scale import config as C

log = logging.getLogger(__name__)


def _step_metadata(step_dir: str) -> dict:
    from rae_scale.checkpoint.layout import read_metadata
    from rae_scale.checkpoint.storage import Storage

    return read_metadata(Storage(step_dir), step_dir)


def _full_state(source: str) -> tuple[dict, dict]:
    from rae_scale.checkpoint import consolidate
    from rae_scale.checkpoint.layout import resolve_step_folder

    step = resolve_step_folder(source)
    return consolidate(step), _step_metadata(step)


def _model_weights(state: dict, key: str) -> dict[str, torch.Tensor]:
    from rae_scale.checkpoint import extract_ema

    return {k: v for k, v in extract_ema(state, key).items() if isinstance(v, torch.Tensor)}


def _load_job_config(path: str | None, meta: dict | None = None):
    """The job config describing the model: --config, else the one saved in the checkpoint."""
    if path:
        for cls in (C.Stage1Job, C.Stage2Job, C.SampleJob):
            try:
                return C.load_config(cls, path)
            except C.ConfigError:
                continue
        raise C.ConfigError(f"--config {path!r} is not a stage1, stage2 or sample config")
    if meta and "config" in meta:
        cls = C.Stage1Job if meta.get("job") == "stage1" else C.Stage2Job
        return C.from_dict(cls, meta["config"])
    raise C.ConfigError("this conversion needs --config (a job YAML that describes the model)")


def convert(kind: str, source: str, output: str, *, dtype: str = "fp32", config: str | None = None) -> dict:
    from rae_scale.checkpoint import export_safetensors

    if kind == "ema-safetensors":
        state, meta = _full_state(source)
        weights = _model_weights(state, "ema")
        export_safetensors(weights, output, dtype=dtype, metadata={"step": str(meta.get("step")),
                                                                   "job": str(meta.get("job"))})
        return {"output": output, "tensors": len(weights), "step": meta.get("step")}

    if kind == "consolidate":
        state, meta = _full_state(source)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": state, "metadata": meta}, output)
        return {"output": output, "step": meta.get("step")}

    if kind == "to-upstream":
        state, meta = _full_state(source)
        ema = _model_weights(state, "ema")
        model = _model_weights(state, "model")
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model, "ema": ema}, output)
        return {"output": output, "job": meta.get("job"), "step": meta.get("step")}

    if kind == "from-upstream":
        from rae_scale.interop.upstream import load_stage2_checkpoint

        weights = load_stage2_checkpoint(source)
        export_safetensors(weights, output, dtype=dtype, metadata={"source": os.path.basename(source)})
        return {"output": output, "tensors": len(weights)}

    if kind == "to-diffusers":
        from rae_scale.checkpoint.layout import is_run_or_step, resolve_step_folder
        from rae_scale.commands.generate import load_rae_for_decoding
        from rae_scale.interop.diffusers_rae import save_diffusers_autoencoder

        meta = _step_metadata(resolve_step_folder(source)) if is_run_or_step(source) else None
        job = _load_job_config(config, meta)
        rae_cfg = C.RAEConfig(**{**job.rae.__dict__, "decoder_checkpoint": source})
        rae = load_rae_for_decoding(rae_cfg, "cpu", with_encoder=True)  # the export holds both halves
        save_diffusers_autoencoder(rae, output)
        return {"output": output}

    if kind == "from-diffusers":
        from safetensors.torch import save_file

        from rae_scale.interop.diffusers_rae import load_diffusers_autoencoder
        from rae_scale.interop.upstream import save_upstream_stats

        rae = load_diffusers_autoencoder(source)
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in rae.decoder.state_dict().items()}, str(out / "decoder.safetensors"))
        save_upstream_stats(out / "stat.pt", rae.latent_mean, rae.latent_var)
        rae.encoder.model.save_pretrained(out / "encoder")
        return {"output": output, "decoder": str(out / "decoder.safetensors"), "stats": str(out / "stat.pt"),
                "encoder": str(out / "encoder")}

    raise C.ConfigError(f"unknown conversion {kind!r}")
