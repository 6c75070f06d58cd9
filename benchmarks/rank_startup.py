"""Start-up of a stage-2 rank on a latent cache: what it imports and builds before its first step.

Each variant runs in fresh interpreters (`--repeats` times, the median kept), after `import torch`
and the training modules, so only the part that differs is timed:

- streaming: `import streaming` as it comes (its __init__ imports its dataset classes: transformers'
  AutoTokenizer, torch._dynamo) vs `rae_scale.data.streaming_import.import_streaming()`;
- sampling RAE: `build_rae` with the encoder (transformers' model classes, the encoder's weights) vs
  `with_encoder=False` (what stage 2 on a cache and sampling build now).

Prints seconds and the ratio new / old of each.

    PYTHONPATH=. .venv/bin/python benchmarks/rank_startup.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

PRELUDE = "import time, torch, rae_scale.train.stage2\n"
VARIANTS = {
    "streaming": ("import streaming",
                  "from rae_scale.data.streaming_import import import_streaming; import_streaming()"),
    "sampling RAE": ("from rae_scale.builders import build_rae; build_rae(CFG)",
                     "from rae_scale.builders import build_rae; build_rae(CFG, with_encoder=False)"),
}


def timed(body: str, encoder: str) -> float:
    """Seconds `body` takes in a fresh interpreter, after the prelude (CFG: the tiny config's rae section
    with a saved random encoder)."""
    code = (PRELUDE + "from rae_scale import config as C\n"
            f"CFG = C.load_config(C.Stage2Job, 'configs/stage2/tiny_cpu.yaml', ['rae.encoder.pretrained={encoder}', "
            "'rae.stats_path=null']).rae\n"
            f"t = time.perf_counter()\n{body}\nprint(time.perf_counter() - t)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from rae_scale import config as C
    from rae_scale.builders import save_random_encoder

    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.load_config(C.Stage2Job, "configs/stage2/tiny_cpu.yaml", ["rae.stats_path=null"])
        encoder = save_random_encoder(C.EncoderConfig(**{**vars(cfg.rae.encoder), "pretrained": None}),
                                      os.path.join(tmp, "encoder"))
        for name, (old, new) in VARIANTS.items():
            before = statistics.median(timed(old, encoder) for _ in range(args.repeats))
            after = statistics.median(timed(new, encoder) for _ in range(args.repeats))
            print(f"{name:13s}  before {before:6.2f} s  after {after:6.2f} s  ratio {after / before:.2f}")


if __name__ == "__main__":
    main()
