"""A tiny stage-2 run that cannot learn (learning rate 0) trips every tripwire at its first online
evaluation and, with training.on_tripwire=stop, saves and ends there on both ranks with the tripwire's
exit code. The checks themselves are tested on computed numbers in tests/unit/test_tripwires.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from train_cli import data_overrides, run_train

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference_and_decoder(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """A seeded decoder saved as a decoder checkpoint (the FID check runs only with one), and as the
    reference what it makes of the data: the first 40 cached latents decoded, as an ADM-style npz. Through a
    random decoder real digits are as far from anything as noise; against its own picture of the data the
    check's floor (the data's first latents decoded) lies well below decoded noise, so the check can judge."""
    import torch
    from safetensors.torch import save_file

    from rae_scale import config as C
    from rae_scale.builders import build_rae
    from rae_scale.data.loader import build_latent_loader

    folder = tmp_path_factory.mktemp("tripwire_inputs")
    cfg = C.load_config(C.Stage2Job, REPO / "configs/stage2/tiny_cpu.yaml", data_overrides(tiny_data))
    torch.manual_seed(0)
    rae = build_rae(cfg.rae, load_decoder_weights=False, with_encoder=False).eval()
    save_file({k: v.contiguous() for k, v in rae.decoder.state_dict().items()}, str(folder / "decoder.safetensors"))
    latents = next(iter(build_latent_loader(str(tiny_data / "latents"), batch_size=40, shuffle=False, hflip=False,
                                            drop_last=False)))[0]
    with torch.no_grad():
        images = (rae.decode(rae.normalize(latents)).sample.float().clamp(0, 1) * 255).to(torch.uint8)
    np.savez(folder / "decoded40.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    return folder / "decoded40.npz", folder / "decoder.safetensors"


def test_a_run_with_learning_rate_zero_trips_at_its_first_evaluation_and_stops(tiny_data, reference_and_decoder,
                                                                                tmp_path):
    from rae_scale.checkpoint import CheckpointManager
    from rae_scale.train.metrics import read_metrics
    from rae_scale.train.tripwires import EXIT_CODE_TRIPWIRE

    reference, decoder = reference_and_decoder
    run = tmp_path / "run"
    overrides = data_overrides(tiny_data) + [
        f"run.dir={run}", "optimizer.lr=0", "training.max_steps=4", "checkpoint.every_steps=1000",
        "eval.every_steps=2", "eval.num_samples=20", "sampler.num_steps=2", f"eval.reference={reference}",
        f"rae.decoder_checkpoint={decoder}", "tripwire.loss_steps=[2]", "training.on_tripwire=stop",
        "eval.fid_k=[100000,1]"]
    assert run_train("stage2", overrides, nproc=2) == EXIT_CODE_TRIPWIRE

    rows = read_metrics(str(run))
    assert rows[-1]["step"] == 2  # stopped at the first evaluation, not at max_steps
    last = rows[-1]
    # the network never left its zero-initialised output: its loss is the zero prediction's and its
    # samples are the sampler's starting noise, decoded: they leave the whole gap between the floor (the
    # data's first 20 latents decoded) and decoded noise
    assert last["tripwire_loss_vs_zero"] == pytest.approx(1.0, abs=1e-6)
    assert last["tripwire_samples_vs_noise"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < last["tripwire_samples_vs_noise_floor_fid"] < 0.8 * last["tripwire_samples_vs_noise_noise_fid"]
    assert last["tripwire_samples_vs_noise_fid"] == last["tripwire_samples_vs_noise_noise_fid"]
    assert last["tripwire_class_separation"] < 1.5
    assert not any(last[f"tripwire_{c}_passed"] for c in ("loss_vs_zero", "samples_vs_noise", "class_separation"))
    # E@FID-k: a k this FID reaches is recorded at this step, one it does not reach is absent
    assert last["eval_steps_to_fid_100000"] == 2 and "eval_steps_to_fid_1" not in last
    # saved where it stopped
    assert CheckpointManager(str(run), async_save=False, rank=0).committed_steps() == [2]


@pytest.mark.parametrize("source", ["latents", "images"])
def test_the_floor_is_the_datas_own_first_latents_decoded(tiny_data, source):
    """samples_vs_noise's floor hands evaluation sample i the data's i-th latent decoded: from the latent
    cache, or (data.source=images) the i-th image encoded by the run's encoder, as the run would make it."""
    import torch

    from rae_scale import config as C
    from rae_scale.builders import build_rae
    from rae_scale.data.loader import build_image_loader, build_latent_loader
    from rae_scale.eval.features import sample_seeds
    from rae_scale.parallel.dist import DistInfo
    from rae_scale.train.online_eval import Stage2OnlineFID

    cfg = C.load_config(C.Stage2Job, REPO / "configs/stage2/tiny_cpu.yaml",
                        data_overrides(tiny_data) + [f"data.source={source}", "eval.every_steps=10", "eval.num_samples=7"])
    torch.manual_seed(0)
    rae = build_rae(cfg.rae, load_decoder_weights=False, with_encoder=source == "images").eval()
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), False)
    fid = Stage2OnlineFID(cfg, torch.nn.Identity(), info, 4, lambda: rae)
    fid._rae = rae  # what _setup builds first
    fn, why_not = fid._data_floor_fn()
    assert why_not is None
    if source == "latents":
        raw = next(iter(build_latent_loader(str(tiny_data / "latents"), batch_size=7, shuffle=False, hflip=False,
                                            drop_last=False)))[0]
        z = rae.normalize(raw)
    else:
        x = next(iter(build_image_loader(str(tiny_data / "shards"), batch_size=7, shuffle=False, hflip=False,
                                         drop_last=False)))[0]
        z = rae.encode(x).latent
    with torch.no_grad():
        want = (rae.decode(z).sample.float().clamp(0, 1) * 255).to(torch.uint8)
    idx = torch.tensor([2, 5, 6])  # one rank's work unit
    got = fn(torch.zeros(3, dtype=torch.long), sample_seeds(cfg.run.seed, idx))
    assert (got.int() - want[idx].int()).abs().max() <= 1  # batch composition may round one level apart
    # a dataset smaller than eval.num_samples gives no floor, and says why
    fid.cfg = C.load_config(C.Stage2Job, REPO / "configs/stage2/tiny_cpu.yaml",
                            data_overrides(tiny_data) + [f"data.source={source}", "eval.num_samples=100000"])
    fn, why_not = fid._data_floor_fn()
    assert fn is None and "fewer than eval.num_samples=100000" in why_not
