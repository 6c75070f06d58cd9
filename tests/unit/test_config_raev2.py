"""RAEv2's stage-2 settings in the config: the dit_dh_ig network, x-prediction, IG sampling."""
from pathlib import Path

import pytest
import torch

from rae_scale import config as C
from rae_scale.builders import build_dit_model
from rae_scale.eval.spec import sampling_spec

REPO = Path(__file__).resolve().parents[2]
RAEV2_TINY = REPO / "configs/stage2/raev2_tiny_cpu.yaml"
TINY2 = REPO / "configs/stage2/tiny_cpu.yaml"
NO_STATS = ["rae.stats_path=null"]  # the spec identifies files by content; these tests have none


def test_tiny_raev2_config_builds_an_ig_network_that_predicts_x_and_its_base():
    cfg = C.load_config(C.Stage2Job, RAEV2_TINY)
    assert (cfg.dit.model, cfg.transport.prediction, cfg.sampler.grid, cfg.guidance.method) == \
        ("dit_dh_ig", "x", "raev2", "ig")
    model = build_dit_model(cfg.dit)
    c, s = cfg.dit.in_channels, cfg.dit.input_size
    x_full, x_base = model(torch.randn(2, c, s, s), torch.rand(2), torch.tensor([0, cfg.dit.num_classes]))
    assert x_full.shape == x_base.shape == (2, c, s, s)
    assert model.base_model_depth == cfg.dit.base_model_depth
    assert model.t_embedder.learnable_tokens.shape[0] == cfg.dit.num_t_tokens


def test_xl_preset_fills_raev2_sizes():
    cfg = C.load_config(C.Stage2Job, RAEV2_TINY, ["dit.preset=XL", "dit.hidden_size=null", "dit.depth=null",
                                                  "dit.num_heads=null", "dit.base_model_depth=8"])
    assert (cfg.dit.hidden_size, cfg.dit.depth, cfg.dit.num_heads) == ([1440, 2048], [28, 2], [20, 16])


@pytest.mark.parametrize("override, fragment", [
    (["dit.use_qknorm=true"], "'dit.use_qknorm'=True applies to dit_dh and lightning_dit"),
    (["dit.base_model_depth=3"], "'dit.base_model_depth'=3 is deeper than the body (dit.depth[0]=2)"),
    (["dit.depth=[2]"], "allowed: a list of 2 integer(s) for dit.model=dit_dh_ig (body, head)"),
    (["guidance.method=ig", "guidance.ig_scale=2.0"], None),  # fine for dit_dh_ig
])
def test_dit_dh_ig_keys_are_checked(override, fragment):
    if fragment is None:
        C.load_config(C.Stage2Job, RAEV2_TINY, override)
        return
    with pytest.raises(C.ConfigError) as err:
        C.load_config(C.Stage2Job, RAEV2_TINY, override)
    assert fragment in str(err.value)


def test_internal_guidance_needs_the_ig_network():
    with pytest.raises(C.ConfigError, match="needs a network with an internal-guidance head"):
        C.load_config(C.Stage2Job, TINY2, ["guidance.method=ig", "guidance.ig_scale=1.5"])


def test_sampling_spec_records_what_acts_and_keeps_velocity_specs_unchanged():
    """An evaluation's spec names the x-prediction, the grid and the IG settings; a velocity model's
    spec has none of the new keys, so evaluations recorded before them still resume."""
    x = sampling_spec(C.from_generator(C.SampleJob, C.load_config(C.Stage2Job, RAEV2_TINY, NO_STATS)))
    assert x["prediction"] == {"kind": "x", "t_eps": 0.05} and x["sampler"]["grid"] == "raev2"
    assert x["guidance"] == {"method": "ig", "ig_scale": 1.78, "ig_t_min": 0.1, "ig_t_max": 1.0,
                             "ig_unconditional_scale": None}
    v = sampling_spec(C.from_generator(C.SampleJob, C.load_config(C.Stage2Job, TINY2, NO_STATS)))
    assert "prediction" not in v and "grid" not in v["sampler"]


def test_muon_is_refused_under_deepspeed_and_builds_otherwise():
    with pytest.raises(C.ConfigError, match="optimizer.kind'=muon cannot run under parallel.strategy=deepspeed"):
        C.load_config(C.Stage2Job, RAEV2_TINY, ["parallel.strategy=deepspeed"])
    from rae_scale.optim import MuonWithAdamW, optimizer_factory

    cfg = C.load_config(C.Stage2Job, RAEV2_TINY)
    model = build_dit_model(cfg.dit)
    opt = optimizer_factory(cfg.optimizer)(list(model.parameters()))
    assert isinstance(opt, MuonWithAdamW)
    muon_params = {id(p) for g in opt.param_groups if g["algorithm"] == "muon" for p in g["params"]}
    assert muon_params == {id(p) for p in model.parameters() if p.ndim == 2}
    # the 1x1 patch embeddings stay 4-D convs: AdamW's, as in RAEv2
    assert id(model.s_embedder.proj.weight) not in muon_params and model.s_embedder.proj.weight.ndim == 4
    with pytest.raises(C.ConfigError, match="ns_restart_iterations"):
        C.load_config(C.Stage2Job, RAEV2_TINY, ["optimizer.ns_restart_iterations=[7]"])
