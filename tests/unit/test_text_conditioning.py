"""Text-to-image conditioning outside the loop: captions through prepare, the latent cache and the
loaders; caption dropout giving the all-masked null condition; the word-level tiny tokenizer; text
sampling (CFG at scale 1 is one forward, CFG > 1 one forward on the doubled batch); the config rules
(context_dim and num_c_tokens derived from the text encoder) and their errors.
"""
from __future__ import annotations

import json

import pytest
import torch

from rae_scale import config as C
from rae_scale.config.derive import resolve

TINY_T2I = "configs/stage2/tiny_t2i_cpu.yaml"


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    from data_pipeline.tiny_captions import caption_words
    from rae_scale.models.text import load_text_encoder, save_random_qwen3

    folder = tmp_path_factory.mktemp("qwen3") / "words"
    save_random_qwen3(str(folder), hidden_size=16, words=caption_words())
    return load_text_encoder(str(folder), 8)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Captioned colour digits (2 per class) prepared and cached in this process (no Ray)."""
    from data_pipeline.cache_latents import run_cache_latents
    from data_pipeline.tiny import encoder_factory
    from data_pipeline.tiny_captions import write_captioned_digit_tars
    from data_pipeline.prepare import run_prepare
    from rae_scale.builders import save_random_encoder

    root = tmp_path_factory.mktemp("captioned")
    write_captioned_digit_tars(root / "raw", size=32, per_class=2, per_tar=8)
    run_prepare(input=str(root / "raw"), output=str(root / "shards"), resolution=16, format="mds",
                image_format="png", num_workers=0)
    enc = C.EncoderConfig(kind="dinov2", pretrained=None, hidden_size=8, num_layers=1, num_heads=2,
                          intermediate_size=16, patch_size=4, input_size=16)
    save_random_encoder(enc, str(root / "encoder"), seed=0)
    enc.pretrained = str(root / "encoder")
    run_cache_latents(input=str(root / "shards"), output=str(root / "latents"), encoder_factory=encoder_factory(enc),
                      batch_size=8, both_flips=True, num_workers=0)
    return root


def _tar_captions(raw) -> dict[int, str]:
    import tarfile

    out = {}
    for tar_path in sorted(raw.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".txt"):
                    out[int(m.name.split("_")[1].split(".")[0])] = tar.extractfile(m).read().decode()
    return out


def test_captions_travel_through_prepare_the_latent_cache_and_both_loaders(captioned):
    from rae_scale.data.loader import build_image_loader, build_latent_loader

    expected = sorted(_tar_captions(captioned / "raw").values())
    assert len(expected) == 20 and all("dark background" in c for c in expected)
    assert json.loads((captioned / "latents" / "latents.json").read_text())["captions"] is True
    for loader in (build_image_loader(str(captioned / "shards"), batch_size=5, hflip=False, with_ids=True,
                                      with_captions=True),
                   build_latent_loader(str(captioned / "latents"), batch_size=5, hflip=True, with_ids=True,
                                       with_captions=True)):
        seen = []
        for x, y, ids, captions in loader:
            assert len(captions) == len(y) == 5
            # the caption names the sample's label (the .cls member)
            from data_pipeline.tiny_captions import DIGIT_WORDS
            assert all(f" {DIGIT_WORDS[int(label)]} " in c for label, c in zip(y, captions))
            seen += captions
        assert sorted(seen) == expected


def test_a_cache_without_captions_is_a_one_line_error(captioned, tmp_path):
    import shutil

    from rae_scale.data.loader import build_latent_loader

    lat = tmp_path / "lat"
    shutil.copytree(captioned / "latents", lat)
    meta = json.loads((lat / "latents.json").read_text())
    meta.pop("captions")
    (lat / "latents.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="holds no captions") as err:
        build_latent_loader(str(lat), batch_size=4, with_captions=True)
    assert "\n" not in str(err.value)
    build_latent_loader(str(lat), batch_size=4)  # label training still reads it


def test_image_shards_without_a_caption_column_are_a_one_line_error(tmp_path):
    """Shards written before captions existed (image, label, key) train class-conditional models only."""
    import io

    from PIL import Image
    from streaming import MDSWriter

    from rae_scale.data.loader import build_image_loader
    from rae_scale.data.schema import IMAGE_COLUMNS

    with MDSWriter(out=str(tmp_path / "old"), columns=IMAGE_COLUMNS, progress_bar=False) as w:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buf, format="PNG")
            w.write({"image": buf.getvalue(), "label": i, "key": f"k{i}"})
    with pytest.raises(ValueError, match="has no 'caption' column") as err:
        build_image_loader(str(tmp_path / "old"), batch_size=2, with_captions=True)
    assert "\n" not in str(err.value)
    assert len(list(build_image_loader(str(tmp_path / "old"), batch_size=2))) == 2


def test_caption_dropout_is_the_all_masked_null_condition(text_encoder):
    caps = ["a red one on a dark background", "a blue two on a dark background", "a cyan six on a dark background"]
    plain_tokens, plain_mask = text_encoder.condition(caps)
    assert plain_mask.sum(1).tolist() == [7, 7, 7], "one token per caption word"
    drop = torch.tensor([False, True, False])
    tokens, mask = text_encoder.condition(caps, drop)
    null_tokens, null_mask = text_encoder.condition([""])
    assert torch.equal(mask[1], null_mask[0]) and int(mask[1].sum()) == 0
    assert torch.equal(tokens[1], null_tokens[0])
    assert torch.equal(tokens[[0, 2]], plain_tokens[[0, 2]]) and torch.equal(mask[[0, 2]], plain_mask[[0, 2]])
    assert tokens.requires_grad is False and not tokens.is_inference(), "usable in a training graph"


def _tiny_text_dit(width: int):
    from rae_scale.models.dit_dh_ig import InContextDiTDHIG

    torch.manual_seed(0)
    model = InContextDiTDHIG(input_size=4, in_channels=8, hidden_size=[32, 32], depth=[1, 1], num_heads=[2, 2],
                             condition_type="text", context_dim=width, num_t_tokens=2, num_c_tokens=8,
                             base_model_depth=1).eval()
    with torch.no_grad():  # the zero-initialised output layers would make every prediction 0
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("scale,forwards_per_step,batch_per_forward", [(1.0, 1, 3), (4.0, 1, 6)])
def test_text_sampling_cost_and_prompt_dependence(text_encoder, scale, forwards_per_step, batch_per_forward):
    from rae_scale.diffusion.sample_fn import make_sample_fn

    job = C.from_generator(C.SampleJob, C.load_config(C.Stage2Job, TINY_T2I, [
        "rae.encoder.hidden_size=8", "rae.encoder.input_size=16", "text_encoder.hidden_size=16",
        "sampler.num_steps=4", f"guidance.scale={scale}"]))
    model = _tiny_text_dit(text_encoder.width)
    calls = []

    def counted(x, t, cond):
        calls.append(x.shape[0])
        return model(x, t, cond)

    class Identity:
        def decode(self, z):
            return type("Out", (), {"sample": z[:, :3].sigmoid()})

    prompts = ["a red one on a dark background", "a blue two on a dark background", ""]
    fn = make_sample_fn(job, counted, Identity(), "cpu", text_encoder=text_encoder)
    a = fn(prompts, torch.arange(3))
    assert len(calls) == 4 * forwards_per_step and set(calls) == {batch_per_forward}
    b = fn(list(reversed(prompts)), torch.arange(3))
    assert torch.equal(a[1], b[1]), "sample i depends only on its seed and its prompt"
    assert not torch.equal(a[0], fn([prompts[1]] * 3, torch.arange(3))[0]), "the prompt changes the sample"


def test_text_config_derives_context_and_tokens_and_refuses_contradictions():
    job = C.load_config(C.Stage2Job, TINY_T2I)
    assert (job.dit.context_dim, job.dit.num_c_tokens) == (job.text_encoder.hidden_size, job.text_encoder.max_length)
    label = C.load_config(C.Stage2Job, "configs/stage2/raev2_tiny_cpu.yaml")
    assert label.dit.context_dim is None
    with pytest.raises(C.ConfigError, match=r"'dit.num_c_tokens'=5 disagrees with the caption length"):
        C.load_config(C.Stage2Job, TINY_T2I, ["dit.num_c_tokens=5"])
    with pytest.raises(C.ConfigError, match=r"'dit.condition_type'=text needs 'dit.model' one of dit_dh_ig"):
        C.load_config(C.Stage2Job, "configs/stage2/tiny_cpu.yaml", ["dit.condition_type=text"])
    with pytest.raises(C.ConfigError, match="'dit.context_dim'=32 is for text conditions"):
        C.load_config(C.Stage2Job, "configs/stage2/raev2_tiny_cpu.yaml", ["dit.context_dim=32"])
    assert resolve(job) is job


def test_text_encoder_width_must_match_the_config(text_encoder):
    from rae_scale.builders import build_text_encoder

    te = C.TextEncoderConfig(pretrained=text_encoder.name, max_length=8, hidden_size=text_encoder.width + 8)
    with pytest.raises(C.ConfigError, match=f"has width {text_encoder.width}, but config key 'text_encoder.hidden_size'"):
        build_text_encoder(te)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_text_encoder(C.TextEncoderConfig(pretrained="/nonexistent/qwen3", hidden_size=16))


def _t2i_sample_job(text_encoder, tmp_path, *overrides):
    return C.load_config(C.SampleJob, TINY_T2I, [
        "rae.encoder.pretrained=null", "rae.stats_path=null", f"text_encoder.pretrained={text_encoder.name}",
        f"text_encoder.hidden_size={text_encoder.width}", "sampler.num_steps=3", "num_samples=2",
        f"output={tmp_path / 'out'}", *overrides])


def test_generate_writes_one_file_per_prompt_sample_and_a_captioned_grid(text_encoder, tmp_path):
    from rae_scale.commands.generate import generate

    prompts = ["a red one on a dark background", "a blue two on a dark background"]
    (tmp_path / "prompts.txt").write_text(f"\n  {prompts[1]}  \n\n")
    job = _t2i_sample_job(text_encoder, tmp_path, f"prompts={json.dumps(prompts[:1])}",
                          f"prompts_file={tmp_path / 'prompts.txt'}")
    torch.manual_seed(0)  # the random weights
    out = generate(job, allow_random_weights=True)
    assert (out["num_images"], out["num_prompts"]) == (4, 2)
    listed = json.loads((tmp_path / "out" / "prompts.json").read_text())
    assert [r["prompt"] for r in listed] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert all((tmp_path / "out" / r["file"]).exists() for r in listed) and (tmp_path / "out" / "grid.png").exists()
    again = _t2i_sample_job(text_encoder, tmp_path, f"prompts={json.dumps(prompts)}", f"output={tmp_path / 'again'}")
    torch.manual_seed(0)
    generate(again, allow_random_weights=True)
    assert all((tmp_path / "out" / r["file"]).read_bytes() == (tmp_path / "again" / r["file"]).read_bytes()
               for r in listed), "the same prompts and seeds give the same images"
    assert listed[0]["seed"] != listed[1]["seed"]
    # an empty prompts file, no prompts at all, and prompts for a class-conditional model: one-line errors
    (tmp_path / "empty.txt").write_text("\n \n")
    for job, match in ((_t2i_sample_job(text_encoder, tmp_path, f"prompts_file={tmp_path / 'empty.txt'}"),
                        "holds no prompt"),
                       (_t2i_sample_job(text_encoder, tmp_path), "give --prompt")):
        with pytest.raises(C.ConfigError, match=match) as err:
            generate(job, allow_random_weights=True)
        assert "\n" not in str(err.value)
    label = C.load_config(C.SampleJob, "configs/stage2/raev2_tiny_cpu.yaml", ["rae.encoder.pretrained=null",
                                                                              "rae.stats_path=null", "prompts=[x]"])
    with pytest.raises(C.ConfigError, match="prompts are for a text-to-image model"):
        generate(label, allow_random_weights=True)
