"""benchmarks/device_image: what the lent GPU machine lacks is carried (or deliberately not needed), and the
CPU imitation of that machine refuses exactly what it should."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "benchmarks" / "device_image"

# requirements gpu_check.py does without on the GPU machine, and why
NOT_CARRIED = {
    "ray": "too large to carry (about 70 MB); gpu_check builds its data in process",
    "webdataset": "the check reads MDS shards",
    "wandb": "the check runs with logging.wandb=off",
    "s3fs": "the check reads and writes local files",
}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()


def _listed(path: Path) -> set[str]:
    return {_name(w) for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
            for w in line.split()}


def test_every_requirement_is_on_the_image_carried_or_not_needed():
    required = {_name(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    image, carried = _listed(IMAGE / "image_packages.txt"), _listed(IMAGE / "wheels.txt")
    missing = sorted(required - image - carried - set(NOT_CARRIED))
    assert not missing, f"requirements neither on the GPU machine's image nor in wheels.txt: {missing}"
    assert not set(NOT_CARRIED) & carried, "a package is both carried and listed as not needed"


def test_the_imitation_refuses_what_the_image_lacks_and_allows_the_rest(tmp_path):
    log = tmp_path / "refused.txt"
    code = ("import omegaconf, torch, rae_scale.config\n"
            "try:\n    import ray\nexcept ModuleNotFoundError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={"PYTHONPATH": f"{IMAGE / 'emulate'}:{REPO}", "RAE_SCALE_DEVICE_IMAGE_LOG": str(log),
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: ray (ray) is not on the device image" in proc.stdout
    assert log.read_text().split()[:2] == ["ray", "ray"]
