"""The lent GPU machine's Python, imitated on this one for `gpu_check.py --rehearse-cpu --as-device-image`:
importing a distribution that is neither in its image (../image_packages.txt) nor carried (../wheels.txt)
fails as it would there, and is listed in $RAE_SCALE_DEVICE_IMAGE_LOG. Python loads this module at start-up
when its folder is on PYTHONPATH, so every process of a run (ranks, loader workers) is covered."""
import importlib.abc
import importlib.metadata
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _names(path: Path) -> set[str]:
    words = [w.split("==")[0] for line in path.read_text().splitlines()
             if not line.lstrip().startswith("#") for w in line.split()]
    return {re.sub(r"[-_.]+", "-", w).lower() for w in words}


ALLOWED = _names(HERE / "image_packages.txt") | _names(HERE / "wheels.txt") | {"rae-scale"}


class _NotOnTheImage(importlib.abc.MetaPathFinder):
    providers = None

    def find_spec(self, name, path=None, target=None):
        if "." in name or name.startswith("_") or name in sys.stdlib_module_names:
            return None
        if self.providers is None:
            self.providers = importlib.metadata.packages_distributions()
        dists = self.providers.get(name)
        if not dists or any(re.sub(r"[-_.]+", "-", d).lower() in ALLOWED for d in dists):
            return None  # not from an installed distribution (the repo's own folders), or allowed
        log = os.environ.get("RAE_SCALE_DEVICE_IMAGE_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{name} {','.join(sorted(set(dists)))}\n")
        raise ModuleNotFoundError(f"{name} ({', '.join(sorted(set(dists)))}) is not on the device image", name=name)


sys.meta_path.insert(0, _NotOnTheImage())
