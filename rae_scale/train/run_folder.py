"""The run folder: one training per folder (its lease), and resume-or-start with the checks that keep a
resumed run on the architecture it was trained with; the resolved config is written once that succeeded."""
from __future__ import annotations

import logging
from typing import Mapping

from rae_scale.train.errors import TrainingSetupError

log = logging.getLogger(__name__)

_LEASE = None  # the lease this process holds (rank 0); one training per process at a time


def take_lease(cfg, info) -> None:
    """Rank 0 takes the run folder's lease; every rank fails alike when another training holds it."""
    from rae_scale.checkpoint.lease import RunFolderBusyError, RunLease
    from rae_scale.parallel.dist import broadcast_object

    global _LEASE
    end_run()  # a lease left by an earlier run in this process (e.g. one that raised)
    error = None
    if info.rank == 0:
        lease = RunLease(cfg.run.dir, timeout_s=cfg.checkpoint.lease_timeout_s,
                         storage_options=cfg.run.storage_options)
        try:
            lease.acquire()
            _LEASE = lease
        except RunFolderBusyError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error:
        raise TrainingSetupError(error)


def end_run() -> None:
    """Release the run folder's lease (rank 0; a no-op elsewhere and when none is held)."""
    global _LEASE
    if _LEASE is not None:
        _LEASE.release()
        _LEASE = None


# Config keys that define a job's trained architecture: a resumed checkpoint must agree on them.
# Listed as dotted prefixes; the ignored ones are init-only or where weights come from.
ARCHITECTURE_KEYS = {
    "stage1": ("rae.encoder", "rae.decoder", "rae.image_size", "gan.disc_depth", "gan.disc_width",
               "gan.disc_heads", "gan.disc_patch", "gan.kernel_size", "gan.norm_type", "gan.spectral_norm"),
    "stage2": ("dit",),
}
ARCHITECTURE_IGNORED = ("rae.encoder.pretrained", "dit.checkpoint", "dit.class_dropout_prob", "dit.label_embed_std")


def architecture_mismatch(job: str, current: Mapping, saved: Mapping) -> list[str]:
    """'key: saved -> now' for every architecture key (ARCHITECTURE_KEYS) on which two configs differ. A key
    the checkpoint's config lacks (added to the schema after it was saved) counts as its default then."""
    from rae_scale.checkpoint.export import flatten_state_dict  # dotted leaves of a nested dict
    from rae_scale.config import JOBS, to_dict

    def pick(cfg):
        return {k: v for k, v in flatten_state_dict(cfg).items()
                if any(k == p or k.startswith(p + ".") for p in ARCHITECTURE_KEYS[job])
                and not any(k == i or k.startswith(i + ".") for i in ARCHITECTURE_IGNORED)}

    now, then = pick(current), pick(saved)
    defaults = pick(to_dict(JOBS[job]()))
    then.update({k: defaults[k] for k in now.keys() - then.keys() if k in defaults})
    missing = object()
    return [f"{k}: {then.get(k, missing)!r} in the checkpoint, {now.get(k, missing)!r} now".replace(
                repr(missing), "absent")
            for k in sorted(set(now) | set(then)) if now.get(k, missing) != then.get(k, missing)]


def _clear_run_outputs(cfg, manager) -> None:
    """checkpoint.overwrite: delete the earlier run's checkpoints, metrics, grids and config (only those)."""
    from rae_scale.checkpoint.layout import CHECKPOINTS_DIR
    from rae_scale.config.save import CONFIG_FILE
    from rae_scale.storage import join
    from rae_scale.train.image_grid import GRID_DIR
    from rae_scale.train.metrics import METRICS_FILE

    for name in (CHECKPOINTS_DIR, METRICS_FILE, GRID_DIR, CONFIG_FILE):
        url = join(manager.run_url, name)
        if manager.storage.exists(url):
            manager.storage.rm(url, recursive=manager.storage.isdir(url))
    manager.storage.invalidate()
    log.warning("checkpoint.overwrite=true: deleted the earlier run's checkpoints, metrics and grids in %s",
                manager.run_url)


def resume_or_start(cfg, info, ckpt_io, job: str) -> str | None:
    """Resume as checkpoint.resume says, refusing what does not fit, then write the resolved config.

    never: a folder that holds committed checkpoints is refused (retention would delete each new
    save as older than the old run's) unless checkpoint.overwrite clears it. auto / URL: the
    checkpoint's architecture keys must equal the config's. The resolved config is written only
    after this succeeded, so a refused start leaves the folder as it was. Returns the step folder
    resumed from, or None for a fresh start.
    """
    from rae_scale.config import save_resolved
    from rae_scale.parallel.dist import barrier, broadcast_object

    c, manager = cfg.checkpoint, ckpt_io.manager
    if c.overwrite and c.resume != "never":
        raise TrainingSetupError(f"checkpoint.overwrite=true needs checkpoint.resume=never (got {c.resume!r}): "
                                 "overwrite deletes the run folder's checkpoints, so it never applies to a resume")
    problem = None
    if info.rank == 0:
        if c.resume == "never":
            steps = manager.committed_steps()
            if steps and not c.overwrite:
                problem = (f"checkpoint.resume=never, but run.dir {cfg.run.dir} holds committed checkpoints "
                           f"(steps {steps[0]}..{steps[-1]}); set checkpoint.resume=auto to continue that run, "
                           "checkpoint.overwrite=true to delete it and start anew, or choose another run.dir")
            elif steps:
                _clear_run_outputs(cfg, manager)
        else:
            problem = _check_architecture(cfg, manager, job)
    problem = broadcast_object(problem)
    if problem:
        raise TrainingSetupError(problem)
    barrier()
    resumed = ckpt_io.resume(c.resume)
    if info.rank == 0:
        url = save_resolved(cfg, cfg.run.dir, cfg.run.storage_options)
        log.info("run folder %s (resolved config at %s)", cfg.run.dir, url)
    return resumed


def _check_architecture(cfg, manager, job: str) -> str | None:
    """An error message when the checkpoint to resume was trained with another architecture, else None."""
    from rae_scale.config import to_dict

    try:
        step_dir = manager.resolve_resume(cfg.checkpoint.resume) if cfg.checkpoint.resume != "auto" \
            else manager.latest_committed()
    except ValueError as exc:  # a URL that names no committed checkpoint: the user's to fix
        return str(exc)
    if not step_dir:
        return None
    try:
        meta = manager.read_metadata(step_dir)
    except Exception as exc:  # the manager's load reports unreadable checkpoints (and falls back)
        log.debug("no metadata to compare at %s: %r", step_dir, exc)
        return None
    saved = meta.get("config")
    if not isinstance(saved, Mapping):
        log.warning("%s records no config; cannot check that its architecture matches", step_dir)
        return None
    diff = architecture_mismatch(job, to_dict(cfg), saved)
    if diff:
        return (f"cannot resume {step_dir}: it was trained with another architecture ({'; '.join(diff)}); "
                "use the checkpoint's values, or start a new run (another run.dir, or checkpoint.resume=never "
                "with checkpoint.overwrite=true)")
    return None
