"""Data safety (issue 21): pickled MDS columns are refused, prepare never writes into or over its input,
and an empty class folder keeps its label index.

Every job runs for real, in this process; the refusals come before Ray would start.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.cache_latents import run_cache_latents
from data_pipeline.prepare import check_output_apart, run_prepare
from data_pipeline.stats import run_stats
from rae_scale.config import ConfigError
from rae_scale import storage
from rae_scale.data import schema
from rae_scale.data.mds import UnsafeShardError, read_index, shard_samples


# ----------------------------------------------------------------------------- 3. pickled columns

class CreatesFile:
    """Unpickling this runs ``open(path, "w")``: the file's existence shows that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _png(value: int, size: int = 16) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(folder: Path, columns: dict, rows: list[dict]) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns=columns, compression=None, progress_bar=False) as w:
        for row in rows:
            w.write(row)


def _image_shards_with_pickle(folder: Path, target: Path) -> None:
    cols = {**schema.IMAGE_COLUMNS, "meta": "pkl"}
    _write_shard(folder, cols, [{"image": _png(10 * i), "label": i, "key": f"k{i}", "meta": CreatesFile(target)}
                                for i in range(3)])


def _latent_cache_with_pickle(folder: Path, target: Path) -> None:
    cols = {**schema.latent_columns([2, 2, 2], "fp32", False), "meta": "pkl"}
    _write_shard(folder, cols, [{"latent": np.full((2, 2, 2), i, np.float32), "label": i, "index": i,
                                 "meta": CreatesFile(target)} for i in range(3)])
    schema.write_json(storage.join(str(folder), schema.LATENT_META),
                      {"dtype": "fp32", "shape": [2, 2, 2], "both_flips": False, "num_samples": 3})


def _assert_one_line_naming(message: str, column: str, shard: str = "shard.00000.mds") -> None:
    assert "\n" not in message.strip()
    assert repr(column) in message and shard in message and "'pkl'" in message


def test_the_pickled_column_runs_code_when_streaming_reader_decodes_it(tmp_path):
    """The fixture is live: reading the shard without our check creates the file."""
    from streaming.base.format import reader_from_json

    target = tmp_path / "pwned"
    _image_shards_with_pickle(tmp_path / "ds", target)
    entry = json.loads((tmp_path / "ds" / "index.json").read_text())["shards"][0]
    reader_from_json(str(tmp_path / "ds"), None, entry).get_item(0)
    assert target.exists()


def test_stats_refuses_a_pickled_column_before_decoding(tmp_path):
    target = tmp_path / "pwned"
    _latent_cache_with_pickle(tmp_path / "lat", target)
    with pytest.raises(UnsafeShardError) as err:  # default num_workers: the Ray path, refused before Ray starts
        run_stats(input=str(tmp_path / "lat"), output_path=str(tmp_path / "s.safetensors"))
    _assert_one_line_naming(str(err.value), "meta")
    assert not target.exists() and not (tmp_path / "s.safetensors").exists()


def test_stats_command_prints_one_line_and_exits_2(tmp_path, capsys):
    from rae_scale.commands.cli import main

    target = tmp_path / "pwned"
    _latent_cache_with_pickle(tmp_path / "lat", target)
    rc = main(["stats", f"input={tmp_path / 'lat'}", f"output={tmp_path / 's.safetensors'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not target.exists()
    assert err[-1].startswith("rae-scale: error:") and "Traceback" not in "\n".join(err)
    _assert_one_line_naming(err[-1], "meta")


def test_cache_latents_refuses_a_pickled_column_before_decoding(tmp_path):
    target = tmp_path / "pwned"
    _image_shards_with_pickle(tmp_path / "img", target)
    with pytest.raises(UnsafeShardError) as err:
        run_cache_latents(input=str(tmp_path / "img"), output=str(tmp_path / "lat"),
                          encoder_factory=lambda: None)  # never built: refused first
    _assert_one_line_naming(str(err.value), "meta")
    assert not target.exists() and not (tmp_path / "lat").exists()
    with pytest.raises(UnsafeShardError):
        run_stats(input=str(tmp_path / "img"), kind="images", encoder_factory=lambda: None, num_workers=0)
    assert not target.exists()


def test_every_reader_of_ours_refuses_it(tmp_path):
    from rae_scale.data import build_image_loader

    target = tmp_path / "pwned"
    _image_shards_with_pickle(tmp_path / "img", target)
    entry = json.loads((tmp_path / "img" / "index.json").read_text())["shards"][0]
    with pytest.raises(UnsafeShardError):  # an entry handed over directly, not through read_index
        next(shard_samples(str(tmp_path / "img"), {**entry, "first_sample": 0}))
    with pytest.raises(UnsafeShardError):
        read_index(str(tmp_path / "img"))
    with pytest.raises(UnsafeShardError) as err:  # the training loader (streaming + our mapped reader)
        build_image_loader(str(tmp_path / "img"), batch_size=1)
    _assert_one_line_naming(str(err.value), "meta")
    assert not target.exists()


def test_unknown_encodings_are_refused_and_safe_ones_pass(tmp_path):
    _write_shard(tmp_path / "ok", {**schema.IMAGE_COLUMNS, "extra": "json"},
                 [{"image": _png(1), "label": 0, "key": "a", "extra": {"x": 1}}])
    assert [s["extra"] for _, s in shard_samples(str(tmp_path / "ok"), read_index(str(tmp_path / "ok"))[0])] \
        == [{"x": 1}]
    index = json.loads((tmp_path / "ok" / "index.json").read_text())
    index["shards"][0]["column_encodings"][index["shards"][0]["column_names"].index("extra")] = "pkl:"
    (tmp_path / "ok" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeShardError, match="'extra'"):
        read_index(str(tmp_path / "ok"))
    index["shards"][0]["column_encodings"][index["shards"][0]["column_names"].index("extra")] = "yaml"
    (tmp_path / "ok" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeShardError, match="does not know that encoding"):
        read_index(str(tmp_path / "ok"))


# ----------------------------------------------------------------------------- 4. output vs input

def _image_tree(root: Path, classes: dict[str, int]) -> None:
    for i, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            (root / name / f"img{j}.png").write_bytes(_png(20 * i + j))


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overwrite", [True, False])
def test_prepare_refuses_an_output_over_or_inside_its_input(tmp_path, overwrite):
    src = tmp_path / "data" / "images"
    _image_tree(src, {"n00000000": 1, "n00000001": 1})
    os.symlink(src, tmp_path / "link")
    before = _snapshot(tmp_path / "data")
    outputs = [src, src.parent, src / "shards", tmp_path / "link", src / "n00000000" / ".." / "out",
               f"file://{src.parent}"]
    for out in outputs:
        with pytest.raises(ConfigError) as err:
            run_prepare(input=str(src), output=str(out), resolution=8, num_workers=0, overwrite=overwrite)
        msg = str(err.value)
        assert "\n" not in msg and str(out) in msg and str(src) in msg
    assert _snapshot(tmp_path / "data") == before
    # a sibling whose name merely starts with the input's is fine
    m = run_prepare(input=str(src), output=str(tmp_path / "data" / "images_shards"), resolution=8,
                    num_workers=0, overwrite=overwrite)
    assert m["num_samples"] == 2 and _snapshot(src) == _snapshot(tmp_path / "data" / "images") == {
        k[len("images/"):]: v for k, v in before.items()}


def test_urls_are_compared_by_scheme_bucket_and_normalised_path(tmp_path):
    for inp, out in [("s3://bucket/data/imgs", "s3://bucket/data/imgs/"),
                     ("s3://bucket/data/imgs", "s3a://Bucket/data"),
                     ("s3://bucket/data/imgs", "s3://bucket//data/imgs/x/../shards"),
                     ("gs://b/imgs", "gcs://b/imgs/out"),
                     ("memory://b/imgs", "memory://b")]:
        with pytest.raises(ConfigError, match="input"):
            check_output_apart(inp, out, overwrite=True)
    for inp, out in [("s3://bucket/data/imgs", "s3://bucket/data/imgs2"),
                     ("s3://bucket/data/imgs", "s3://other/data/imgs"),
                     ("s3://bucket/data/imgs", "gs://bucket/data/imgs"),
                     ("s3://bucket/data/imgs", str(tmp_path / "data" / "imgs"))]:
        check_output_apart(inp, out, overwrite=True)
    with pytest.raises(ConfigError, match="labels_file"):
        check_output_apart(str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "out" / "l.txt"),
                           overwrite=True)
    check_output_apart(str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "in" / "l.txt"),
                       overwrite=True)


# ----------------------------------------------------------------------------- 6. empty classes

def _labels_by_key(url: str) -> dict[str, int]:
    return {s["key"]: int(s["label"]) for sh in read_index(url) for _, s in shard_samples(url, sh)}


def test_an_empty_class_folder_keeps_every_label_in_place(tmp_path, caplog):
    src = tmp_path / "src"
    names = [f"n{i:08d}" for i in range(5)]
    _image_tree(src, {n: (0 if i == 2 else 2) for i, n in enumerate(names)})
    (src / ".ipynb_checkpoints").mkdir()  # hidden: not a class, else it would shift every label
    (src / ".Trash-0").mkdir()
    (src / ".Trash-0" / "old.png").write_bytes(_png(1))  # skipped, reported
    with caplog.at_level(logging.INFO, logger="data_pipeline.prepare"):
        m = run_prepare(input=str(src), output=str(tmp_path / "out"), resolution=8, num_workers=0)
    labels = _labels_by_key(str(tmp_path / "out"))
    assert labels == {f"{n}/img{j}.png": i for i, n in enumerate(names) if i != 2 for j in range(2)}
    assert json.loads((tmp_path / "out" / "class_index.json").read_text()) == {n: i for i, n in enumerate(names)}
    assert m["empty_classes"] == ["n00000002"] and m["num_classes"] == 5
    assert m["counts_per_class"]["n00000002"] == 0
    assert m["skipped"] == [{"path": ".Trash-0/old.png", "reason": "hidden_folder"}] and m["num_skipped"] == 1
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["empty_classes"] == ["n00000002"]
    assert any("n00000002" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_labels_file_class_without_files_keeps_its_index(tmp_path):
    (tmp_path / "flat").mkdir()
    lines = []
    for i, cls in enumerate(["ant", "ant", "cat", "cat"]):
        (tmp_path / "flat" / f"{i}.png").write_bytes(_png(i))
        lines.append(f"{i}.png {cls}")
    lines.append("missing.png bee")  # a class the labels file names, whose file is not there
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    m = run_prepare(input=str(tmp_path / "flat"), output=str(tmp_path / "o"), resolution=8,
                    labels_file=str(tmp_path / "labels.txt"), num_workers=0)
    assert json.loads((tmp_path / "o" / "class_index.json").read_text()) == {"ant": 0, "bee": 1, "cat": 2}
    assert set(_labels_by_key(str(tmp_path / "o")).values()) == {0, 2}
    assert m["empty_classes"] == ["bee"]
