"""`rae-scale cache-text`: the captioned tiny digits (prepared by the real `prepare` from webdataset
tars, one with an empty and an over-long caption) -> text cache; it equals encoding in this process,
a re-run skips finished shards and redoes only an unfinished one, and bad input is a one-line error.
RAE_SCALE_TEST_RAY_WORKERS=1 runs the first pass on a local Ray actor (the job's default path).
"""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch

from data_pipeline.cache_text import TEXT_META, read_text_sample, run_cache_text
from data_pipeline.prepare import run_prepare
from data_pipeline.tiny_captions import COLOURS, DIGIT_WORDS, SOURCE_NAME, write_captioned_digit_tars
from rae_scale.data import schema
from rae_scale.data.mds import read_index, shard_samples
from rae_scale.models.text import load_text_encoder, save_random_qwen3

pytestmark = [pytest.mark.integration]

MAX_LENGTH = 40
LONG = "a red seven on a dark background, drawn with a thick brush by a careful hand"


def _extra_tar(folder) -> None:
    """One more input tar: a sample without caption (kept as "") and one longer than MAX_LENGTH."""
    from PIL import Image

    with tarfile.open(folder / "99999.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, text in (("nocap", None), ("long", LONG)):
            buf = io.BytesIO()
            Image.fromarray(np.full((64, 64, 3), 40, np.uint8)).save(buf, format="PNG")
            members = [("png", buf.getvalue()), ("cls", b"7")] + ([("txt", text.encode())] if text else [])
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    raw = root / "raw"
    write_captioned_digit_tars(raw, size=32, per_class=3, per_tar=10)
    _extra_tar(raw)
    manifest = run_prepare(input=str(raw), output=str(root / "shards"), resolution=16, format="mds",
                           image_format="png", source_name=SOURCE_NAME, num_workers=0, keep_uncaptioned=True)
    qwen = save_random_qwen3(str(root / "qwen3"), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    return root, manifest, qwen


def _read_cache(url: str, dtype: str):
    tokens, masks, ids = [], [], []
    for shard in read_index(url):
        for _, sample in shard_samples(url, shard):
            t, m, i = read_text_sample(sample, dtype)
            tokens.append(t), masks.append(m), ids.append(i)
    return torch.stack(tokens), torch.stack(masks), ids


def test_cache_text_equals_in_process_encoding_and_resumes(t2i, caplog):
    root, manifest, qwen = t2i
    shards, out = str(root / "shards"), str(root / "text")
    assert manifest["num_samples"] == 32 and manifest["num_captioned"] == 31
    captions = [s["caption"] for sh in read_index(shards) for _, s in shard_samples(shards, sh)]
    digit_caps = [c for c in captions if c and c != LONG]
    assert len(digit_caps) == 30 and all(c.split()[1] in COLOURS and c.split()[2] in DIGIT_WORDS for c in digit_caps)

    # in this process (num_workers=0): the Ray actors run the same TextShardWorker, but starting Ray and
    # importing torch + transformers in an actor costs ~50 s on the busy CI machine (num_workers=1 runs it)
    info = run_cache_text(input=shards, output=out, pretrained=qwen, max_length=MAX_LENGTH, batch_size=4,
                          dtype="bf16", num_workers=int(os.environ.get("RAE_SCALE_TEST_RAY_WORKERS", "0")))
    assert info == {"model": qwen, "max_length": MAX_LENGTH, "width": 16, "dtype": "bf16", "num_samples": 32,
                    "num_empty_captions": 1, "num_missing_captions": 0, "num_truncated": 1, "source": shards}
    assert schema.read_json(os.path.join(out, TEXT_META)) == info

    enc = load_text_encoder(qwen, MAX_LENGTH)
    want_tokens, want_mask = enc(captions)
    tokens, masks, ids = _read_cache(out, "bf16")
    assert ids == list(range(32))  # rows keep the image shards' global ids and order
    assert torch.equal(masks, want_mask)
    assert not masks[captions.index("")].any() and masks[captions.index(LONG)].all()  # null row; truncated row
    # bf16 bits of the same numbers (a batch of another size may move the fp32 value by an ulp)
    torch.testing.assert_close(tokens, want_tokens.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)

    # a re-run skips every finished shard; one whose marker is missing is encoded again, alone
    part_files = sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
                        if "part-" in d and "_done" not in d)
    stamps = {p: os.stat(p).st_mtime_ns for p in part_files}
    os.remove(os.path.join(out, schema.DONE_DIR, "part-00001.json"))
    again = run_cache_text(input=shards, output=out, pretrained=qwen, max_length=MAX_LENGTH, batch_size=4,
                           dtype="bf16", num_workers=0)
    assert again == info
    changed = sorted(p for p in part_files if os.stat(p).st_mtime_ns != stamps[p])
    assert changed and all("part-00001" in p for p in changed)
    assert torch.equal(_read_cache(out, "bf16")[0], tokens)

    # another encoder setting into the same output is refused
    with pytest.raises(ValueError, match=r"holds a text cache written with other settings \(max_length: 40 -> 8\)"):
        run_cache_text(input=shards, output=out, pretrained=qwen, max_length=8, num_workers=0)


def test_bad_input_is_one_line_cli_error(t2i, tmp_path, capsys):
    from streaming import MDSWriter

    from rae_scale.commands.cli import main

    root, _, qwen = t2i
    old = tmp_path / "old_shards"  # a folder prepared before captions existed: no caption column
    with MDSWriter(out=str(old / "part-00000"), columns=dict(schema.IMAGE_COLUMNS), compression=None) as w:
        w.write({"image": b"\x89PNG", "label": 0, "key": "a"})
    index = schema.read_json(str(old / "part-00000" / schema.MDS_INDEX))
    for s in index["shards"]:
        s["raw_data"]["basename"] = f"part-00000/{s['raw_data']['basename']}"
    schema.write_json(str(old / schema.MDS_INDEX), index)

    cases = [
        ([f"input={old}", f"output={tmp_path / 'o1'}", f"text_encoder.pretrained={qwen}"],
         f"{old} has no 'caption' column"),
        ([f"input={root / 'shards'}", f"output={tmp_path / 'o2'}", f"text_encoder.pretrained={tmp_path / 'none'}"],
         "does not exist; give a save_pretrained folder"),
        ([f"input={root / 'shards'}"], "cache-text needs input= (prepared shards with captions) and output="),
    ]
    for argv, expected in cases:
        assert main(["cache-text", *argv, "num_workers=0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rae-scale: error: ") and expected in err[0], err
