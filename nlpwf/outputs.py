"""Writing results so that a reader never sees half of them: write beside, then rename."""
from __future__ import annotations

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


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are for everyone who can read the dir
    os.replace(tmp, path)


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


def read_metrics(job_dir: Path) -> dict | None:
    path = Path(job_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_train_log(path: Path, history: list[dict]) -> None:
    """transformers' log history (one dict per logging or eval step) as a CSV table."""
    import csv

    columns = ["step", "epoch"] + sorted({k for h in history for k in h} - {"step", "epoch"})
    tmp = Path(path).with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)
