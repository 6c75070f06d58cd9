"""Read and write the upstream RAE repository's checkpoint formats.

Every file is read with ``torch.load(weights_only=True)`` so a checkpoint cannot run code.
Upstream formats (rae_method.md sections 1.4-1.6): stage-2 files hold ``ema`` (preferred)
and/or ``model``; stage-1 decoder files are a plain decoder state dict or a training
checkpoint whose ``model``/``ema`` hold the whole RAE; statistics files hold ``mean``
and/or ``var`` of shape [C, H, W] (written here, read by rae_scale.data.latents.load_stats with
our own statistics files). ``build_stage2_from_upstream`` turns an upstream stage-2 class path and
its constructor kwargs (RAE's or RAEv2's, raev2_method.md section 3) into our module.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
from torch import nn

from rae_scale.models.dit import DiTwDDTHead, LightningDiT
from rae_scale.models.dit_dh_ig import InContextDiTDH, InContextDiTDHIG

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit a model: lists missing, unexpected and mis-shaped keys."""


def _head(items: list[str], limit: int) -> str:
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more if items else "none"


def check_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    config: Any = None,
    allow_missing: tuple[str, ...] = (),
    limit: int = 5,
) -> None:
    """Raise CheckpointMismatchError unless ``state_dict`` has exactly the model's keys and shapes.

    Args:
        config: what the model was built from; quoted in the error so a user can see which
            configuration the checkpoint was checked against.
        allow_missing: key names the checkpoint may omit (e.g. values recomputed at init).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and k not in allow_missing]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(
            f"checkpoint does not fit {type(model).__name__}: "
            f"{len(missing)} missing keys [{_head(missing, limit)}]; "
            f"{len(unexpected)} unexpected keys [{_head(unexpected, limit)}]; "
            f"{len(misshaped)} mis-shaped keys [{_head(misshaped, limit)}]; "
            f"checked against config {config!r}"
        )


def load_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, config: Any = None,
    allow_missing: tuple[str, ...] = (),
) -> nn.Module:
    """check_state_dict, then load (strict unless keys were allowed to be missing)."""
    check_state_dict(model, state_dict, config=config, allow_missing=allow_missing)
    model.load_state_dict(state_dict, strict=not allow_missing)
    return model


def _torch_load(path: str | os.PathLike) -> Any:
    return torch.load(os.fspath(path), map_location="cpu", weights_only=True)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_stage2_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict of an upstream stage-2 file: ``ema`` if present, else ``model``, else the raw dict."""
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if "ema" in obj:
        sd = obj["ema"]
    elif "model" in obj:
        # Upstream refuses this case; the raw model weights are the useful fallback.
        logger.warning("%s has no 'ema' entry; using its 'model' weights", path)
        sd = obj["model"]
    else:
        sd = obj
    return strip_wrapper_prefixes(sd)


def load_upstream_decoder(path: str | os.PathLike, *, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Decoder-only state dict from an upstream stage-1 file.

    Accepts a released ``model.pt`` (plain decoder dict) or a training checkpoint whose
    ``ema``/``model`` entry holds the whole RAE (``decoder.*`` keys are kept, prefix removed).
    """
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    other = "model" if prefer == "ema" else "ema"
    sd = obj.get(prefer, obj.get(other, obj))
    sd = strip_wrapper_prefixes(sd)
    if any(k.startswith("decoder.") for k in sd):
        sd = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    return sd


def save_upstream_stats(path: str | os.PathLike, mean: torch.Tensor | None, var: torch.Tensor | None) -> None:
    """Write {mean, var} (fp32, absent ones omitted) in upstream's statistics format."""
    if mean is None and var is None:
        raise ValueError("save_upstream_stats needs at least one of mean / var")
    out = {}
    if mean is not None:
        out["mean"] = mean.detach().float().cpu().contiguous()
    if var is not None:
        out["var"] = var.detach().float().cpu().contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    torch.save(out, os.fspath(path))


# RAEv2's constructor defaults (DDT.py:63-80, 208; configs/stage2.py:86-91), applied to
# keys a config leaves out so a partial params dict builds what RAEv2 would build.
_RAEV2_DEFAULTS: dict[str, Any] = dict(
    input_size=16, in_channels=768, patch_size=[1, 1], hidden_size=[1152, 2048], depth=[28, 2],
    num_heads=[16, 16], mlp_ratio=4.0, enable_repa=False, repa_layer_depth=8, z_dim=None, num_classes=1000,
    condition_type="label", context_dim=768, use_cfg_conds=False,
)
_RAEV2_COND_ARCH_DEFAULTS = dict(num_t_tokens=4, num_c_tokens=8, num_cfg_omega_tokens=4, n_action_tokens=4)
# keys only RAEv2's DiTwDDTHead takes: they tell it apart from RAE's class of the same path
_RAEV2_ONLY_KEYS = frozenset(("cond_arch", "condition_type", "context_dim", "enable_repa", "repa_layer_depth",
                              "z_dim", "use_cfg_conds"))
_RAE_CLASSES: dict[str, type[nn.Module]] = {
    "stage2.models.DDT.DiTwDDTHead": DiTwDDTHead,
    "stage2.models.lightningDiT.LightningDiT": LightningDiT,
}
_RAEV2_CLASSES: dict[str, type[nn.Module]] = {
    "stage2.models.DDT.DiTwDDTHead": InContextDiTDH,
    "stage2.models.DDT.DiTwDDTHeadIG": InContextDiTDHIG,
}


def _raev2_kwargs(cls: type[nn.Module], params: Mapping[str, Any]) -> dict[str, Any]:
    """Our constructor kwargs from RAEv2's: cond_arch flattened, unsupported settings refused."""
    allowed = {*_RAEV2_DEFAULTS, "cond_arch"} | ({"base_model_depth"} if cls is InContextDiTDHIG else set())
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"RAEv2 {cls.__name__} params have unknown keys {unknown}; allowed: {sorted(allowed)}")
    kwargs = {**_RAEV2_DEFAULTS, **params}
    arch = kwargs.pop("cond_arch", None)
    arch = dict(arch) if isinstance(arch, Mapping) else dict(vars(arch)) if arch is not None else {}
    unknown = sorted(set(arch) - set(_RAEV2_COND_ARCH_DEFAULTS))
    if unknown:
        raise ValueError(f"RAEv2 cond_arch has unknown keys {unknown}; allowed: {sorted(_RAEV2_COND_ARCH_DEFAULTS)}")
    arch = {**_RAEV2_COND_ARCH_DEFAULTS, **arch}
    if kwargs.pop("use_cfg_conds"):
        raise ValueError("RAEv2 use_cfg_conds=True (CFG-scale tokens) is not supported; every RAEv2 config "
                         "has it False")
    # only cfg-scale tokens and the 'nwm' condition read these; the model refuses 'nwm' itself
    kwargs.update(num_t_tokens=arch["num_t_tokens"], num_c_tokens=arch["num_c_tokens"])
    if kwargs["condition_type"] != "text":
        kwargs["context_dim"] = None  # RAEv2 ignores it for labels
    return kwargs


def build_stage2_from_upstream(class_path: str, params: Mapping[str, Any]) -> nn.Module:
    """Our stage-2 module for an upstream class path and its constructor kwargs, ready for
    ``load_state_dict(upstream_state_dict, strict=True)``.

    RAE: ``stage2.models.DDT.DiTwDDTHead``, ``stage2.models.lightningDiT.LightningDiT``. RAEv2:
    ``stage2.models.DDT.DiTwDDTHeadIG`` (returns ``(x_full, x_base)``) and its
    ``stage2.models.DDT.DiTwDDTHead`` (returns x_full), with the nested ``cond_arch`` dict; RAE's
    and RAEv2's DiTwDDTHead share a path and are told apart by RAEv2's own keys (``cond_arch`` ...).
    An optional ``src.`` prefix (older configs) is ignored.
    """
    path = class_path.removeprefix("src.")
    if path == "stage2.models.DDT.DiTwDDTHeadIG" or (path in _RAEV2_CLASSES and _RAEV2_ONLY_KEYS & set(params)):
        cls = _RAEV2_CLASSES[path]
        return cls(**_raev2_kwargs(cls, params))
    if path not in _RAE_CLASSES:
        allowed = sorted(set(_RAE_CLASSES) | set(_RAEV2_CLASSES))
        raise ValueError(f"unknown upstream stage-2 class {class_path!r}; allowed: {', '.join(allowed)}")
    return _RAE_CLASSES[path](**params)
