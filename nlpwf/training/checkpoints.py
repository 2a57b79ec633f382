"""Checkpoints that survive a kill at any moment, and resuming from the newest complete one.

transformers' Trainer writes `checkpoint-N/` (weights, optimizer, scheduler, RNG state of every
rank, trainer_state.json with the step and log history) straight into its final folder, file by
file, from several ranks. A process killed half-way leaves a folder that looks like a checkpoint,
and Trainer's own `get_last_checkpoint` would pick it. So nlpwf marks a checkpoint complete only
once every rank has written its part: after a barrier, each rank flushes the files it sees in
the folder and reports them with their sizes through a collective, and rank 0 writes MARKER (results.files),
which lists the union of the reports. A rank sees its own files at once; on a blob mount shared
by several nodes (an Azure ML `checkpoints` output) it may not see another node's new files yet
(the mount caches listings), so a listing of rank 0's folder alone could leave them out. The
marker is written in place, never renamed (a rename on a blob mount is a copy and a delete); a
half-written marker does not parse and so marks nothing. Resuming considers marked checkpoints
only, and old checkpoints are deleted only once a newer one is marked (nlpwf does the rotation
itself, `training.save_total_limit` complete checkpoints are kept).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

from nlpwf.errors import UserError
from nlpwf.results import files
from nlpwf.runtime import collective

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MARKER = files.MARKER  # nlpwf_complete.json
_STEP = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def folder_of(cfg, job_dir: Path) -> Path:
    """Where the job's checkpoints go: the root key `checkpoint_dir` when set (an Azure ML job's
    read-write `checkpoints` output), else <job dir>/checkpoints."""
    configured = cfg.get("checkpoint_dir") if cfg is not None else None
    return Path(str(configured)).expanduser() if configured else Path(job_dir) / CHECKPOINT_DIR


def step_of(path: Path) -> int | None:
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def all_checkpoints(folder: Path) -> list[Path]:
    """Every `checkpoint-N` folder, complete or not, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def is_complete(path: Path) -> bool:
    """Marked complete, and every file the marker lists is still there with its size."""
    return files.listed(path) is not None


def complete_checkpoints(folder: Path) -> list[Path]:
    return [p for p in all_checkpoints(folder) if is_complete(p)]


def newest_complete(folder: Path) -> Path | None:
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seen_files(path: Path) -> dict[str, int]:
    """The files of checkpoint `path` as this rank sees them ({relative path: size}), each flushed
    to disk first (a preempted VM may lose unflushed pages: the marker must never outlive the data
    it vouches for). A rank sees at least the files it wrote itself."""
    path = Path(path)
    sizes = {}
    for name in files.tree_files(path) if path.is_dir() else []:
        try:
            _fsync(path / name)
            sizes[name] = (path / name).stat().st_size
        except FileNotFoundError:  # deleted meanwhile (another rank's rotation of an older folder)
            continue
    return sizes


def mark_complete(path: Path, step: int, reports: list[dict[str, int]]) -> bool:
    """Write the marker of checkpoint `path` (rank 0), listing every file that any rank reported
    (`reports`, in rank order, from seen_files). Two ranks that see one file at different sizes
    are not both right (a stale view): then nothing is marked, and resuming takes the checkpoint
    before. Whether the checkpoint was marked."""
    path = Path(path)
    union: dict[str, int] = {}
    for rank, report in enumerate(reports):
        for name, size in report.items():
            if union.setdefault(name, size) != size:
                log.warning("not marking %s complete: rank %d sees %s at %d bytes, another rank at %d", path, rank,
                            name, size, union[name])
                return False
    _fsync(path)
    files.write_marker(path, union, step=step, world_size=len(reports), ranks=[sorted(r) for r in reports])
    return True


def mark_by_every_rank(path: Path, step: int, is_main: bool) -> bool | None:
    """Every rank calls this once its part of checkpoint `path` is written; rank 0 marks it from
    every rank's report (whether it did), the others return None."""
    collective.barrier()  # no rank reports a file that another is still writing
    reports = collective.gather(seen_files(path))
    return mark_complete(path, step, reports) if is_main else None


class CheckpointCallback(TrainerCallback):
    """Marks each checkpoint complete, rotates old ones, and with `save_strategy=steps` also
    saves at each epoch end (transformers offers steps or epochs, not both)."""

    def __init__(self, keep: int | None) -> None:
        self.keep = keep
        self.last_saved = -1

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.save_strategy == SaveStrategy.STEPS and state.global_step != self.last_saved:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_saved = state.global_step
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if mark_by_every_rank(folder, state.global_step, state.is_world_process_zero):  # older ones go only now
            rotate_checkpoints(str(args.output_dir), save_total_limit=self.keep,
                               best_model_checkpoint=state.best_model_checkpoint)
        return control


def _discard_incomplete(folder: Path) -> None:
    for p in all_checkpoints(folder):
        if not is_complete(p):
            log.warning("discarding incomplete checkpoint %s (a run stopped while writing it)", p)
            shutil.rmtree(p, ignore_errors=True)


def resume_point(choice, folder: Path, is_main: bool) -> str | None:
    """What `training.resume` asks for: null (a fresh start), auto (the newest complete
    checkpoint in this job's checkpoints/, or a fresh start if there is none) or a path. Rank 0
    decides from what it sees and every rank takes its answer: ranks on other nodes may see a
    shared output's folder a little differently (a blob mount caches listings)."""
    decision = _decide(choice, Path(folder)) if is_main else None
    kind, value = collective.gather(decision)[0]
    if kind == "error":
        raise UserError(value)
    if kind == "resume":
        log.info("training.resume=%s: resuming from %s", choice, value)
    return value


def _decide(choice, folder: Path) -> tuple[str, str | None]:
    """("resume", checkpoint), ("fresh", None) or ("error", the one-line message)."""
    if choice in (None, False, "null", "none"):
        newest = newest_complete(folder)
        if newest is not None:
            return "error", (f"{folder} already holds checkpoints of an earlier run (newest {newest.name}): "
                             f"continue it with training.resume=auto, or use a new output dir")
        return "fresh", None
    if choice == "auto":
        _discard_incomplete(folder)
        newest = newest_complete(folder)
        if newest is None:
            log.info("training.resume=auto: no complete checkpoint in %s, starting from scratch", folder)
            return "fresh", None
        return "resume", str(newest)
    path = Path(str(choice)).expanduser()
    if not path.is_dir():
        return "error", f"training.resume={choice} is not a directory: use training.resume=auto or a checkpoint-N folder"
    if not is_complete(path):
        return "error", (f"training.resume={choice} is not a complete nlpwf checkpoint (no valid {MARKER}): "
                         f"use training.resume=auto to take the newest complete one")
    return "resume", str(path)


def resume_hint(checkpoint_dir: Path, job_dir: Path) -> str:
    """What to do after a run ended early: where it can continue from."""
    newest = newest_complete(checkpoint_dir)
    if newest is None:
        return "no checkpoint was complete yet: run it again"
    if Path(checkpoint_dir) != Path(job_dir) / CHECKPOINT_DIR:
        return f"newest complete checkpoint: {newest}; continue with training.resume=auto checkpoint_dir={checkpoint_dir}"
    return f"newest complete checkpoint: {newest}; continue with training.resume=auto hydra.run.dir={job_dir}"
