"""Writing results so that a reader never sees half of them: write beside, then rename."""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

METRICS_FILE = "metrics.json"
MODEL_DIR = "model"
TRAIN_LOG_FILE = "train_log.csv"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicFile:
    """A text file written under a hidden name beside `path` and renamed over it on commit, so
    a file at `path` is always complete. As a context manager: commit on success, else abort."""

    def __init__(self, path: str | Path, newline: str | None = None) -> None:
        self.path = Path(path)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.file = os.fdopen(fd, "w", encoding="utf-8", newline=newline)

    def commit(self) -> None:
        self.file.close()
        os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are for everyone who can read the dir
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_json(path: Path, data: dict) -> None:
    with AtomicFile(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with AtomicFile(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_train_log(path: Path, history: list[dict]) -> None:
    """transformers' log history (one dict per logging or eval step) as a CSV table."""
    columns = ["step", "epoch"] + sorted({k for h in history for k in h} - {"step", "epoch"})
    write_csv(path, history, columns)


def read_metrics(job_dir: Path) -> dict | None:
    path = Path(job_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def staging_dir(final: Path) -> Path:
    """An empty folder beside `final` to write into before `publish_dir`."""
    staged = Path(tempfile.mkdtemp(dir=Path(final).parent, prefix=f".{Path(final).name}.", suffix=".tmp"))
    os.chmod(staged, 0o777 & ~_umask())
    return staged


def publish_dir(staged: Path, final: Path) -> None:
    """Move a finished folder into place; an older one there is replaced only now."""
    final = Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
