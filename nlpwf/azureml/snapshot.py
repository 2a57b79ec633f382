"""The code an Azure ML job runs: a copy of the project's runnable parts, and nothing secret.

Only listed parts are copied (never the whole tree), and inside them anything that is a
secret, a cache, a virtualenv, a run's outputs or too large to belong in code stays out.
An `.amlignore` with the same rules goes along for Azure's own upload, so nothing slips in
even if files are added to the folder afterwards.
"""
from __future__ import annotations

import fnmatch
import logging
import shutil
from pathlib import Path

from nlpwf import PROJECT_ROOT

log = logging.getLogger(__name__)

# What a job needs: the package, its configs, the launcher plugins, and what installs them.
INCLUDE = ("nlpwf", "conf", "launchers", "setup.cfg", "pyproject.toml", "README.md")

# Never copied, at any depth (fnmatch patterns on a file or folder name).
EXCLUDE_DIRS = (".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info",
                ".venv", "venv", ".tox", ".ipynb_checkpoints", "outputs", "multirun", "mlruns", "wandb",
                ".azureml", "node_modules")
EXCLUDE_FILES = (".env", ".env.*", "*.env", "config.json", "*.pem", "*.key", "*.pfx", "*.p12", "id_rsa*",
                 "id_ed25519*", ".netrc", ".git-credentials", "*.pyc", ".DS_Store")
AMLIGNORE = ".amlignore"


def excluded(path: Path, max_bytes: int) -> str | None:
    """Why `path` stays out of the snapshot, or None to copy it."""
    name = path.name
    if path.is_symlink():
        return "symlink"  # could point anywhere, e.g. at a credentials file
    if path.is_dir():
        if any(fnmatch.fnmatch(name, p) for p in EXCLUDE_DIRS) or (path / "pyvenv.cfg").exists():
            return "cache, virtualenv or outputs"
        return None
    if any(fnmatch.fnmatch(name, p) for p in EXCLUDE_FILES):
        return "secret or cache"
    if path.stat().st_size > max_bytes:
        return f"over {max_bytes // 2**20} MB"
    return None


def _copy(src: Path, dest: Path, max_bytes: int, skipped: list[tuple[str, str]], root: Path) -> None:
    reason = excluded(src, max_bytes)
    if reason:
        skipped.append((str(src.relative_to(root)), reason))
        return
    if src.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        for child in sorted(src.iterdir()):
            _copy(child, dest / child.name, max_bytes, skipped, root)
    else:
        shutil.copy2(src, dest)


def amlignore() -> str:
    lines = ["# Written by nlpwf: Azure ML's upload skips these (same rules as the snapshot itself)."]
    lines += [f"{p}/" for p in EXCLUDE_DIRS] + list(EXCLUDE_FILES)
    return "\n".join(lines) + "\n"


def build(dest: Path, root: Path = PROJECT_ROOT, max_file_mb: float = 20.0) -> Path:
    """Copy the project's INCLUDE parts under `root` into `dest` (emptied first). Returns `dest`."""
    dest, root = Path(dest), Path(root)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    max_bytes = int(max_file_mb * 2**20)
    skipped: list[tuple[str, str]] = []
    for part in INCLUDE:
        if (root / part).exists():
            _copy(root / part, dest / part, max_bytes, skipped, root)
    (dest / AMLIGNORE).write_text(amlignore())
    noteworthy = [f"{p} ({why})" for p, why in skipped if not why.startswith("cache")]
    if noteworthy:  # names only: a secret's name is not the secret
        log.info("left out of the code snapshot: %s", ", ".join(noteworthy))
    return dest


def ships(path: Path, root: Path = PROJECT_ROOT) -> bool:
    """Whether a file of the project is in every snapshot (so a job can import it)."""
    try:
        rel = Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return bool(rel.parts) and rel.parts[0] in INCLUDE and excluded(Path(root) / rel, max_bytes=2**62) is None


def files(snapshot_dir: Path) -> list[str]:
    """Every file in a snapshot, relative and sorted (for tests and the job log)."""
    snapshot_dir = Path(snapshot_dir)
    return sorted(str(p.relative_to(snapshot_dir)) for p in snapshot_dir.rglob("*") if p.is_file())
