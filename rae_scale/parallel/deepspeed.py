"""DeepSpeed ZeRO-1/2/3 behind the Strategy interface. The only module in the package that imports deepspeed.

Our settings generate DeepSpeed's JSON config (ZeRO stage, bf16, accumulation, micro-batch, clipping); any
key can then be overridden with dotted keys. The optimizer is a torch optimizer we build and hand in.
Without a GPU DeepSpeed selects its CPU accelerator and talks gloo by itself.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

import deepspeed
from deepspeed import comm as ds_comm
from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

from rae_scale.parallel.ema import EMA, trainable_local_params
from rae_scale.parallel.deepspeed_checkpoint_io import DeepSpeedCheckpointIO
from rae_scale.parallel.strategy_base import Strategy

log = logging.getLogger(__name__)


def _no_shm_comm_op_on_cpu() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm)
    whenever a process group is set up: a minute of C++ compiling per machine, and a compiler needed on
    every node. The op serves only DeepSpeed's inference all-reduce, which training never calls, so it
    is marked not buildable (deepspeed.ops keeps that table for edits); collectives stay torch's (gloo)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


_no_shm_comm_op_on_cpu()

# written into every save so `ds_to_universal` can convert it for a different world size
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def apply_dotted_overrides(config: dict, overrides: Mapping[str, Any] | None) -> dict:
    """Set config["a"]["b"] = v for each {"a.b": v}, creating sections as needed. In place; returns config."""
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        if not all(parts):
            raise ValueError(f"deepspeed override key {key!r} is malformed; use dotted keys like 'zero_optimization.stage'")
        node = config
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ValueError(f"deepspeed override {key!r}: {where!r} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return config


def build_deepspeed_config(*, zero_stage: int, precision: str, micro_batch_size: int, grad_accum_steps: int,
                           world_size: int, grad_clip: float = 0.0,
                           overrides: Mapping[str, Any] | None = None) -> dict:
    """DeepSpeed's config dict from our settings, then the user's dotted overrides."""
    bf16 = precision == "bf16"
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        # our optimizer is a plain torch one (AdamW); ZeRO handles any torch optimizer, it just warns
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if bf16:
        # DeepSpeed's default reduces bf16 gradients in bf16; the platform promises fp32 reductions
        config["communication_data_type"] = "fp32"
    return apply_dotted_overrides(config, overrides)


def _output_hook_managers(output) -> list:
    """DeepSpeed's OutputBackwardHookManagers attached to a forward output (tensor or nested)."""
    if isinstance(output, torch.Tensor):
        return list(getattr(output, "_backward_hook_managers", []))
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (list, tuple)) else []
    return [m for item in items for m in _output_hook_managers(item)]


class PartitionedEMA(EMA):
    """The EMA where ZeRO partitions the fp32 master weights (ZeRO-3, or bf16 under ZeRO-1/2).

    Every rank keeps a full fp32 copy of the EMA network but lerps, after each step, only the elements whose
    fp32 master it holds: no communication in the step. Reading `module` (sample grids, evaluation,
    checkpoints: every rank reads it) first assembles the full EMA, one all-reduce per tensor, of each
    rank's own elements. Each element is averaged exactly as a full EMA averages it, so the values equal
    those of gathering the masters every step (what this replaces: one full-size all-reduce per tensor,
    per step).
    """

    def __init__(self, module: nn.Module, decay: float, params: list[nn.Parameter]) -> None:
        super().__init__(module, decay, source_params=lambda: [])
        self._params = params  # the engine's trained parameters, in the order of the EMA's averaged ones
        self._whole = True  # every rank's copy is the full EMA
        self.relink()

    @property
    def module(self) -> nn.Module:
        if not self._whole:
            self._assemble()
        return self._module

    @module.setter
    def module(self, value: nn.Module) -> None:
        self._module = value

    def relink(self) -> None:
        """Find each tensor's own elements and their fp32 masters (again after a checkpoint load), and the
        pairs the step lerps: the own elements of the flattened EMA tensor, and their masters."""
        params = dict(self._module.named_parameters())  # not `module`: that would assemble
        flat = [params[name].detach().view(-1) for name in self._averaged]
        self._own = [(ema, *self._own_elements(p)) for ema, p in zip(flat, self._params)]
        pairs = [(ema.narrow(0, start, master.numel()), master.view(-1))
                 for ema, start, master, _ in self._own if master is not None]
        self._lerp_targets, self._lerp_sources = [t for t, _ in pairs], [m for _, m in pairs]

    @staticmethod
    def _own_elements(param: nn.Parameter) -> tuple[int, torch.Tensor | None, Any]:
        """(start, fp32 master of the elements this rank holds or None, process group), in the flattened tensor."""
        if hasattr(param, "ds_id"):  # ZeRO-3: rank r holds elements [r * part, (r + 1) * part), the last padded
            group = getattr(param, "ds_process_group", None)
            local = safe_get_local_fp32_param(param)  # a view of the flat fp32 partition the optimizer updates
            start = ds_comm.get_rank(group=group) * local.numel()
            count = max(0, min(local.numel(), param.ds_numel - start))
            return start, (local[:count] if count else None), group
        mapping = getattr(param, "_hp_mapping", None)  # ZeRO-1/2: this rank's fragment of the tensor, if any
        if mapping is None:
            return 0, None, getattr(param, "_dp_group", None)
        return mapping.lp_fragment_address.start, mapping.hp_fragment, param._dp_group

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        if self._lerp_targets:
            torch._foreach_lerp_(self._lerp_targets, self._lerp_sources, 1.0 - d)
        self._whole = False

    @torch.no_grad()
    def _assemble(self) -> None:
        for ema, start, master, group in self._own:
            whole = torch.zeros_like(ema)
            if master is not None:
                whole.narrow(0, start, master.numel()).copy_(ema.narrow(0, start, master.numel()))
            ds_comm.all_reduce(whole, group=group)
            ema.copy_(whole)
        self._whole = True


class DeepSpeedStrategy(Strategy):
    kind = "deepspeed"

    def __init__(self, *, zero_stage: int, micro_batch_size: int, overrides: Mapping[str, Any] | None = None,
                 **common) -> None:
        super().__init__(**common)
        self.zero_stage = zero_stage
        self.micro_batch_size = micro_batch_size
        self.ds_config = build_deepspeed_config(
            zero_stage=zero_stage, precision=self.precision, micro_batch_size=micro_batch_size,
            grad_accum_steps=self.grad_accum_steps, world_size=self.dist.world_size, grad_clip=self.grad_clip,
            overrides=overrides)
        self.engine = None

    def wrap(self, model, *, blocks, optimizer_factory, lr_lambda=None, ema_decay=None):
        _, ema_copy = self._prepare(model, blocks, ema_decay)
        optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
        # a callable: DeepSpeed builds the schedule on the optimizer it keeps, and steps it at boundaries
        scheduler_fn = (lambda opt: LambdaLR(opt, lr_lambda)) if lr_lambda is not None else None
        # DeepSpeed asserts LOCAL_RANK is set; a bare single process (rae-scale train ... nproc=1, e.g.
        # a run resumed on one rank) has its one-rank group from init_distributed but no launcher variables
        os.environ.setdefault("LOCAL_RANK", str(self.dist.local_rank))
        engine, ds_optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler_fn, config=copy.deepcopy(self.ds_config))
        self.engine = self.model = engine
        self.module = engine.module
        self.optimizer = ds_optimizer
        self.scheduler = scheduler
        if ema_copy is not None:
            if self.zero_stage < 3 and self.precision == "fp32":
                # ZeRO-1/2 in fp32: the module holds the full fp32 weights on every rank
                self.ema = EMA(ema_copy.float(), ema_decay, lambda: trainable_local_params(self.module))
            else:
                trainable = [p for p in self.module.parameters() if p.requires_grad]
                self.ema = PartitionedEMA(ema_copy.float(), ema_decay, trainable)
        engine.register_forward_hook(self._only_engine_backward_starts_deepspeed_backward)
        return engine

    def _only_engine_backward_starts_deepspeed_backward(self, engine, inputs, output) -> None:
        """Keep side autograd passes through the engine's output out of DeepSpeed's backward.

        DeepSpeed (>= 0.18) hooks every forward output: the first gradient through it runs the
        backward prologue (and queues the reduction epilogue for the end of that autograd pass) and
        divides the gradient by the accumulation steps. Stage 1's adaptive GAN weight takes
        torch.autograd.grad of the losses w.r.t. the last layer's output before the training
        backward; that pass would start (and, with no gradient bucketed, crash) ZeRO's reduction
        and use up the once-per-forward prologue. Here only a pass inside engine.backward (the
        strategy's backward) counts; any other leaves the hooks as they were, gradients unscaled.
        """
        for manager in _output_hook_managers(output):
            once, per_tensor = manager.preprocess_once_fn, manager.preprocess_per_tensor_fn

            def guarded_once(manager=manager, once=once):
                if getattr(engine, "_running_engine_backward", True):
                    once()
                else:
                    manager.preprocess_done = False  # the training backward must still run it

            def guarded_per_tensor(grad, per_tensor=per_tensor):
                return per_tensor(grad) if getattr(engine, "_running_engine_backward", True) else grad

            manager.preprocess_once_fn = guarded_once
            if per_tensor is not None:
                manager.preprocess_per_tensor_fn = guarded_per_tensor

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        expected = self.engine.is_gradient_accumulation_boundary()
        if expected != is_last:
            raise RuntimeError(
                f"accumulate(is_last={is_last}) but DeepSpeed's micro-step counter says boundary={expected} "
                f"(gradient_accumulation_steps={self.grad_accum_steps}); call accumulate once per micro-batch "
                f"with is_last=True on exactly every {self.grad_accum_steps}th")
        self._is_last_micro = is_last
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # engine.backward divides by gradient_accumulation_steps itself: that is the one place here
        self.engine.backward(loss)
        if not self._is_last_micro:
            self.engine.step()  # advances DeepSpeed's micro-step counter; no update off the boundary

    def step(self, update_ema: bool = True) -> torch.Tensor:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("step() called before the last micro-batch of the accumulation window")
        self.engine.step()  # reduce, clip, optimizer step, zero grads, LR schedule
        norm = self.engine.get_global_grad_norm()
        if update_ema and self.ema is not None:
            self.ema.update()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach()

    def skip_step(self) -> torch.Tensor:
        self.engine.zero_grad()  # the engine owns the gradients (ZeRO's partitions)
        return torch.tensor(float("nan"))

    # ---- state -------------------------------------------------------------------------------------
    def model_state_for_checkpoint(self):
        raise TypeError("strategy 'deepspeed' checkpoints through save_native()/load_native(), not DCP")

    def optimizer_state_for_checkpoint(self):
        raise TypeError("strategy 'deepspeed' checkpoints through save_native()/load_native(), not DCP")

    def checkpoint_states(self):
        raise TypeError("strategy 'deepspeed' checkpoints through save_native()/load_native(), not DCP")

    def _full_param(self, param: nn.Parameter) -> torch.Tensor:
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is not None:
            return full
        if hasattr(param, "ds_id"):  # a frozen ZeRO-3 parameter: gather it
            with deepspeed.zero.GatheredParameters([param]):
                return param.detach().float().clone()
        return param.detach().float()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights (not the bf16 working copy) gathered on rank 0. Call on every rank."""
        out = {}
        for name, param in self.module.named_parameters():
            full = self._full_param(param)  # collective under ZeRO-3: every rank walks the same order
            if self.dist.rank == 0:
                out[name] = full.detach().to("cpu", copy=True)
        if self.dist.rank == 0:
            for name, buf in self.module.named_buffers():
                out[name] = buf.detach().to("cpu", copy=True)
            return out
        return {}

    def ema_full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.ema is None:
            raise RuntimeError("no EMA: pass ema_decay to wrap()")
        module = self.ema.module  # a partitioned EMA assembles here: every rank calls this
        if self.dist.rank != 0:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def checkpoint_io(self, manager, extra: Mapping[str, Any]) -> DeepSpeedCheckpointIO:
        """DeepSpeed's native files (staged, uploaded, converted for another world size) beside the
        manager's own entries."""
        return DeepSpeedCheckpointIO(self, manager, extra)

    def save_native(self, directory: str, tag: str, client_state: dict | None = None) -> None:
        """DeepSpeed's own sharded checkpoint (every rank writes its partition) plus EMA and client state."""
        state = dict(UNIVERSAL_INFO)
        state.update(client_state or {})
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()  # a full copy, identical on every rank
        self.engine.save_checkpoint(directory, tag=tag, client_state=state)

    def load_native(self, directory: str, tag: str, load_universal: bool = False) -> dict:
        """Load a save_native() checkpoint (or a universal one converted by ds_to_universal). Returns client state.

        DeepSpeed unpickles its files with weights_only=False, so the tag folder first passes the
        restricted check of rae_scale.checkpoint.safe_load (one line naming a refused file); a file
        that passes makes DeepSpeed's load build only plain data.
        """
        from rae_scale.checkpoint.safe_load import validate_deepspeed_dir

        validate_deepspeed_dir(os.path.join(directory, tag))
        if load_universal:
            # equivalent to {"checkpoint": {"load_universal": true}} in the config, decided at load time
            self.engine._config.load_universal_checkpoint = True
        path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {tag!r} under {directory!r}")
        client_state = client_state or {}
        if self.ema is not None and "ema" in client_state:
            self.ema.module.load_state_dict(client_state["ema"])
        if isinstance(self.ema, PartitionedEMA):
            self.ema.relink()  # the load may have re-pointed the masters
        return client_state
