"""RAEv2's "gmuon" optimizer: Muon on the 2-D parameters, AdamW on the rest, one torch Optimizer.

Muon step for each matrix parameter X with gradient G (momentum mu, lr, weight decay wd):
    M <- mu M + G                     (fp32 buffer, no (1 - mu) damping)
    U <- mu M + G  (Nesterov) or M    then cast to bf16
    O <- orthogonalize(U)             (newton_schulz.py: fp16 Polar-Express, Gram NS) in bf16
    X <- X (1 - lr wd) - lr 0.2 sqrt(max(rows, cols)) O    (the scaled update rounded to bf16)
AdamW (torch's algorithm, betas (0.9, 0.95), eps 1e-8) takes every other parameter, with the same
weight decay (RAEv2 excludes nothing from decay).

Sharding. The momentum buffer is an ordinary per-parameter state entry ("momentum_buffer") shaped
like its parameter, so DCP saves and reshards it like AdamW's moments. All elementwise work runs on
each rank's local shard. Orthogonalisation needs the whole matrix: under FSDP2 (DTensor shards)
every rank all-gathers the bf16 U of each shape group in one collective, orthogonalises the full
stack and keeps the rows of its own shard. Every rank thus computes exactly what one process would
(same matrices, same batches), so results do not depend on the rank count, and under DDP (plain
tensors) every rank already holds the full matrix. The price is redundant Newton-Schulz on every
rank, the same as RAEv2 pays under DDP (a few percent of a DiT-XL step); handing whole matrices to
owner ranks (torchtitan / Dion style) would divide that compute but make the batch a rank sees
depend on the world size.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.optim.adamw import adamw as adamw_update

from rae_scale.optim.adamw import kernel_kwargs

from rae_scale.optim.newton_schulz import (DEFAULT_RESTART_ITERATIONS, NORM_EPSILON, check_coefficients,
                                           check_restarts, orthogonalize, polar_express_coefficients)

ALGORITHMS = ("muon", "adamw")
UPDATE_DTYPE = torch.bfloat16  # gmuon casts U to bf16 before orthogonalising; the update stays bf16


def muon_adjusted_lr(lr: float, shape: Sequence[int]) -> float:
    """lr x 0.2 x sqrt(max(rows, cols)): gives the orthogonalised update about AdamW's RMS (0.2 lr)."""
    rows, cols = shape[-2:]
    return lr * (0.2 * math.sqrt(max(rows, cols)))


def split_muon_params(params: Iterable[torch.Tensor]) -> list[dict]:
    """RAEv2's split: parameters with ndim == 2 -> a "muon" group, all others -> an "adamw" group.

    Linear weights, embedding tables and learnable token matrices are 2-D; biases, norm weights and
    conv kernels (a 1x1 patch embedding kept as a 4-D conv) are not. Empty groups are left out.
    """
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim == 2], "algorithm": "muon"},
              {"params": [p for p in params if p.ndim != 2], "algorithm": "adamw"}]
    return [g for g in groups if g["params"]]


def _check_range(name: str, value, low: float, high: float | None = None, *, low_open: bool = False) -> None:
    """value must be a number in [low, high) (or (low, ...) with low_open); a clear error otherwise."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and (value > low if low_open else value >= low) and (high is None or value < high)):
        left = "(" if low_open else "["
        allowed = f"a number {'>' if low_open else '>='} {low}" if high is None else f"a number in {left}{low}, {high})"
        raise ValueError(f"{name}={value!r} is not allowed; it must be {allowed}")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own values of a DTensor (an alias: in-place ops change the DTensor), or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _stack_placements(param: DTensor) -> tuple:
    """The placements of a stack of such parameters along a new leading dim (FSDP2: Shard(0) -> Shard(1))."""
    out = []
    for p in param.placements:
        if type(p) is Shard:
            out.append(Shard(p.dim + 1))
        elif isinstance(p, Replicate):
            out.append(p)
        else:
            raise ValueError(f"Muon can orthogonalise DTensor parameters sharded by FSDP2/HSDP (Shard, Replicate "
                             f"placements); got placements {param.placements} for a {tuple(param.shape)} parameter")
    return tuple(out)


def _full_stack(updates: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """The full matrices of a shape group, stacked (batch, rows, cols): all-gathered for DTensor shards."""
    stacked = torch.stack(updates)
    like = params[0]
    if not isinstance(like, DTensor):
        return stacked
    shape = (len(params), *like.shape)
    stride = torch.empty(shape, device="meta").stride()
    gathered = DTensor.from_local(stacked, like.device_mesh, _stack_placements(like), run_check=False,
                                  shape=shape, stride=stride)
    return gathered.full_tensor()


def _local_rows(full: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """This rank's part of a full stacked update, laid out like its parameters' shards (no communication)."""
    like = params[0]
    if not isinstance(like, DTensor):
        return full
    local = distribute_tensor(full, like.device_mesh, _stack_placements(like), src_data_rank=None).to_local()
    expected = (len(params), *like.to_local().shape)
    if tuple(local.shape) != expected:
        raise RuntimeError(f"Muon: local update shape {tuple(local.shape)} != shard shape {expected}; the "
                           f"parameter is not sharded with torch.chunk semantics (FSDP2's)")
    return local


class MuonWithAdamW(torch.optim.Optimizer):
    """gmuon: one optimizer whose param groups are "muon" (2-D matrices) or "adamw" (everything else).

    params: parameters (split by ndim == 2, see split_muon_params) or param-group dicts, each with
    "algorithm" in ("muon", "adamw") and optional per-group lr, momentum, nesterov, weight_decay,
    betas, eps. One LambdaLR scales every group's lr; the Muon shape adjustment is applied per
    matrix at step time from its global shape, and weight decay uses the unadjusted lr.
    Newton-Schulz settings (coefficients, restart iterations, epsilon, largest batch) are the
    optimizer's, not per group. ns_max_batch bounds how many matrices of one shape are
    orthogonalised (and, under FSDP2, gathered) at once; None takes a whole shape group.
    ns_emulate_half_on_cpu: see newton_schulz.orthogonalize (False: the CPU's own fp16 kernels).
    """

    def __init__(self, params, lr: float, *, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8,
                 ns_coefficients=None, ns_restart_iterations: Sequence[int] = DEFAULT_RESTART_ITERATIONS,
                 ns_epsilon: float = NORM_EPSILON, ns_max_batch: int | None = None,
                 ns_emulate_half_on_cpu: bool = True, implementation: str = "auto") -> None:
        self.implementation = implementation  # the AdamW groups' kernel (adamw.kernel_kwargs)
        self.ns_coefficients = check_coefficients(polar_express_coefficients() if ns_coefficients is None
                                                  else ns_coefficients)
        self.ns_restart_iterations = check_restarts(ns_restart_iterations, len(self.ns_coefficients))
        _check_range("ns_epsilon", ns_epsilon, 0.0, low_open=True)
        if ns_max_batch is not None and (not isinstance(ns_max_batch, int) or ns_max_batch < 1):
            raise ValueError(f"ns_max_batch={ns_max_batch!r} must be a positive integer or None (no limit)")
        self.ns_epsilon, self.ns_max_batch = float(ns_epsilon), ns_max_batch
        self.ns_emulate_half_on_cpu = bool(ns_emulate_half_on_cpu)
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = split_muon_params(params)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        betas=tuple(betas), eps=eps, foreach=None, fused=False)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        algorithm = param_group.get("algorithm")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"every param group needs 'algorithm' set to one of {ALGORITHMS}, got {algorithm!r}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if algorithm == "adamw":
            kernel = kernel_kwargs(self.implementation, group["params"])
            group["fused"], group["foreach"] = kernel.get("fused", False), kernel.get("foreach")
        _check_range("lr", float(group["lr"]) if isinstance(group["lr"], torch.Tensor) else group["lr"], 0.0)
        _check_range("weight_decay", group["weight_decay"], 0.0)
        _check_range("eps", group["eps"], 0.0)
        _check_range("momentum", group["momentum"], 0.0, 1.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov={group['nesterov']!r} must be true or false")
        if len(group["betas"]) != 2:
            raise ValueError(f"betas={group['betas']!r} must be two numbers in [0, 1)")
        for i, beta in enumerate(group["betas"]):
            _check_range(f"betas[{i}]", beta, 0.0, 1.0)
        if algorithm == "muon":
            for p in group["params"]:
                _check_matrix(p)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    # ------------------------------------------------------------------ Muon

    def _muon_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            _check_matrix(p, swapped_in=True)
            if p.grad.is_sparse:
                raise ValueError("Muon does not take sparse gradients")
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(_local(state["momentum_buffer"]))
        grads = [_local(p.grad).to(b.dtype) for p, b in zip(params, buffers)]
        torch._foreach_mul_(buffers, mu)
        torch._foreach_add_(buffers, grads)
        if group["nesterov"]:
            updates = torch._foreach_mul(buffers, mu)
            torch._foreach_add_(updates, grads)
        else:
            updates = buffers
        updates = [u.to(UPDATE_DTYPE) for u in updates]
        del grads

        for indices in self._shape_batches(params):
            batch = [params[i] for i in indices]
            full = _full_stack([updates[i] for i in indices], batch)
            ortho = orthogonalize(full, self.ns_coefficients, self.ns_restart_iterations, self.ns_epsilon,
                                  emulate_half_on_cpu=self.ns_emulate_half_on_cpu)
            ortho.mul_(muon_adjusted_lr(lr, batch[0].shape))  # in bf16, as gmuon scales it
            for p, update in zip(batch, _local_rows(ortho, batch).unbind(0)):
                local = _local(p)
                if wd != 0:
                    local.mul_(1 - lr * wd)
                local.sub_(update)

    def _shape_batches(self, params: list[torch.Tensor]) -> list[list[int]]:
        """Indices of params that share a global shape (and sharding), in parameter order, cut to ns_max_batch."""
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            layout = (p.device_mesh, p.placements) if isinstance(p, DTensor) else (None, None)
            groups.setdefault((tuple(p.shape), p.dtype, *layout), []).append(i)
        size = self.ns_max_batch
        batches = []
        for idx in groups.values():
            step = size or len(idx)
            batches.extend(idx[k:k + step] for k in range(0, len(idx), step))
        return batches

    # ------------------------------------------------------------------ AdamW

    def _adamw_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("AdamW (gmuon's fallback) does not take sparse gradients")
            state = self.state[p]
            if not state:
                # the fused kernel reads the step count on the parameter's device (torch's AdamW does the same)
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        # torch's own AdamW arithmetic (RAEv2 runs torch.optim.AdamW), fused or foreach as the group chose
        adamw_update(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"],
                     fused=group["fused"] or None, amsgrad=False,
                     beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=False)


def _check_matrix(p: torch.Tensor, *, swapped_in: bool = False) -> None:
    """Muon's parameters must be 2-D. swapped_in: checked at step time, after construction accepted the
    group, so a non-matrix there was put in by a wrapper (DeepSpeed ZeRO's flat partitions)."""
    if p.ndim == 2:
        return
    if swapped_in:
        raise ValueError(f"Muon orthogonalises 2-D matrices only, but its group now holds a tensor of shape "
                         f"{tuple(p.shape)} that was not there at construction: DeepSpeed ZeRO replaces the "
                         f"parameters by flat partitions, so this optimizer cannot run under ZeRO (use strategy "
                         f"ddp or fsdp)")
    raise ValueError(f"Muon orthogonalises 2-D matrices only; got a parameter of shape {tuple(p.shape)}. "
                     f"Put non-2-D parameters in an 'adamw' group (split_muon_params does).")


def muon(section, lr: float | None = None) -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]:
    """The optimizer factory a strategy's wrap() takes: params -> MuonWithAdamW with the section's settings.

    Reads: lr, betas, weight_decay, eps (shared with adamw), momentum, nesterov, ns_safety_factor,
    ns_restart_iterations, ns_max_batch. lr: the base learning rate, when not the section's own.
    """
    base_lr = section.lr if lr is None else lr
    settings = dict(momentum=section.momentum, nesterov=section.nesterov, weight_decay=section.weight_decay,
                    betas=tuple(section.betas), eps=section.eps,
                    ns_coefficients=polar_express_coefficients(section.ns_safety_factor),
                    ns_restart_iterations=tuple(section.ns_restart_iterations), ns_max_batch=section.ns_max_batch,
                    implementation=getattr(section, "implementation", "auto"))
    # checked now, so a bad config fails when the job starts rather than when the model is wrapped
    MuonWithAdamW([torch.zeros(1, 1)], lr=base_lr, **settings)

    def build(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return MuonWithAdamW(params, lr=base_lr, **settings)

    return build
