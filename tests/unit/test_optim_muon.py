"""gmuon (MuonWithAdamW) against RAEv2's own optimizer run (raev2/gmuon.pt), plus its contracts."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from rae_scale.optim import muon
from rae_scale.optim.muon import MuonWithAdamW, muon_adjusted_lr, split_muon_params
from rae_scale.optim.newton_schulz import (DEFAULT_RESTART_ITERATIONS, POLAR_EXPRESS_COEFFICIENTS,
                                           orthogonalize, polar_express_coefficients)

CASES = ["wd0", "wd0p1"]
PARAM_REL = 1e-3  # the bound on the parameters after each step
# On the update itself (params_after - params_before). The CPU's own fp16 kernels reproduce the
# fixture bit for bit here (observed 0); the default fp32-accumulated emulation differs by fp32
# summation order only: observed <= 1.8e-3 (the square matrix, standard NS), 0 elsewhere to 1.8e-4.
UPDATE_REL = 5e-3


@pytest.fixture
def gmuon(fixtures_dir):
    return torch.load(fixtures_dir / "raev2" / "gmuon.pt", weights_only=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def build(case: dict, emulate: bool = True):
    """Named parameters at the fixture's init and the optimizer RAEv2's config describes."""
    cfg = case["optimizer_config"]
    params = {n: torch.nn.Parameter(t.clone()) for n, t in case["init"].items()}
    opt = MuonWithAdamW(list(params.values()), lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                        weight_decay=cfg["weight_decay"], betas=cfg["betas"], eps=cfg["eps"],
                        ns_emulate_half_on_cpu=emulate)
    return params, opt


def apply_grads(params: dict, grads: dict) -> None:
    for n, p in params.items():
        p.grad = grads[n].clone()


@pytest.mark.parametrize("case", CASES)
def test_parameter_split_is_ndim_2(gmuon, case):
    c = gmuon[case]
    params, opt = build(c)
    name_of = {id(p): n for n, p in params.items()}
    split = {g["algorithm"]: [name_of[id(p)] for p in g["params"]] for g in opt.param_groups}
    assert split == {"muon": c["muon_params"], "adamw": c["adamw_params"]}
    assert [g["algorithm"] for g in split_muon_params(params.values())] == ["muon", "adamw"]


@pytest.mark.parametrize("case", CASES)
def test_adjusted_lr(gmuon, case):
    c = gmuon[case]
    lr = c["optimizer_config"]["lr"]
    for name, expected in c["adjusted_lr"].items():
        assert muon_adjusted_lr(lr, c["init"][name].shape) == pytest.approx(expected, rel=1e-14)


def test_polar_express_coefficients_and_restarts(gmuon):
    expected = tuple(tuple(abc) for abc in gmuon["polar_express_coefficients"])
    assert POLAR_EXPRESS_COEFFICIENTS == expected == polar_express_coefficients(1.05)
    for case in CASES:
        assert tuple(gmuon[case]["restart_iterations"]) == DEFAULT_RESTART_ITERATIONS


@pytest.mark.parametrize("emulate", [True, False], ids=["emulated-fp16", "native-fp16"])
@pytest.mark.parametrize("case", CASES)
def test_three_steps_reproduce_raev2(gmuon, case, emulate):
    c = gmuon[case]
    params, opt = build(c, emulate)
    before = {n: t.clone() for n, t in c["init"].items()}
    for step, grads in enumerate(c["grads"]):
        apply_grads(params, grads)
        opt.step()
        for n, p in params.items():
            ref = c["params_after_step"][step][n]
            assert rel(p.detach(), ref) <= PARAM_REL, (step, n)
            assert rel(p.detach() - before[n], ref - before[n]) <= UPDATE_REL, (step, n)
            state = c["state_after_step"][step][n]
            if n in c["muon_params"]:
                assert rel(opt.state[p]["momentum_buffer"], state) <= 1e-6, (step, n)
            else:
                assert float(opt.state[p]["step"]) == step + 1
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(opt.state[p][key], state[key], rtol=1e-6, atol=0)
        before = {n: c["params_after_step"][step][n] for n in params}


def test_state_dict_round_trip_mid_run_continues_identically(gmuon):
    c = gmuon["wd0p1"]
    params, opt = build(c)
    apply_grads(params, c["grads"][0])
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    # the Muon momentum is an ordinary per-parameter entry shaped like its parameter (DCP reshards those)
    muon_ids = [i for g in saved["param_groups"] if g["algorithm"] == "muon" for i in g["params"]]
    assert len(muon_ids) == len(c["muon_params"])
    for i, name in zip(muon_ids, c["muon_params"]):
        assert set(saved["state"][i]) == {"momentum_buffer"}
        assert saved["state"][i]["momentum_buffer"].shape == c["init"][name].shape

    resumed_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    cfg = c["optimizer_config"]
    resumed = MuonWithAdamW(list(resumed_params.values()), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    resumed.load_state_dict(saved)
    for grads in c["grads"][1:]:
        for ps, o in ((params, opt), (resumed_params, resumed)):
            apply_grads(ps, grads)
            o.step()
    for n in params:
        assert torch.equal(params[n], resumed_params[n]), n


def test_one_lambdalr_scales_muon_and_adamw_groups(gmuon):
    c = gmuon["wd0p1"]
    params, opt = build(c)
    sched = LambdaLR(opt, lambda step: 0.0)  # lr 0: neither group may move a weight, not even by decay
    assert len(opt.param_groups) == 2 and all(g["lr"] == 0.0 for g in opt.param_groups)
    apply_grads(params, c["grads"][0])
    opt.step()
    sched.step()
    for n, p in params.items():
        assert torch.equal(p.detach(), c["init"][n]), n


def test_orthogonalize_transpose_rule_batching_and_spectrum():
    g = torch.Generator().manual_seed(0)
    for shape in [(24, 40), (40, 24), (32, 32)]:
        u = torch.randn(3, *shape, generator=g).to(torch.bfloat16)
        out = orthogonalize(u)
        assert out.dtype == torch.bfloat16 and out.shape == u.shape
        of_transpose = orthogonalize(u.mT.contiguous()).mT
        if shape[0] != shape[1]:  # a tall matrix is orthogonalised as its wide transpose, exactly
            assert torch.equal(of_transpose, out)
        else:  # a square one is not transposed: the same polar factor, other rounding
            assert rel(of_transpose.float(), out.float()) < 1e-2
        assert torch.equal(orthogonalize(u[1]), out[1])  # a matrix's result ignores its batch mates
        sv = torch.linalg.svdvals(out.float())
        # Polar-Express with safety 1.05 maps every singular value close to 1
        assert sv.min() > 0.6 and sv.max() < 1.25, (shape, sv.min(), sv.max())


def test_ns_max_batch_does_not_change_the_result(gmuon):
    c = gmuon["wd0"]
    results = []
    for max_batch in (None, 1):
        params, opt = build(c)
        opt.ns_max_batch = max_batch
        for grads in c["grads"]:
            apply_grads(params, grads)
            opt.step()
        results.append({n: p.detach().clone() for n, p in params.items()})
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n


def test_builder_reads_the_section():
    section = SimpleNamespace(lr=1e-3, betas=[0.9, 0.95], weight_decay=0.05, eps=1e-8, momentum=0.9,
                              nesterov=False, ns_safety_factor=1.01, ns_restart_iterations=[2, 3], ns_max_batch=4)
    weight, bias = torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(4))
    opt = muon(section, lr=2e-4)([weight, bias])
    muon_group, adamw_group = opt.param_groups
    assert muon_group["params"] == [weight] and adamw_group["params"] == [bias]
    assert muon_group["lr"] == 2e-4 and muon_group["momentum"] == 0.9 and muon_group["nesterov"] is False
    assert adamw_group["betas"] == (0.9, 0.95) and adamw_group["weight_decay"] == 0.05
    assert opt.ns_coefficients == polar_express_coefficients(1.01) and opt.ns_restart_iterations == (2, 3)
    assert opt.ns_max_batch == 4
    with pytest.raises(ValueError, match="momentum=1.0"):  # a bad section fails when the factory is made
        muon(SimpleNamespace(**{**vars(section), "momentum": 1.0}))
    with pytest.raises(ValueError, match="safety_factor=0.9 must be >= 1"):
        muon(SimpleNamespace(**{**vars(section), "ns_safety_factor": 0.9}))


@pytest.mark.parametrize("kwargs, message", [
    (dict(momentum=1.0), r"momentum=1.0 .* in \[0.0, 1.0\)"),
    (dict(momentum=-0.1), "momentum=-0.1"),
    (dict(momentum="0.95"), "momentum='0.95'"),
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    (dict(nesterov=1), "nesterov"),
    (dict(ns_restart_iterations=[0]), "ns_restart_iterations"),
    (dict(ns_restart_iterations=[5]), "ns_restart_iterations"),
    (dict(ns_coefficients=[(1.0, 2.0)]), "triples"),
    (dict(ns_epsilon=0.0), "ns_epsilon"),
    (dict(ns_max_batch=0), "ns_max_batch"),
])
def test_bad_settings_are_refused(kwargs, message):
    settings = {"lr": 2e-4, **kwargs}
    with pytest.raises(ValueError, match=message):
        MuonWithAdamW([torch.nn.Parameter(torch.zeros(4, 3))], **settings)


def test_non_matrix_forced_into_muon_is_refused():
    conv = torch.nn.Parameter(torch.zeros(8, 4, 1, 1))
    with pytest.raises(ValueError, match=r"2-D matrices only; got a parameter of shape \(8, 4, 1, 1\)"):
        MuonWithAdamW([{"params": [conv], "algorithm": "muon"}], lr=2e-4)
    with pytest.raises(ValueError, match="'algorithm' set to one of"):
        MuonWithAdamW([{"params": [conv]}], lr=2e-4)
    # a parameter flattened after construction (what DeepSpeed ZeRO does) is caught at step time
    weight = torch.nn.Parameter(torch.zeros(4, 3))
    opt = MuonWithAdamW([weight], lr=2e-4)
    flat = torch.nn.Parameter(torch.zeros(12))
    flat.grad = torch.ones(12)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ValueError, match="DeepSpeed ZeRO"):
        opt.step()
