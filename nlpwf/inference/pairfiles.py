"""Sentence-pair files (TSV, CSV, JSONL) read in chunks and written atomically.

Reading never holds more than one chunk of rows; writing goes to a hidden temporary file
beside the output that is renamed over it only when every row is written, so an output file
that exists is always complete.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from nlpwf.errors import UserError
from nlpwf.results.files import AtomicFile

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl"}
# Column names tried in order when none is configured: nlpwf's own, then GLUE's.
SENTENCE1 = ("sentence1", "#1 String")
SENTENCE2 = ("sentence2", "#2 String")
LABEL = ("label", "Quality")

# A CSV field may be long (a paragraph); the csv module's default cap is 128 KiB.
csv.field_size_limit(16 * 1024 * 1024)


def file_format(path: Path) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown file type {Path(path).suffix or '(none)'!r}: use a .tsv, .csv or .jsonl file")
    return fmt


@dataclass
class Chunk:
    """Rows as read (lists for TSV/CSV, dicts for JSONL) and the fields nlpwf needs from them."""

    rows: list
    sentence1: list[str]
    sentence2: list[str]
    labels: list[int] | None
    first_line: int


class PairReader:
    """Iterate a pair file in chunks. Columns are found from the header (or the first JSON
    object) before any row is scored, so a wrong file fails before any work is done."""

    def __init__(self, path: str | Path, sentence1: str | None = None, sentence2: str | None = None,
                 label: str | None | bool = None, chunk_rows: int = 4096):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise UserError(f"{self.path} not found: give an existing .tsv, .csv or .jsonl file")
        if chunk_rows < 1:
            raise UserError(f"chunk_rows={chunk_rows}: use 1 or more rows per chunk")
        self.format = file_format(self.path)
        self.chunk_rows = chunk_rows
        self._file = self.path.open(encoding="utf-8-sig", newline="")
        self._lines = self._records()
        self._first = next(self._lines, None)
        if self._first is None:
            self.close()
            raise UserError(f"{self.path} is empty: it needs a header line (or JSON keys) naming the two sentences, and at least one pair")
        self.header = self._first[1] if self.format != "jsonl" else list(self._first[1])
        self.columns = [self._column(sentence1, SENTENCE1, "sentence1_column"), self._column(sentence2, SENTENCE2, "sentence2_column")]
        self.label_column = self._column(label if isinstance(label, str) else None, LABEL, "label_column") if label else None
        if self.format != "jsonl":
            self._first = None  # the header line is not a row
        self.rows_read = 0

    def _records(self) -> Iterator[tuple[int, object]]:
        if self.format == "jsonl":
            for lineno, line in enumerate(self._file, start=1):
                if line.strip():
                    yield lineno, self._json(line, lineno)
            return
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if self.format == "tsv" else {}
        reader = csv.reader(self._file, **dialect)
        for row in reader:
            if row:
                yield reader.line_num, row

    def _json(self, line: str, lineno: int) -> dict:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{self.path}:{lineno}: not valid JSON ({e.msg}): each line must be one JSON object") from e
        if not isinstance(record, dict):
            raise UserError(f"{self.path}:{lineno}: a JSON {type(record).__name__}, not an object: each line must be one JSON object")
        return record

    def _column(self, configured: str | None, candidates: tuple[str, ...], key: str) -> str:
        names = [configured] if configured else list(candidates)
        for name in names:
            if name in self.header:
                return name
        found = ", ".join(map(repr, self.header[:8]))
        raise UserError(f"{self.path} has no column {' or '.join(map(repr, names))} (it has {found}): rename it or set stage.{key}=NAME")

    def _fields(self, lineno: int, record) -> tuple[str, str, int | None]:
        if self.format == "jsonl":
            missing = [c for c in self.columns + ([self.label_column] if self.label_column else []) if c not in record]
            if missing:
                raise UserError(f"{self.path}:{lineno}: no key {missing[0]!r}: every line needs the keys of the first")
            values = [record[c] for c in self.columns]
            label = record[self.label_column] if self.label_column else None
        else:
            if len(record) != len(self.header):
                raise UserError(f"{self.path}:{lineno}: {len(record)} fields where the header has {len(self.header)}: fix that line")
            values = [record[self.header.index(c)] for c in self.columns]
            label = record[self.header.index(self.label_column)] if self.label_column else None
        if not all(isinstance(v, str) for v in values):
            raise UserError(f"{self.path}:{lineno}: a sentence is not text: both sentences must be strings")
        return values[0], values[1], None if label is None else self._label(label, lineno)

    def _label(self, value, lineno: int) -> int:
        if str(value).strip() not in ("0", "1"):
            raise UserError(f"{self.path}:{lineno}: label {value!r} is not 0 or 1: fix the {self.label_column} column")
        return int(str(value).strip())

    def chunks(self) -> Iterator[Chunk]:
        lines = self._lines if self._first is None else _prepend(self._first, self._lines)
        chunk = None
        for lineno, record in lines:
            if chunk is None:
                chunk = Chunk([], [], [], [] if self.label_column else None, lineno)
            s1, s2, label = self._fields(lineno, record)
            chunk.rows.append(record)
            chunk.sentence1.append(s1)
            chunk.sentence2.append(s2)
            if chunk.labels is not None:
                chunk.labels.append(label)
            if len(chunk.rows) == self.chunk_rows:
                self.rows_read += len(chunk.rows)
                yield chunk
                chunk = None
        if chunk is not None:
            self.rows_read += len(chunk.rows)
            yield chunk
        if self.rows_read == 0:
            raise UserError(f"{self.path} has a header but no pairs: give at least one pair")

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _prepend(first, rest):
    yield first
    yield from rest


class AtomicWriter:
    """Rows out in the input's format, plus nlpwf's columns, via a hidden temp file."""

    def __init__(self, path: str | Path, fmt: str, header: list[str] | None, extra: list[str]):
        self.path = Path(path).expanduser()
        self.format = fmt
        self.extra = extra
        if not self.path.parent.is_dir():
            raise UserError(f"{self.path.parent} does not exist: create it or choose another stage.output")
        if header is not None:
            clash = [c for c in extra if c in header]
            if clash:
                raise UserError(f"the input already has a column {clash[0]!r}, which predict writes: rename that column")
        self._out = AtomicFile(self.path, newline="")
        self._file = self._out.file
        self._csv = csv.writer(self._file) if fmt == "csv" else None
        if header is not None and fmt != "jsonl":
            self._write_row(header + extra)

    def _write_row(self, values: list) -> None:
        if self.format == "csv":
            self._csv.writerow(values)
        else:  # TSV as GLUE writes it: no quoting; read from TSV, fields hold no tab or newline
            self._file.write("\t".join(map(str, values)) + "\n")

    def write(self, rows: list, extra_values: list[list]) -> None:
        for row, values in zip(rows, zip(*extra_values)):
            if self.format == "jsonl":
                record = {**row, **dict(zip(self.extra, values))}
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                self._write_row(list(row) + list(values))

    def commit(self) -> None:
        self._out.commit()

    def abort(self) -> None:
        self._out.abort()
