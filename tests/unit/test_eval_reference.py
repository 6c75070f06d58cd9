"""Reference statistics: ADM npz round trip, folders vs npz, caching, compare_folders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rae_scale.eval.inception import build_inception
from rae_scale.eval.metrics import frechet_distance
from rae_scale.eval.reference import (ReferenceStats, compare_folders, iter_npz_images, load_reference,
                                      read_reference_npz, write_npz_from_parts)
from reference_npz import save_reference_npz


def photos(n_crops: int, offset: int) -> np.ndarray:
    """uint8 NHWC 64x64 crops of scikit-image's photos."""
    from skimage import data

    src = [data.astronaut(), data.coffee(), data.chelsea()]
    out = []
    for i in range(n_crops):
        img = src[(i + offset) % 3]
        y, x = 40 * i + 20 * offset, 30 * i + 10 * offset
        out.append(img[y:y + 64, x:x + 64])
    return np.stack(out)


def test_adm_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 8))
    stats = ReferenceStats(mu=a.mean(0), sigma=np.cov(a, rowvar=False), mu_s=a[:, :5].mean(0),
                           sigma_s=np.cov(a[:, :5], rowvar=False))
    images = photos(3, 0)
    save_reference_npz(tmp_path / "ref.npz", stats, images)
    back, has_images = read_reference_npz(tmp_path / "ref.npz")
    assert has_images
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(getattr(back, key), getattr(stats, key))
    with np.load(tmp_path / "ref.npz") as f:  # the key names ADM's evaluator reads
        assert set(f.files) == {"mu", "sigma", "mu_s", "sigma_s", "arr_0"}
        np.testing.assert_array_equal(f["arr_0"], images)
    streamed = torch.cat(list(iter_npz_images(tmp_path / "ref.npz", batch_size=2)))
    np.testing.assert_array_equal(streamed.permute(0, 2, 3, 1).numpy(), images)
    assert load_reference(tmp_path / "ref.npz").sigma is not None  # stored stats used as they are
    with pytest.raises(ValueError, match="uint8"):
        save_reference_npz(tmp_path / "bad.npz", stats, images.astype(np.float32))


def test_write_npz_from_parts(tmp_path):
    parts = []
    for i, n in enumerate((3, 2)):
        p = tmp_path / f"{i}.npz"
        np.savez(p, images=photos(n, i), labels=np.arange(n) + 10 * i)
        parts.append(p)
    write_npz_from_parts(tmp_path / "all.npz", parts)
    with np.load(tmp_path / "all.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], np.concatenate([photos(3, 0), photos(2, 1)]))
        np.testing.assert_array_equal(f["arr_1"], [0, 1, 2, 10, 11])


@pytest.mark.slow
def test_compare_folders_and_cache(tmp_path):
    torch.set_num_threads(2)
    inception = build_inception()
    a_imgs, b_imgs = photos(4, 0), photos(4, 1)  # P/R with k=3 needs > 3
    folder = tmp_path / "a"
    folder.mkdir()
    for i, img in enumerate(a_imgs):
        Image.fromarray(img).save(folder / f"{i}.png")
    np.savez(tmp_path / "a.npz", arr_0=a_imgs)
    np.savez(tmp_path / "b.npz", arr_0=b_imgs)
    cache = tmp_path / "cache"

    # independent: features straight from the network, numpy stats (the Fréchet formula itself is
    # checked against scipy's sqrtm in test_eval_metrics; sqrtm on rank-3 2048-d stats takes minutes)
    feats = {k: inception(torch.from_numpy(v).permute(0, 3, 1, 2)) for k, v in (("a", a_imgs), ("b", b_imgs))}
    expect_fid = frechet_distance(*_np_stats(feats["a"]["pool"]), *_np_stats(feats["b"]["pool"]))
    expect_sfid = frechet_distance(*_np_stats(feats["a"]["spatial"]), *_np_stats(feats["b"]["spatial"]))

    out = compare_folders(folder, tmp_path / "b.npz", inception=inception, cache_dir=cache, pr=True)
    assert out["num_a"] == out["num_b"] == 4
    assert out["fid"] == pytest.approx(expect_fid, rel=1e-6)
    assert out["sfid"] == pytest.approx(expect_sfid, rel=1e-6)
    assert 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1
    assert len(list(cache.glob("*.npz"))) == 2

    # the PNG folder and the npz of the same images are the same set; second call hits the cache
    same = compare_folders(folder, tmp_path / "a.npz", inception=inception, cache_dir=cache)
    # rank-3 stats in 2048-d: the trace term is only good to ~1e-8 of the FID scale
    assert abs(same["fid"]) < 1e-6 * out["fid"] and abs(same["sfid"]) < 1e-6 * out["sfid"]
    assert len(list(cache.glob("*.npz"))) == 3  # folder a came from the cache, only a.npz was new


def _np_stats(x: torch.Tensor):
    x = x.double().numpy()
    return x.mean(0), np.cov(x, rowvar=False)


def test_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_reference(tmp_path / "empty", inception=object(), use_cache=False)
    np.savez(tmp_path / "x.npz", foo=np.zeros(2))
    with pytest.raises(ValueError, match="neither"):
        load_reference(tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "missing")
