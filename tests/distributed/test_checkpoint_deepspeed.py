"""DeepSpeed ZeRO-2 saved on 2 gloo ranks, moved through fsspec, converted to the universal
format and loaded on 1 rank: the weights are the saved ones."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from _workers_checkpoint import ds_load_universal, ds_save  # noqa: E402
from conftest import run_ranks  # noqa: E402

from rae_scale.checkpoint import (convert_deepspeed_to_universal, download_dir,  # noqa: E402
                                  needs_universal, upload_dir)


def test_needs_universal():
    assert needs_universal(2, 1) and needs_universal(1, 4) and not needs_universal(8, 8)
    with pytest.raises(ValueError, match="saved_world_size"):
        needs_universal(0, 1)


def test_convert_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_deepspeed_to_universal(tmp_path / "nope", tmp_path / "out")


@pytest.mark.slow
def test_zero2_two_ranks_to_one_via_universal(tmp_path):
    staging = tmp_path / "staging"
    saved = run_ranks(ds_save, 2, str(staging))
    remote = "file://" + str(tmp_path / "bucket" / "run" / "ds")
    upload_dir(staging, remote)
    local = download_dir(remote, tmp_path / "restore")
    convert_deepspeed_to_universal(f"{local}/global_step2", f"{local}/global_step2_universal")
    loaded = run_ranks(ds_load_universal, 1, str(local), "global_step2_universal")[0]
    assert loaded.keys() == saved[0].keys()
    for k in loaded:
        assert torch.equal(torch.as_tensor(loaded[k]), torch.as_tensor(saved[0][k])), k
