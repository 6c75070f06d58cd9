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
    """40 real digits as an ADM-style npz reference, and a seeded decoder saved as a decoder checkpoint
    (the FID check runs only with one: a random decoder makes even the data look like noise)."""
    import torch
    from safetensors.torch import save_file

    from rae_scale import config as C
    from rae_scale.builders import build_rae
    from rae_scale.eval.reference import iter_mds_images

    folder = tmp_path_factory.mktemp("tripwire_inputs")
    images = next(iter(iter_mds_images(tiny_data / "shards", batch_size=40)))
    np.savez(folder / "digits40.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    cfg = C.load_config(C.Stage2Job, REPO / "configs/stage2/tiny_cpu.yaml", data_overrides(tiny_data))
    torch.manual_seed(0)
    rae = build_rae(cfg.rae, load_decoder_weights=False, load_stats=False)
    save_file({k: v.contiguous() for k, v in rae.decoder.state_dict().items()}, str(folder / "decoder.safetensors"))
    return folder / "digits40.npz", folder / "decoder.safetensors"


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
    # samples are the sampler's starting noise, decoded
    assert last["tripwire_loss_vs_zero"] == pytest.approx(1.0, abs=1e-6)
    assert last["tripwire_samples_vs_noise"] == pytest.approx(1.0, abs=1e-6)
    assert last["tripwire_class_separation"] < 1.5
    assert not any(last[f"tripwire_{c}_passed"] for c in ("loss_vs_zero", "samples_vs_noise", "class_separation"))
    # E@FID-k: a k this FID reaches is recorded at this step, one it does not reach is absent
    assert last["eval_steps_to_fid_100000"] == 2 and "eval_steps_to_fid_1" not in last
    # saved where it stopped
    assert CheckpointManager(str(run), async_save=False, rank=0).committed_steps() == [2]
