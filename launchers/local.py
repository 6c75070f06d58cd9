"""torchrun on this machine, and the per-node agent that the Slurm templates start with srun.

`python -m launchers.local [torchrun options] PROGRAM [args]` takes exactly torchrun's
(torch.distributed.run) arguments and runs its elastic agent in this process, with two changes a
preemptible job needs:

* SIGUSR2 (the preemption warning) is forwarded to the worker processes instead of killing the agent
  (torchrun's default disposition for USR2 is to die, pytorch#154849), so the ranks can save;
* when every failed worker exited with the preemption code (75), the agent exits with 75 too, where
  torchrun would report a generic failure (1); the sbatch template maps 75 to `scontrol requeue`.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from rae_scale.config import redact
from rae_scale.logs import RedactingFormatter

log = logging.getLogger(__name__)

REPO_ROOT = str(Path(__file__).resolve().parents[1])

EXIT_CODE_PREEMPTED = 75  # mirrors rae_scale.checkpoint.preemption.EXIT_CODE_PREEMPTED
EXIT_CODE_INTERRUPTED = 130  # mirrors rae_scale.checkpoint.preemption.EXIT_CODE_INTERRUPTED
# SIGINT too: the ranks save on the first Ctrl-C and exit 130 (torchrun would stop them at once)
FORWARDED_SIGNALS = (signal.SIGUSR2, signal.SIGUSR1, signal.SIGINT)


def _child_pids() -> list[int]:
    """Direct children of this process: the agent's workers (not their data-loader processes)."""
    import psutil

    return [c.pid for c in psutil.Process().children(recursive=False)]


def _forward(signum, _frame) -> None:
    pids = _child_pids()
    log.warning("agent got %s; forwarding it to %d worker(s)", signal.Signals(signum).name, len(pids))
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def preemption_exit_code(failures: dict) -> int | None:
    """75 (preempted) or 130 (Ctrl-C) when torchrun's {rank: ProcessFailure} describes such a stop.

    That is: some rank exited with the code after saving and every other failed rank did too or was
    stopped with SIGTERM/SIGKILL. The agent stops the remaining ranks as soon as the first one exits,
    so a rank that was still tearing down after its (already completed, barrier-guarded) save shows up
    as killed by SIGTERM.
    """
    codes = [getattr(f, "exitcode", None) for f in failures.values()]
    for code in (EXIT_CODE_PREEMPTED, EXIT_CODE_INTERRUPTED):
        if code in codes and all(c in {code, -signal.SIGTERM, -signal.SIGKILL} for c in codes):
            return code
    return None


def agent_main(argv: Sequence[str]) -> int:
    """Run torchrun's agent in-process with `argv` (torchrun's command line, without 'torchrun')."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException

    # torchrun handles TERM/INT/HUP/QUIT itself (it passes them on and stops the workers after a
    # grace period); the user signals must stay ours, so they are not in its list.
    handled = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = ",".join(
        s for s in handled.split(",") if s.strip() not in ("SIGUSR1", "SIGUSR2", "SIGINT"))
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, _forward)
    args = torchrun.parse_args(list(argv))
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        code = preemption_exit_code(exc.failures)
        if code is not None:
            log.warning("all failed workers saved and exited with code %d", code)
            return code
        first = min(exc.failures)
        code = exc.failures[first].exitcode
        log.error("worker (rank %d) failed with exit code %s", first, code)
        return code if isinstance(code, int) and 0 < code < 256 else 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


def torchrun_argv(nproc: int, program: Sequence[str], *, nnodes: int = 1, rdzv_endpoint: str | None = None,
                  rdzv_id: str = "rae_scale", max_restarts: int = 0) -> list[str]:
    """torchrun options for `nproc` ranks per node; standalone (127.0.0.1) when rdzv_endpoint is None.

    `program` is what follows `python`: ["-m", "module", args...] or ["script.py", args...].
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if not program:
        raise ValueError("program is empty; give ['-m', 'module', ...] or ['script.py', ...]")
    opts = [f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    if rdzv_endpoint is None:
        if nnodes != 1:
            raise ValueError("nnodes > 1 needs a rendezvous endpoint (host:port of the first node)")
        opts += ["--standalone"]
    else:
        opts += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id}"]
    program = list(program)
    if program[0] == "-m":
        if len(program) < 2:
            raise ValueError("program '-m' needs a module name")
        return opts + ["--module", *program[1:]]
    return opts + program


def run_local(nproc: int, argv: Sequence[str], *, program: Sequence[str] = ("-m", "rae_scale.commands.cli"),
              env: dict[str, str] | None = None) -> int:
    """Run `python <program> <argv>` as `nproc` torchrun ranks on this machine; return the exit code.

    argv are the rae-scale CLI arguments (e.g. ["train", "stage2", CONFIG, "run.dir=..."]). The exit
    code is 75 when the ranks were preempted (they saved; run the same command again to resume).
    """
    cmd = [sys.executable, "-m", "launchers.local", *torchrun_argv(nproc, [*program, *argv])]
    threads = str(max(1, (os.cpu_count() or 1) // max(1, nproc)))
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", threads)
    # the agent imports `launchers` from this checkout even when it is not pip-installed
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, full_env.get("PYTHONPATH")) if p)
    log.info("local launch: %s", shlex.join(redact(cmd)))
    from rae_scale.lifetime import die_with_parent

    # the agent (and through it the ranks: see agent_main) ends with this process, even after kill -9
    proc = subprocess.Popen(cmd, env=full_env, preexec_fn=die_with_parent)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()


if __name__ == "__main__":
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("[launchers.local] %(message)s"))  # the agent echoes command lines
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), handlers=[handler])
    sys.exit(agent_main(sys.argv[1:]))
