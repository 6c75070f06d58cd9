"""Count, per training-loop step, the calls of a run that can hold the GPU up: torch.distributed's
collectives (its Python API: the harness's reductions and votes; DDP's and FSDP's gradient traffic runs in
their C++ reducers and is not counted), explicit CUDA synchronisation (torch.cuda.synchronize and an event's
or a stream's synchronize) and, on CUDA, every operation torch's sync debug mode reports as synchronising
(`sync_op`: an .item(), a device-to-host copy, ...).

    PYTHONPATH=. python benchmarks/count_step_calls.py OUT.json '{"NAME": ["train", "stage2", CONFIG, "k=v"]}'

Each argv runs through `rae-scale`'s main() in this process, one after another (a second run adopts the
process group the first created); a call is charged to the `step` of the stage-1/stage-2 loop it comes
from. OUT.json: {NAME: {"<loop step>:<call>": count}}. A run that fails ends this process with its code.
Used by tests/distributed/test_hot_path.py and benchmarks/gpu_check.py.
"""
from __future__ import annotations

import collections
import json
import sys
import warnings

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce", "all_to_all", "gather", "scatter", "reduce_scatter")
calls: collections.Counter = collections.Counter()


def loop_step(frame) -> int | None:
    """The `step` of the training loop's main() on the stack below `frame`, if any."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "main" and code.co_filename.endswith(("stage1.py", "stage2.py")):
            return frame.f_locals.get("step")
        frame = frame.f_back
    return None


def counted(name: str, real):
    def call(*args, **kwargs):
        step = loop_step(sys._getframe(1))
        if step is not None:
            calls[f"{step}:{name}"] += 1
        return real(*args, **kwargs)
    return call


def count_sync_ops() -> None:
    """On CUDA: torch warns at each synchronising operation (sync debug mode); each warning is counted, not shown."""
    torch.cuda.set_sync_debug_mode("warn")
    warnings.filterwarnings("always", message=".*synchroniz", category=UserWarning)
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            step = loop_step(sys._getframe(1))
            if step is not None:
                calls[f"{step}:sync_op"] += 1
            return
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def main() -> int:
    out, runs = sys.argv[1], json.loads(sys.argv[2])
    for name in COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))
    torch.cuda.synchronize = counted("cuda.synchronize", torch.cuda.synchronize)
    for cls in (torch.cuda.Event, torch.cuda.Stream):
        cls.synchronize = counted(f"cuda.{cls.__name__}.synchronize", cls.synchronize)
    if torch.cuda.is_available():
        count_sync_ops()
    from rae_scale.commands.cli import main as cli_main

    per_run = {}
    for name, argv in runs.items():
        calls.clear()
        code = cli_main(argv)
        if code != 0:
            print(f"count_step_calls: {name}: exit code {code}", file=sys.stderr)
            return int(code)
        per_run[name] = dict(calls)
    with open(out, "w") as f:
        json.dump(per_run, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
