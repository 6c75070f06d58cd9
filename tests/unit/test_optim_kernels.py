"""The optimizer kernel choice (issue 23): fused AdamW on accelerators, foreach on the CPU; the numbers agree."""
from __future__ import annotations

import copy

import pytest
import torch

from rae_scale.config.schema import OptimizerConfig
from rae_scale.optim import MuonWithAdamW, optimizer_factory
from rae_scale.optim.adamw import kernel_kwargs


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # a matrix, a vector and an odd-sized tensor (the fused kernel's vector tail)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((24, 16), (16,), (3, 5, 7))]


def _run(implementation: str, kind: str = "adamw", steps: int = 6) -> list[torch.Tensor]:
    section = OptimizerConfig(kind=kind, lr=1e-2, weight_decay=0.05, implementation=implementation)
    params = _params()
    opt = optimizer_factory(section)(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_fused_agrees_with_foreach_and_loop(kind):
    fused, opt = _run("fused", kind)
    adamw_groups = [g for g in opt.param_groups if g.get("algorithm", "adamw") == "adamw"]
    assert adamw_groups and all(g["fused"] for g in adamw_groups)
    foreach, _ = _run("foreach", kind)
    loop, _ = _run("loop", kind)
    start = _params()
    for a, b, c, p0 in zip(fused, foreach, loop, start):
        assert torch.equal(b, c)  # foreach and the per-tensor loop share torch's arithmetic
        # fused reorders a few operations: agreement to float32 rounding, and the parameters did move
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert (a - p0).abs().max() > 1e-3


def test_fused_state_saves_and_resumes_bitwise():
    _, opt = _run("fused", "muon", steps=3)
    params = [p for g in opt.param_groups for p in g["params"]]
    state = copy.deepcopy(opt.state_dict())  # load_state_dict keeps the same tensors, and step mutates them
    again = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = optimizer_factory(OptimizerConfig(kind="muon", lr=1e-2, weight_decay=0.05, implementation="fused"))(again)
    fresh.load_state_dict(state)
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for o, ps in ((opt, params), (fresh, again)):
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        o.step()
    for a, b in zip(params, again):
        assert torch.equal(a, b)


def test_fused_where_it_cannot_run_is_a_clear_error():
    meta = [torch.nn.Parameter(torch.zeros(2, device="meta"))]
    assert kernel_kwargs("auto", meta) == {"foreach": True}
    # auto keeps the CPU on foreach (see optim.adamw.kernel_kwargs); CUDA parameters would take fused
    assert kernel_kwargs("auto", _params()) == {"foreach": True}
    if torch.cuda.is_available():
        assert kernel_kwargs("auto", [p.cuda() for p in _params()]) == {"fused": True}
    with pytest.raises(ValueError, match="implementation=fused needs float parameters"):
        kernel_kwargs("fused", meta)
    with pytest.raises(ValueError, match="allowed: auto, fused, foreach, loop"):
        MuonWithAdamW(_params(), lr=1e-3, implementation="fast")
