"""Writing results so that a reader never sees half of them, on a local disk and on a blob mount.

On a local disk (a job dir here, a node's own disk) a file is written beside its final name,
flushed to disk and renamed over it, and the folder is flushed after: a file at its name is
always whole, even after a power cut. A folder (model/) is staged beside its final name and
moved into place.

On a blob mount (Azure ML's rw_mount outputs, blobfuse) neither does what POSIX promises: a
rename is a copy and a delete, file by file for a folder, and chmod is not supported. There a
finished folder is copied with plain writes, each file once (`publish`), and MARKER, written
last, lists every file with its size. A reader (a download of the results, training's resume)
trusts the marker's list only (`listed`): no marker, or a listed file missing or of another
size, is an incomplete folder.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

METRICS_FILE = "metrics.json"
MODEL_DIR = "model"
TRAIN_LOG_FILE = "train_log.csv"
MARKER = "nlpwf_complete.json"   # a folder's completeness marker: {"files": {relative path: size}, ...}
_CHUNK = 4 * 1024 * 1024


@functools.lru_cache(maxsize=1)
def umask() -> int:
    """This process's umask, read without changing it: os.umask can only set it, and setting it
    to read it would change the mode of files other threads create meanwhile."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022  # no /proc (not Linux): the usual default


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a new or renamed name) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A text file written under a hidden name beside `path` and renamed over it on commit, so
    a file at `path` is always complete. As a context manager: commit on success, else abort.
    For local disks only (a rename on a blob mount is a copy and a delete)."""

    def __init__(self, path: str | Path, newline: str | None = None) -> None:
        self.path = Path(path)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.file = os.fdopen(fd, "w", encoding="utf-8", newline=newline)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # the data is on disk before the name points at it
        self.file.close()
        os.chmod(self.tmp, 0o666 & ~umask())  # mkstemp makes it private; results are for everyone who can read the dir
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)  # and the new name itself

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
    os.chmod(staged, 0o777 & ~umask())
    return staged


def publish_dir(staged: Path, final: Path) -> None:
    """Move a finished folder into place (local disks); an older one there is replaced only now."""
    final = Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# --- folders on a blob mount: plain writes, a marker last --------------------------------------

def write_in_place(path: Path, data: bytes) -> None:
    """One file written once at its final name (no temporary name, no chmod), flushed."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def copy_file(source: Path, target: Path) -> int:
    """`source` copied to `target` with plain writes, chunk by chunk; its size."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)
        dst.flush()
        os.fsync(dst.fileno())
        return dst.tell()


def write_marker(folder: Path, sizes: dict[str, int], **fields) -> None:
    """MARKER in `folder`, listing `sizes` ({relative path: bytes}): written last, in place."""
    text = json.dumps({**fields, "files": dict(sorted(sizes.items()))}, indent=2, sort_keys=True) + "\n"
    write_in_place(Path(folder) / MARKER, text.encode())
    fsync_dir(folder)


def read_marker(folder: Path) -> dict | None:
    """The folder's marker, or None when it has none that parses (a half-written one does not)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
        sizes = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(sizes, dict) or not all(isinstance(n, str) and isinstance(s, int) for n, s in sizes.items()):
        return None
    return marker


def listed(folder: Path) -> dict[str, int] | None:
    """The files the folder's marker vouches for ({relative path: size}), when every one of them
    is there at its size; None when the folder is not complete."""
    marker = read_marker(folder)
    if marker is None:
        return None
    try:
        whole = all((Path(folder) / name).stat().st_size == size for name, size in marker["files"].items())
    except OSError:
        return None
    return marker["files"] if whole else None


def tree_files(folder: Path) -> list[str]:
    """Every file under `folder` (relative paths, sorted), the marker aside."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def publish(source: Path, target: Path, names: list[str] | None = None) -> dict[str, int]:
    """A finished local folder into `target` (a blob mount): the marker of an earlier publication
    removed first, then each file (`names`, default all) copied with plain writes, then the marker.
    Nothing is renamed or chmod-ed there. Returns what the marker lists."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / MARKER).unlink(missing_ok=True)  # until the new marker, the folder is incomplete
    sizes = {name: copy_file(source / name, target / name) for name in (tree_files(source) if names is None else names)}
    write_marker(target, sizes)
    return sizes


def copy_listed(source: Path, target: Path) -> dict[str, int]:
    """A reader's copy of a published folder: only the files its marker lists, checked against
    their listed sizes. Raises when `source` is not complete."""
    sizes = listed(source)
    if sizes is None:
        raise RuntimeError(f"{source} is not complete: no {MARKER}, or a file it lists is missing or of another size")
    for name, size in sizes.items():
        if copy_file(Path(source) / name, Path(target) / name) != size:
            raise RuntimeError(f"{Path(source) / name} changed while it was read")
    write_marker(target, sizes)
    return sizes
