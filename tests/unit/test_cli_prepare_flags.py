"""`rae-scale prepare` flags for webdataset input (issue 17): --input-format, --source-name and --keep-uncaptioned
are spellings of PrepareJob keys; they reach the job config (over the YAML) and the prepare run itself."""
import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from rae_scale import config as C
from rae_scale.commands import cli


pytestmark = pytest.mark.usefixtures("restore_root_logging")


def _job_config(argv):
    args = cli.parse_args(cli.build_parser(), ["prepare", *argv])
    return cli.load_job("prepare", args, cli.PREPARE_FLAGS)


def test_every_prepare_flag_names_a_prepare_job_key():
    keys = {f.name for f in dataclasses.fields(C.JOBS["prepare"])}
    assert set(cli.PREPARE_FLAGS.values()) <= keys
    assert {"input_format", "source_name", "keep_uncaptioned"} <= set(cli.PREPARE_FLAGS.values())


def test_flags_reach_the_job_config_and_win_over_the_yaml(tmp_path):
    cfg = _job_config(["--input", "in", "--output", "out", "--input-format", "wds", "--source-name", "blip3o",
                       "--keep-uncaptioned"])
    assert (cfg.input_format, cfg.source_name, cfg.keep_uncaptioned) == ("wds", "blip3o", True)
    defaults = _job_config(["--input", "in", "--output", "out"])
    assert (defaults.input_format, defaults.source_name, defaults.keep_uncaptioned) == ("auto", None, False)

    yaml_file = tmp_path / "prepare.yaml"
    yaml_file.write_text("input: in\noutput: out\ninput_format: folder\nsource_name: imagenet\n"
                         "keep_uncaptioned: true\n")
    from_yaml = _job_config([str(yaml_file)])  # a flag not given leaves the YAML's value alone
    assert (from_yaml.input_format, from_yaml.source_name, from_yaml.keep_uncaptioned) == ("folder", "imagenet", True)
    flagged = _job_config([str(yaml_file), "--input-format", "wds", "--source-name", "web"])
    assert (flagged.input_format, flagged.source_name, flagged.keep_uncaptioned) == ("wds", "web", True)


def test_bad_input_format_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        _job_config(["--input", "in", "--output", "out", "--input-format", "zip"])
    assert exit_.value.code == 2 and "invalid choice: 'zip'" in capsys.readouterr().err
    allowed = r"^config key 'input_format': bad value 'zip'; allowed: auto, folder, wds$"
    with pytest.raises(C.ConfigError, match=allowed):
        _job_config(["--input", "in", "--output", "out", "input_format=zip"])


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _blip3o_tars(root):
    """One split folder with a tar of two captioned images and one without a caption."""
    split = root / "short-caption"
    split.mkdir(parents=True)
    members = [("a.png", _png(40)), ("a.txt", b"a dark square"), ("b.png", _png(120)),
               ("b.json", json.dumps({"caption": "a grey square"}).encode()), ("c.png", _png(200))]
    with tarfile.open(split / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_prepare_command_passes_the_flags_to_the_run(tmp_path, capsys):
    """The real command, in this process without Ray (num_workers=0): the printed summary and the manifest
    show the source name and the kept uncaptioned sample; without the flags, the defaults apply."""
    _blip3o_tars(tmp_path / "web")
    common = ["--resolution", "16", "--image-format", "png", "num_workers=0"]
    code = cli.main(["prepare", "--input", str(tmp_path / "web"), "--output", str(tmp_path / "kept"), *common,
                     "--input-format", "wds", "--source-name", "blip3o", "--keep-uncaptioned"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["input_format"] == "wds" and summary["num_samples"] == 3 and summary["num_captioned"] == 2
    assert summary["counts_per_source"] == {"blip3o": 3}
    manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert manifest["counts_per_source"] == {"blip3o": 3}

    code = cli.main(["prepare", "--input", str(tmp_path / "web"), "--output", str(tmp_path / "plain"), *common])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # auto -> wds, split folder's name
    assert summary["input_format"] == "wds" and summary["num_samples"] == 2
    assert summary["counts_per_source"] == {"short-caption": 2}

    # --input-format folder reads the split folder as a class and its tar as a file that is not an image
    code = cli.main(["prepare", "--input", str(tmp_path / "web"), "--output", str(tmp_path / "as_folder"), *common,
                     "--input-format", "folder"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["input_format"] == "folder"
    assert summary["num_samples"] == 0 and summary["num_skipped"] == 1


@pytest.mark.parametrize("layout", ["tsv", "jsonl", "json"])
def test_captions_file_gives_a_folder_its_captions_and_counts_the_missing(tmp_path, layout, capsys):
    """Folder input + --captions-file: each image's caption lands in the shards' caption column (by path or
    bare file name); an image the file does not name keeps "" and is counted in the manifest."""
    from rae_scale.data.mds import read_index, shard_samples

    for cls, names in (("cats", ["a.png", "b.png"]), ("dogs", ["c.png"])):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "in" / cls / name)
    captions = {"cats/a.png": "a grey cat", "b.png": "a black cat"}  # c.png has none
    text = {"tsv": "".join(f"{k}\t{v}\n" for k, v in captions.items()),
            "jsonl": "".join(json.dumps({"file": k, "caption": v}) + "\n" for k, v in captions.items()),
            "json": json.dumps(captions, indent=1)}[layout]
    (tmp_path / "captions.txt").write_text(text)
    assert cli.main(["prepare", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--resolution",
                     "8", "--captions-file", str(tmp_path / "captions.txt"), "num_workers=0"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["num_captioned"], summary["num_missing_captions"]) == (2, 1)
    got = {s["key"]: s["caption"] for sh in read_index(str(tmp_path / "out"))
           for _, s in shard_samples(str(tmp_path / "out"), sh)}
    assert got == {"cats/a.png": "a grey cat", "cats/b.png": "a black cat", "dogs/c.png": ""}

    (tmp_path / "bad.txt").write_text("cats/a.png a grey cat\n")
    assert cli.main(["prepare", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out2"),
                     "--captions-file", str(tmp_path / "bad.txt"), "num_workers=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "expected '<file><TAB><caption>'" in err and len(err.splitlines()) == 1
