"""Your own files: CSV, TSV, JSON Lines or Parquet, told apart by extension.

Each is read by `datasets` into its Arrow cache and memory-mapped from there, so a file of a
million rows is never a million rows of Python objects. CSV and TSV are read with every column
as text (pandas would otherwise guess each chunk's types on its own, and turn a text "NA" or
"null" into a missing value); which labels are numbers is decided afterwards, once, for the
whole column (tasks.py). TSV is tab separated with no quoting, as GLUE writes it.
"""
from __future__ import annotations

import csv
from pathlib import Path

import datasets

from nlpwf.errors import UserError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
KNOWN = ".csv, .tsv, .jsonl (or .json) or .parquet"

# A CSV field may be long (a paragraph); the csv module's default cap is 128 KiB.
csv.field_size_limit(16 * 1024 * 1024)


def file_format(path: Path, formats: dict[str, str] = FORMATS, known: str = KNOWN) -> str:
    """The file's format by extension, out of `formats` (the serving stages read fewer)."""
    fmt = formats.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: nlpwf cannot read a {Path(path).suffix or 'extensionless'!r} file: use a {known} file")
    return fmt


def untyped(path: Path) -> bool:
    """Whether the file's values are all text (CSV, TSV), so numbers have to be recognised."""
    return file_format(path) in ("csv", "tsv")


def read_file(path: str | Path, key: str, cache_dir: str | None = None) -> datasets.Dataset:
    """One file as a memory-mapped Dataset with the file's own columns. `key` names the config
    key that points at it, for the messages."""
    path = Path(path).expanduser()
    fmt = file_format(path)
    if not path.is_file():
        raise UserError(f"{key}={path} is not a file: give an existing {KNOWN} file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty: it needs a header line (or JSON keys) and at least one row")
    kwargs: dict = {}
    builder = fmt
    if fmt in ("csv", "tsv"):
        builder = "csv"
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        header = _header(path, dialect)
        kwargs = {**dialect, "features": datasets.Features({c: datasets.Value("string") for c in header}),
                  "keep_default_na": False, "na_filter": False, "encoding": "utf-8-sig"}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # the parser's own message says what and where; the fix is always the file
        cause = e.__cause__ or e
        message = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else type(cause).__name__
        raise UserError(f"{path} could not be read as {fmt.upper()} ({message}): fix the file") from e
    if len(ds) == 0:
        raise UserError(f"{path} has no rows: an empty split cannot be trained or evaluated on")
    return ds


def _header(path: Path, dialect: dict) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f, **dialect), None)
    if not header:
        raise UserError(f"{path} has no header line: its first line must name the columns")
    blank = [i + 1 for i, name in enumerate(header) if not name.strip()]
    if blank:
        raise UserError(f"{path}: column {blank[0]} of the header has no name: name every column in the first line")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise UserError(f"{path}: the header names column {duplicates[0]!r} twice: give each column its own name")
    return header
