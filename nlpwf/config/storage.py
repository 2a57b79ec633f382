"""Storage errors found mid-run (a full or read-only disk), worded as one line."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

_STORAGE_TEXT = ("No space left on device", "file write failed", "os error 28", "Disk quota exceeded", "Read-only file system")


def storage_problem(exc: BaseException, job_dir: Path | None) -> str | None:
    """One line for a write that failed because the disk is full or read-only, else None.
    torch.save reports a full disk without an errno ("file write failed", "unexpected pos",
    "iostream error"), so a failure on a disk with (almost) nothing left counts too."""
    where = Path(getattr(exc, "filename", None) or job_dir or ".")
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) and isinstance(exc, OSError):
        return f"cannot write {where}: {os.strerror(code)}: set hydra.run.dir to a writable folder"
    free = _free_bytes(job_dir or where)
    if code in (errno.ENOSPC, errno.EDQUOT) or any(t in text for t in _STORAGE_TEXT) or free < _ALMOST_FULL:
        return (f"the disk is full writing to {job_dir or where} ({free / 2**20:.1f} MiB free): free some space or "
                f"set hydra.run.dir to a bigger disk, then continue with training.resume=auto")
    return None


_ALMOST_FULL = 4 * 2**20


def _free_bytes(path: Path) -> float:
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return float("inf")
