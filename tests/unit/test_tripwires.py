"""Tripwires' checks on computed numbers: class separation against its definition (and on features that
do or do not depend on the class), the loss of predicting zero against its closed forms, the verdicts,
the policies (warn / stop / off) and the config keys. The broken tiny run is
tests/distributed/test_tripwires_run.py."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from rae_scale import config as C
from rae_scale.diffusion.transport import Transport
from rae_scale.train import tripwires as T
from rae_scale.train.state import TrainState

TINY2 = Path(__file__).resolve().parents[2] / "configs/stage2/tiny_cpu.yaml"


def _anova_f(x: np.ndarray, labels: np.ndarray) -> float:
    """The F-ratio written out class by class (float64 numpy), as the module docstring defines it."""
    classes = sorted(set(labels.tolist()))
    mu = x.mean(0)
    between = within = 0.0
    for c in classes:
        xc = x[labels == c]
        between += len(xc) * np.sum((xc.mean(0) - mu) ** 2)
        within += np.sum((xc - xc.mean(0)) ** 2)
    return (between / (len(classes) - 1)) / (within / (len(x) - len(classes)))


def test_class_separation_matches_its_definition_and_tells_conditional_from_ignored_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 10
    noise = torch.randn(600, 32, generator=g)
    offsets = torch.randn(10, 32, generator=g)
    conditional = noise + 0.5 * offsets[labels]
    assert T.class_separation(conditional, labels) == pytest.approx(_anova_f(conditional.numpy(), labels.numpy()),
                                                                    rel=1e-9)
    assert T.class_separation(conditional, labels) > 5
    # the class does not act: both mean squares estimate the same variance
    assert 0.7 < T.class_separation(noise, labels) < 1.4
    unequal = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    assert T.class_separation(x, unequal) == pytest.approx(_anova_f(x.numpy(), unequal.numpy()), rel=1e-9)


def test_real_digits_pass_the_class_check_and_fail_it_with_shuffled_labels():
    """The data itself is a perfect class-conditional generator; with its labels shuffled the class no
    longer says anything about the image (a run whose conditioning is useless)."""
    from data_pipeline.images import load_digits

    images, classes = load_digits()
    x, y = torch.from_numpy(images[:300].reshape(300, -1)), torch.from_numpy(classes[:300])
    assert T.check_class_separation(x, y, 1.5).passed
    shuffled = y[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    assert not T.check_class_separation(x, shuffled, 1.5).passed


@pytest.mark.parametrize("n,labels", [(10, torch.arange(10)), (5, torch.zeros(5, dtype=torch.long))])
def test_class_separation_refuses_what_it_cannot_measure(n, labels):
    with pytest.raises(ValueError, match="2 or more classes and more samples than classes"):
        T.class_separation(torch.randn(n, 3), labels)
    with pytest.raises(ValueError, match=r"features \[N, D\] and labels \[N\]"):
        T.class_separation(torch.randn(n, 3, 2), labels)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(16, 4, 3, 3, generator=g) + 0.3
    eps = torch.randn(16, 4, 3, 3, generator=g)
    t = torch.rand(16, generator=g, dtype=torch.float64).float() * 0.9 + 0.01
    return z, t, eps


def test_zero_prediction_loss_closed_forms():
    z, t, eps = _batch()
    velocity = Transport(prediction="velocity")
    # velocity prediction: the target is eps - z, so predicting zero costs E (eps - z)^2
    got = T.zero_prediction_loss(velocity, z, t, eps, two_heads=False, device=torch.device("cpu"))
    assert got == pytest.approx((eps - z).double().pow(2).mean().item(), rel=1e-6)
    # x-prediction with x_hat = 0: v_hat = x_t / max(t, t_eps), v_t = (x_t - z) / max(t, t_eps)
    x = Transport(prediction="x", t_eps=0.05)
    scale = t.clamp(min=0.05).double().view(-1, 1, 1, 1)
    expected = (z.double() / scale).pow(2).mean().item()
    got = T.zero_prediction_loss(x, z, t, eps, two_heads=False, device=torch.device("cpu"))
    assert got == pytest.approx(expected, rel=1e-5)
    # an internal-guidance model's two heads both predicting zero
    two = T.zero_prediction_loss(Transport(prediction="x", t_eps=0.05, base_model_coeff=0.5), z, t, eps,
                                 two_heads=True, device=torch.device("cpu"))
    assert two == pytest.approx(1.5 * expected, rel=1e-5)


def test_a_zero_initialised_network_scores_exactly_the_zero_loss():
    """What the loss check sees from a network that never trained: loss / zero loss = 1."""
    from rae_scale.builders import build_dit_model

    cfg = C.load_config(C.Stage2Job, TINY2)
    torch.manual_seed(0)
    model = build_dit_model(cfg.dit).eval()
    transport = Transport(prediction="velocity")
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(4, 32, 8, 8, generator=g), torch.randn(4, 32, 8, 8, generator=g)
    t, y = torch.rand(4, generator=g), torch.arange(4)
    with torch.no_grad():
        loss = transport.loss_parts(lambda x_t, tt: model(x_t, tt, y), z, t, eps).total.double().mean().item()
    zero = T.zero_prediction_loss(transport, z, t, eps, two_heads=False, device=torch.device("cpu"))
    result = T.check_loss(loss, zero, 0.9)
    assert result.value == pytest.approx(1.0, abs=1e-6) and not result.passed


def test_verdicts_and_their_columns():
    ok = T.check_samples_vs_noise(100.0, 400.0, 0.0, 0.8)  # no floor: the plain ratio
    assert ok.passed and ok.value == 0.25
    bad = T.check_samples_vs_noise(390.0, 400.0, 0.0, 0.8)
    assert not bad.passed and bad.columns() == {
        "tripwire_samples_vs_noise": 0.975, "tripwire_samples_vs_noise_passed": False,
        "tripwire_samples_vs_noise_fid": 390.0, "tripwire_samples_vs_noise_noise_fid": 400.0,
        "tripwire_samples_vs_noise_floor_fid": 0.0}
    assert "FID of the samples 390" in bad.message(7) and "decoded Gaussian noise 400" in bad.message(7)
    # with the floor: the quickstart's healthy 32-px digits at 200 samples (samples 315.2, noise 329.4, the
    # data's own latents decoded 297.4) leave 0.56 of the gap, where the plain ratio 0.96 would have tripped
    healthy = T.check_samples_vs_noise(315.2, 329.4, 297.4, 0.8)
    assert healthy.passed and healthy.value == pytest.approx((315.2 - 297.4) / (329.4 - 297.4))
    assert "of the data's own latents decoded 297.4" in healthy.detail
    # samples that are the decoded noise leave the whole gap, whatever the floor
    assert T.check_samples_vs_noise(329.4, 329.4, 297.4, 0.8).value == 1.0
    # a decoder through which the data look no closer than noise: nothing to judge
    assert T.check_samples_vs_noise(380.0, 378.2, 379.5, 0.8) is None
    assert T.check_loss(1.0, 0.0, 0.9).value == float("inf")  # no signal to learn: nothing passes
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    sep = T.check_class_separation(torch.randn(40, 8, generator=g) + 3 * (labels[:, None] == torch.arange(8)),
                                   labels, 1.5)
    assert sep.passed and "40 samples of 4 classes" in sep.detail


def _tripwires(policy: str, steps=(10, 20)):
    cfg = C.load_config(C.Stage2Job, TINY2, [f"tripwire.loss_steps=[{','.join(map(str, steps))}]"])
    state = TrainState()
    return T.Tripwires(cfg.tripwire, policy, state, rank=0), state


def test_warn_logs_one_warning_naming_the_check_and_numbers_and_goes_on(caplog):
    wires, _ = _tripwires("warn")
    assert wires.loss_due(10) and wires.loss_due(20) and not wires.loss_due(15)
    with caplog.at_level(logging.WARNING, logger="rae_scale.train.tripwires"):
        wires.loss_check(10, 1.98, 2.0)
    [record] = caplog.records
    assert "tripwire loss_vs_zero failed at step 10: 0.99 must be below 0.9" in record.getMessage()
    assert "window-mean loss 1.98, loss of predicting zero 2" in record.getMessage()
    assert wires.stop_reason is None and wires.has_row()
    assert wires.pop_row() == {"tripwire_loss_vs_zero": pytest.approx(0.99), "tripwire_loss_vs_zero_passed": False}
    assert not wires.has_row()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rae_scale.train.tripwires"):
        wires.loss_check(20, 1.0, 2.0)
    assert not caplog.records and wires.pop_row()["tripwire_loss_vs_zero_passed"] is True


def test_stop_remembers_the_first_failure_and_off_checks_nothing():
    wires, state = _tripwires("stop")
    wires.loss_check(10, 1.0, 2.0)
    assert wires.stop_reason is None
    wires.record([T.check_samples_vs_noise(399.0, 400.0, 100.0, 0.8), T.check_loss(2.0, 2.0, 0.9)], 10)
    assert wires.stop_reason.startswith("tripwire samples_vs_noise failed at step 10")
    assert wires.samples_due()
    wires.samples_checked(10)
    assert not wires.samples_due() and state.extra[T.SAMPLES_CHECKED] == 10
    off, _ = _tripwires("off")
    assert not off.loss_due(10) and not off.samples_due()
    with pytest.raises(ValueError, match="warn, stop or off"):
        T.Tripwires(off.cfg, "maybe", TrainState(), 0)


@pytest.mark.parametrize("override,fragment", [
    ("training.on_tripwire=halt", "warn"),
    ("tripwire.loss_steps=[0]", "a list of optimizer steps >= 1"),
    ("tripwire.max_fid_ratio=0", "tripwire.max_fid_ratio"),
    ("tripwire.min_class_separation=-1", "tripwire.min_class_separation"),
])
def test_bad_tripwire_settings_name_the_key(override, fragment):
    with pytest.raises(C.ConfigError, match=fragment):
        C.load_config(C.Stage2Job, TINY2, [override])


def test_the_floor_decodes_data_item_i_as_evaluation_sample_i():
    """data_sample_fn hands evaluation sample i (known to it only by its seed) the i-th data item, decoded
    as a sample is, in any order and batch split the ranks ask for."""
    from rae_scale.eval.features import sample_seeds

    class Halve:  # a stand-in decoder: the image is the latent's first three channels halved
        def decode(self, z):
            return type("Out", (), {"sample": z[:, :3] * 0.5})()

    items = torch.rand(6, 4, 2, 2)
    fn = T.data_sample_fn(Halve(), lambda i: items[i], lambda x: x * 2.0, 6, seed=3, device="cpu")
    idx = torch.tensor([4, 1, 5])
    got = fn(torch.zeros(3, dtype=torch.long), sample_seeds(3, idx))
    assert torch.equal(got, (items[idx][:, :3].clamp(0, 1) * 255).to(torch.uint8))
