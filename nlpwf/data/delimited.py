"""The one reader of delimited text: CSV and TSV files, read record by record.

Every CSV or TSV nlpwf reads goes through `read` (`rows` opens the file for it): GLUE's folders (glue.py), your own training
files (files.py) and the serving stages' inputs (inference.textfiles, streamed in chunks).
TSV is read as GLUE writes it: tab separated, with no quoting (MRPC and SST-2 hold stray `"`
that a CSV reader would take for quotes, silently merging rows). CSV is the csv module's
default dialect (quoted fields may hold commas and newlines). Either may start with a
byte-order mark (GLUE's MRPC does). Blank lines are skipped.

`to_dataset` writes such rows, a block at a time, into an Arrow file in datasets' cache and
memory-maps it from there, so a file of a million rows is never a million rows of Python objects.
"""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

import datasets
import pyarrow as pa

from nlpwf.errors import UserError

DIALECTS = {"csv": {}, "tsv": {"delimiter": "\t", "quoting": csv.QUOTE_NONE}}

# A CSV field may be long (a paragraph); the csv module's default cap is 128 KiB.
csv.field_size_limit(16 * 1024 * 1024)


def open_text(path: str | Path) -> TextIO:
    """A text file opened as every reader of nlpwf's reads it: UTF-8, a byte-order mark dropped,
    newlines left to the csv module (a quoted CSV field may hold one)."""
    return Path(path).open(encoding="utf-8-sig", newline="")


def rows(path: str | Path, fmt: str) -> Iterator[tuple[int, list[str]]]:
    """`read` of the file at `path`, opened here and closed when the rows end."""
    with open_text(path) as f:
        yield from read(f, fmt, path)


def read(f: TextIO, fmt: str, path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every record of an open CSV (`fmt` "csv") or TSV ("tsv") file,
    the header line included, read one record at a time. The line number is the record's last
    line (a quoted CSV field may span lines). Bytes that are not UTF-8, or a record the csv module
    cannot parse, end the read with a UserError naming the line (`path` is for the messages)."""
    reader = csv.reader(f, **DIALECTS[fmt])
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            raise not_utf8(path, reader.line_num, e) from None
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: {e}: fix that line") from None
        if row:
            yield reader.line_num, row


def not_utf8(path: str | Path, lineno: int, error: UnicodeDecodeError) -> UserError:
    """The error for bytes that are not UTF-8, found while reading past line `lineno`: text is
    decoded a buffer at a time, so the bad byte is somewhere after it."""
    return UserError(f"{path}: not UTF-8 text after line {lineno} ({error.reason}): save the file as UTF-8")


def records(lines: Iterator[tuple[int, list[str]]], header: Sequence[str], path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """The records of `lines` after the header, each checked to have one field per column."""
    for lineno, row in lines:
        if len(row) != len(header):
            raise UserError(f"{path}:{lineno}: {len(row)} fields where the header has {len(header)}: fix that line")
        yield lineno, row


def to_dataset(generate: Callable[..., Iterator[dict]], gen_kwargs: dict, features: datasets.Features, path: Path,
               reader: str, cache_dir: str | None = None) -> datasets.Dataset:
    """The rows `generate(**gen_kwargs)` yields from the file at `path`, as a memory-mapped
    Dataset of `features`. The cache entry is this file as it is now and `reader` (what reads it,
    and its version): a rewritten file, or a reader that now reads it differently, is read again.
    A UserError raised while reading (a bad line) leaves no cache entry behind.

    Written as blocks of columns into an Arrow stream file, the format datasets memory-maps
    (`Dataset.from_file`): datasets' own `from_generator` encodes every row on its own, about ten
    times slower than the parsing, which a CSV of a million rows would feel."""
    stat = path.stat()
    key = f"{reader}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    target = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "nlpwf" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.arrow"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_arrow(generate(**gen_kwargs), features.arrow_schema, target)
    return datasets.Dataset.from_file(str(target))


def _write_arrow(rows: Iterator[dict], schema: pa.Schema, target: Path) -> None:
    # Each process writes its own temporary file and renames it into place: the ranks of a job
    # may read the same file at once, and a reader never sees half a cache entry.
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as f:
            with pa.ipc.new_stream(f, schema) as writer:
                for block in _blocks(rows, schema.names):
                    writer.write_table(pa.table(block, schema=schema))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _blocks(rows: Iterator[dict], names: list[str], size: int = 10_000) -> Iterator[dict[str, list]]:
    """The rows as blocks of `size` rows, each a column-by-column dict."""
    block: dict[str, list] = {name: [] for name in names}
    for row in rows:
        for name in names:
            block[name].append(row[name])
        if len(block[names[0]]) == size:
            yield block
            block = {name: [] for name in names}
    if block[names[0]]:
        yield block
