"""Your own files: CSV, TSV, JSON Lines or Parquet, told apart by extension.

Each is read into datasets' Arrow cache and memory-mapped from there, so a file of a million
rows is never a million rows of Python objects. CSV and TSV are read by nlpwf's one reader of
delimited text (delimited.py; TSV as GLUE writes it, tabs and no quoting) with every column as
text, so a text "NA" or "null" stays text; which labels are numbers is decided afterwards,
once, for the whole column (tasks.py). JSON Lines and Parquet are read by datasets' own builders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import datasets

from nlpwf.data import delimited
from nlpwf.errors import UserError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
KNOWN = ".csv, .tsv, .jsonl (or .json) or .parquet"
# Bump when what the reader produces from a CSV or TSV file changes: the Arrow cache is keyed on it.
READER_VERSION = "1"


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
    if fmt in ("csv", "tsv"):
        header = _header(path, fmt)
        features = datasets.Features({column: datasets.Value("string") for column in header})
        # A tuple: datasets would take a list in gen_kwargs for shards to spread over processes.
        return delimited.to_dataset(_records, {"path": path, "fmt": fmt, "header": tuple(header)}, features, path,
                                    f"files {READER_VERSION} {fmt}", cache_dir)
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:  # the parser's own message says what and where; the fix is always the file
        cause = e.__cause__ or e
        message = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else type(cause).__name__
        raise UserError(f"{path} could not be read as {fmt.upper()} ({message}): fix the file") from e
    if len(ds) == 0:
        raise UserError(f"{path} has no rows: an empty split cannot be trained or evaluated on")
    return ds


def _records(path: Path, fmt: str, header: tuple[str, ...]) -> Iterator[dict]:
    """The rows after the header, as {column: text}, each checked to have the header's fields."""
    lines = delimited.rows(path, fmt)
    next(lines)  # the header
    count = 0
    for _, row in delimited.records(lines, header, path):
        count += 1
        yield dict(zip(header, row))
    if count == 0:
        raise UserError(f"{path} has no rows: an empty split cannot be trained or evaluated on")


def _header(path: Path, fmt: str) -> list[str]:
    lines = delimited.rows(path, fmt)
    _, header = next(lines, (None, None))
    lines.close()
    if not header:
        raise UserError(f"{path} has no header line: its first line must name the columns")
    blank = [i + 1 for i, name in enumerate(header) if not name.strip()]
    if blank:
        raise UserError(f"{path}: column {blank[0]} of the header has no name: name every column in the first line")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise UserError(f"{path}: the header names column {duplicates[0]!r} twice: give each column its own name")
    return header
