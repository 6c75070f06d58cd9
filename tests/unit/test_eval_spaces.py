"""FD in six feature spaces (RAEv2's FD_r^6), MIND per space, through the real loaders (issue 19, item 1).

Tiny random-weight transformers models are saved with save_pretrained in the releases' layout and
loaded through eval.spaces; their FD on real photographs is checked against an independent
computation: the model loaded and called directly with transformers, features resized / normalised
/ padded as the reference describes, float64 numpy moments and scipy.linalg.sqrtm.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from rae_scale.config.schema import EVAL_SPACES
from rae_scale.eval.features import collect_generator_features, evaluate_generator, sample_seeds
from rae_scale.eval.inception import build_inception
from rae_scale.eval.metrics import frechet_distance
from rae_scale.eval.mind import mind
from rae_scale.eval.reference import compare_folders, load_space_reference
from rae_scale.eval.spaces import SPACES, build_extractor, build_extractors, fd_ratios, parse_spaces
from tiny_extractors import photo_crops, save_tiny_extractors

N_A, N_B = 12, 14  # more than the tiny models' 8 feature dims: full-rank covariances
# raev2_method.md section 8: FD_r = FD / constant (written out here, not read from the code's table)
NORM = {"inception": 1.68, "convnext": 56.87, "dinov2": 14.19, "mae": 0.04, "siglip": 0.60, "clip": 5.60}
# input size, mean, std, patch of each space as the reference gives them (timm pretrained_cfg)
IMNET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIPN = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
INPUT = {"convnext": (224, *IMNET, 1), "dinov2": (256, *IMNET, 14), "mae": (224, *IMNET, 16),
         "siglip": (224, (0.5,) * 3, (0.5,) * 3, 16), "clip": (256, *CLIPN, 14)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("spaces")
    folder = save_tiny_extractors(root / "extractors")
    a, b = photo_crops(N_A, 0), photo_crops(N_B, 1)
    np.savez(root / "a.npz", arr_0=a)
    np.savez(root / "b.npz", arr_0=b)
    return {"root": root, "folder": folder, "a": a, "b": b,
            "extractors": build_extractors(SPACES, folder=str(folder)), "cache": root / "cache"}


@pytest.fixture(scope="module")
def direct(env) -> dict:
    """(features of the photos a, of the photos b) per space, from the models called directly."""
    return {space: (direct_features(space, env["folder"], env["a"]), direct_features(space, env["folder"], env["b"]))
            for space in SPACES[1:]}


def direct_features(space: str, folder, images: np.ndarray) -> np.ndarray:
    """The space's model loaded and called with transformers directly, preprocessing written out."""
    import transformers as tf

    size, mean, std, patch = INPUT[space]
    cls = {"convnext": tf.ConvNextV2Model, "dinov2": tf.Dinov2Model, "mae": tf.ViTMAEModel,
           "siglip": tf.SiglipVisionModel, "clip": tf.CLIPVisionModel}[space]
    kw = {"mask_ratio": 0.0} if space == "mae" else {}
    model = cls.from_pretrained(folder / space, **kw).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double().float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1) * 255) / (torch.tensor(std).view(1, 3, 1, 1) * 255)
    pad = (-size) % patch
    x = F.pad(x, (0, pad, 0, pad))
    with torch.no_grad():
        if space == "convnext":
            return model(x).last_hidden_state.mean((2, 3)).double().numpy()
        if space == "mae":  # identity order of the patches: no masking, no shuffle
            n = (x.shape[-1] // patch) ** 2
            return model(x, noise=torch.arange(n).float().expand(len(x), n)).last_hidden_state[:, 0].double().numpy()
        if space == "clip":  # native grid 16: timm resamples to 19 x 19 (bicubic + antialias = PIL's bicubic)
            model = with_grid(model, x.shape[-1] // patch)
            return model(x).pooler_output.double().numpy()
        out = model(x)
        return (out.last_hidden_state[:, 0] if space == "dinov2" else out.pooler_output).double().numpy()


def with_grid(model, grid: int):
    """The CLIP vision model rebuilt for a grid x grid input, its position table resized with PIL."""
    import transformers as tf
    from PIL import Image

    sd = model.state_dict()
    key = "vision_model.embeddings.position_embedding.weight"
    w = sd[key].numpy()
    g = int(round((w.shape[0] - 1) ** 0.5))
    cols = [np.asarray(Image.fromarray(w[1:, c].reshape(g, g), mode="F").resize((grid, grid), Image.BICUBIC))
            for c in range(w.shape[1])]
    sd[key] = torch.from_numpy(np.concatenate([w[:1], np.stack(cols, -1).reshape(grid * grid, -1)]))
    cfg = model.config
    cfg.image_size = grid * cfg.patch_size
    new = tf.CLIPVisionModel(cfg).eval()
    new.load_state_dict(sd, strict=False)
    return new


def scipy_fd(fa: np.ndarray, fb: np.ndarray) -> float:
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fd_and_mind_in_every_space_match_direct_computations(env, direct):
    five = SPACES[1:]  # the Inception space is FID's pool3, checked in test_eval_metrics / _reference
    out = compare_folders(env["root"] / "a.npz", env["root"] / "b.npz", spaces=",".join(five),
                          extractors=env["extractors"], mind=True, cache_dir=env["cache"])
    assert "fid" not in out  # no Inception pass when its space is not asked for
    for space in five:
        fa, fb = direct[space]
        expect = scipy_fd(fa, fb)
        assert expect > 1e-6 * (np.trace(np.cov(fa, rowvar=False)) + 1e-12), space  # the photo sets differ
        assert out[f"fd_{space}"] == pytest.approx(expect, rel=1e-4), space
        assert out[f"fd_r_{space}"] == pytest.approx(out[f"fd_{space}"] / NORM[space], rel=1e-12)
        assert out[f"mind_{space}"] == pytest.approx(mind(fa, fb), rel=1e-5), space
    assert out["fd_r_mean"] == pytest.approx(np.mean([out[f"fd_{s}"] / NORM[s] for s in five]), rel=1e-12)
    assert "fd_r6" not in out  # only with all six
    # the reference moments are cached per space: a second call featurises nothing, same numbers
    calls = []
    hook = env["extractors"]["dinov2"].register_forward_hook(lambda *a: calls.append(1))
    try:
        again = compare_folders(env["root"] / "a.npz", env["root"] / "b.npz", spaces="dinov2",
                                extractors=env["extractors"], cache_dir=env["cache"])
    finally:
        hook.remove()
    assert calls == [] and again["fd_dinov2"] == out["fd_dinov2"]


def test_engine_scores_spaces_on_the_fly_into_one_results_json(env, direct):
    """Samples featurised as they are generated (units, exact moments) in every space, one results JSON."""
    n = 3
    images = torch.from_numpy(env["a"][:n]).permute(0, 3, 1, 2).contiguous()
    index = {s: i for i, s in enumerate(sample_seeds(5, torch.arange(n)).tolist())}

    def sample_fn(labels, seeds):  # a "generator" that returns photo i for sample i
        return images[[index[s] for s in seeds.tolist()]]

    results, progress = env["root"] / "results.json", str(env["root"] / "progress")
    kw = dict(num_samples=n, batch_size=2, num_classes=3, seed=5, unit_size=2, progress_dir=progress,
              inception=build_inception())
    spaces = ("dinov2", "clip")
    # the spaces' reference statistics given directly (no Inception reference: no 2048-d FID to wait for)
    refs = {k: load_space_reference(env["root"] / "b.npz", env["extractors"][k], keep_features=True,
                                    cache_dir=env["cache"]) for k in spaces}
    metrics = evaluate_generator(sample_fn, spaces=["clip", "dinov2"], extractors=env["extractors"], mind=True,
                                 space_references=refs, results_path=str(results), **kw)
    # the finished units read back (nothing sampled again) hold each sample's features in index order
    fs = collect_generator_features(sample_fn, extractors={k: env["extractors"][k] for k in spaces},
                                    keep_space=True, spec=json.loads(results.read_text())["spec"], **kw)
    assert fs.resumed_units == 2 and fs.count == n
    for space in spaces:
        mine, ref = direct[space][0][:n], direct[space][1]
        np.testing.assert_allclose(fs.space_features[space].double().numpy(), mine, rtol=1e-5, atol=1e-5)
        mu, sigma = fs.spaces[space].stats()
        np.testing.assert_allclose(mu, mine.mean(0), atol=1e-5)
        np.testing.assert_allclose(sigma, np.cov(mine, rowvar=False), atol=1e-5)
        expect = frechet_distance(mu, sigma, ref.mean(0), np.cov(ref, rowvar=False))
        assert metrics[f"fd_{space}"] == pytest.approx(expect, rel=1e-4)
        assert metrics[f"mind_{space}"] == pytest.approx(mind(mine, ref), rel=1e-5)
    assert "fd_inception" not in metrics and "fid" not in metrics and metrics["num_samples"] == n
    saved = json.loads(results.read_text())
    assert saved["metrics"] == json.loads(json.dumps(metrics))
    assert saved["sampler"]["spaces"] == ["dinov2", "clip"] and saved["sampler"]["mind_seed"] == 2020
    # a progress folder of other spaces is refused, not mixed in
    with pytest.raises(ValueError, match="another evaluation"):
        evaluate_generator(sample_fn, spaces=["dinov2"], extractors=env["extractors"], **kw)


def test_bad_space_names_and_missing_extractors_say_what_is_allowed(env, tmp_path, capsys):
    assert EVAL_SPACES == SPACES  # the config's list (no torch import there) is the package's
    with pytest.raises(ValueError, match="unknown feature space.*'incpetion'.*allowed: inception, convnext, "
                                         "dinov2, mae, siglip, clip"):
        parse_spaces("incpetion,dinov2")
    assert parse_spaces("clip, inception,clip") == ("inception", "clip")
    fd = {s: 1.0 + i for i, s in enumerate(SPACES)}  # FD_r^6: the mean of the six FD / constant
    assert fd_ratios(fd)["fd_r6"] == pytest.approx(np.mean([fd[s] / NORM[s] for s in NORM]), rel=1e-12)
    with pytest.raises(FileNotFoundError, match="feature space 'dinov2': extractor folder .*nowhere.* does not exist"):
        build_extractor("dinov2", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="feature space 'clip': .*siglip is not a checkpoint of openai/clip"):
        build_extractor("clip", str(env["folder"] / "siglip"))
    from rae_scale.commands.cli import main

    a = str(env["root"] / "a.npz")
    assert main(["evaluate", "folders", a, a, "--spaces", "inception,foo"]) == 2
    err = capsys.readouterr().err
    assert "'foo'" in err and "allowed: inception, convnext, dinov2, mae, siglip, clip" in err
    assert main(["evaluate", "folders", a, a, "--spaces", "mae", "--extractor-dir", str(tmp_path)]) == 2
    assert "feature space 'mae'" in capsys.readouterr().err
    assert main(["evaluate", "fid", "--spaces", "inception,foo", "--output", str(tmp_path / "x")]) == 2
    assert "config key 'spaces'" in capsys.readouterr().err  # ... allowed: a non-empty list of inception, ...


# ----------------------------------------------------------------------------- pinned settings (item 2)


def _save_run(run_dir, step: int, model) -> None:
    """A committed step folder as the training loops write it (weights under `model` and `ema`)."""
    from rae_scale.checkpoint import CheckpointManager
    from rae_scale.parallel.ema import EMA
    from rae_scale.parallel.state import ModelState

    ema = EMA(model, decay=0.99, source_params=lambda: list(model.parameters()))
    CheckpointManager(str(run_dir), async_save=False).save(step, {"model": ModelState(model), "ema": ema})


def test_eval_configs_pin_the_sampler():
    from rae_scale import config as C

    repo = Path(__file__).resolve().parents[2]
    raev2 = C.load_config(C.EvalJob, repo / "configs/eval/raev2_fid50k_256.yaml")
    g, s = raev2.sample.guidance, raev2.sample.sampler
    assert (g.method, g.ig_scale, g.ig_t_min, g.ig_t_max, s.num_steps) == ("ig", 1.78, 0.1, 1.0, 100)
    assert tuple(raev2.spaces) == SPACES and raev2.mind and raev2.num_samples == 50000
    assert C.load_config(C.EvalJob, repo / "configs/eval/fid50k_256.yaml").spaces == ["inception"]


def test_results_record_the_full_spec_and_from_results_reruns_exactly(env, tmp_path, bare_process, capsys):
    from rae_scale import config as C
    from rae_scale.builders import build_dit_model, build_rae, save_random_encoder
    from rae_scale.commands.cli import main

    repo = Path(__file__).resolve().parents[2]
    s2 = C.load_config(C.Stage2Job, repo / "configs/stage2/tiny_cpu.yaml", ["rae.stats_path=null"])
    enc = C.EncoderConfig(**{**C.to_dict(s2.rae.encoder), "pretrained": None})
    rae_cfg = C.RAEConfig(**{**C.to_dict(s2.rae), "decoder": s2.rae.decoder, "encoder": C.EncoderConfig(
        **{**C.to_dict(enc), "pretrained": save_random_encoder(enc, str(tmp_path / "encoder"), seed=0)})})
    torch.manual_seed(1)
    _save_run(tmp_path / "stage1", 3, build_rae(rae_cfg).decoder)
    torch.manual_seed(2)
    _save_run(tmp_path / "stage2", 1, build_dit_model(s2.dit))
    cfg = C.EvalJob(sample=C.SampleJob(rae=rae_cfg, dit=s2.dit, transport=s2.transport,
                                       sampler=C.SamplerConfig(num_steps=2), checkpoint=str(tmp_path / "stage2"),
                                       seed=3),
                    num_samples=1, batch_size=1, save_npz=True, output=str(tmp_path / "first"),
                    spaces=["inception", "dinov2"], extractor_dir=str(env["folder"]))
    cfg.sample.rae.decoder_checkpoint = str(tmp_path / "stage1")
    (tmp_path / "eval.yaml").write_text(C.to_yaml(cfg))
    assert main(["evaluate", "fid", str(tmp_path / "eval.yaml")]) == 0
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    spec = first["spec"]
    assert spec["checkpoint"]["step"] == 1 and spec["weights"] == "ema" and spec["decoder"]["step"] == 3
    assert spec["samples"] == {"num_samples": 1, "seed": 3, "label_sampling": "equal",
                               "num_classes": s2.dit.num_classes}
    assert spec["sampler"]["num_steps"] == 2 and spec["guidance"] == {"method": "none"} and "time_shift" in spec
    assert spec["spaces"]["names"] == ["inception", "dinov2"] and spec["spaces"]["mind"] is None
    assert spec["spaces"]["extractors"]["dinov2"]["weights_sha1"] == env["extractors"]["dinov2"].digest

    # training commits a newer step meanwhile: the rerun still samples the recorded one, bit for bit
    torch.manual_seed(9)
    _save_run(tmp_path / "stage2", 2, build_dit_model(s2.dit))
    results = str(tmp_path / "first" / "results.json")
    assert main(["evaluate", "fid", "--from-results", results, "--output", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["spec"] == spec and again["metrics"] == first["metrics"]
    with np.load(tmp_path / "first" / "samples.npz") as a, np.load(tmp_path / "again" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])

    # what cannot be reproduced is refused in one line, naming the setting; so are extra settings
    doc = json.loads(Path(results).read_text())
    doc["spec"]["sampler"]["num_steps"] = 50
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    assert main(["evaluate", "fid", "--from-results", str(tmp_path / "edited.json")]) == 2
    assert "cannot re-run exactly: sampler.num_steps: recorded 50, now 2" in capsys.readouterr().err
    assert main(["evaluate", "fid", "--from-results", results, "--num-samples", "5"]) == 2
    assert "only --output" in capsys.readouterr().err
    assert main(["evaluate", "fid", "--from-results", str(tmp_path / "eval.yaml")]) == 2
    assert "not a readable JSON" in capsys.readouterr().err or "not a results JSON" in capsys.readouterr().err
