"""Text files for the serving stages (TSV, CSV, JSONL): read in chunks, written atomically.

A file holds one text per row, or a pair, plus any other columns (passed through to the
output), and for `evaluate` a label. CSV and TSV are read by nlpwf's one reader of delimited
text (data.delimited), JSON Lines line by line. Reading never holds more than one chunk of rows; writing
goes to a hidden temporary file beside the output that is renamed over it only when every row
is written, so an output file that exists is always complete.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from omegaconf import DictConfig

from nlpwf.data import delimited, files, glue
from nlpwf.data.tasks import Task
from nlpwf.errors import UserError
from nlpwf.results.files import AtomicFile

# Streamed row by row, so only the line-oriented formats (training reads Parquet and JSON too).
FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl"}
KNOWN = ".tsv, .csv or .jsonl"
# Column names tried, after the model's own, when none is configured: nlpwf's, then GLUE's.
PAIR = (("sentence1", "#1 String"), ("sentence2", "#2 String"))
SINGLE = (("sentence", "text"),)
LABELS = ("label", "Quality")


def file_format(path: Path) -> str:
    return files.file_format(path, FORMATS, KNOWN)


def configured_columns(stage: DictConfig) -> list[str] | None:
    """The text columns a serving stage's config names: stage.text_columns, or the older
    stage.sentence1_column / sentence2_column of pair models (either may be left to detection, as
    None); None to find them all from the model."""
    if stage.get("text_columns"):
        columns = stage.text_columns
        return [columns] if isinstance(columns, str) else list(columns)
    pair = [stage.get("sentence1_column"), stage.get("sentence2_column")]
    return pair if any(pair) else None


def text_candidates(task: Task, configured: Sequence[str] | None) -> list[list[str]]:
    """For each text the model takes, the column names to look for: the configured ones, else the
    model's own (the columns it was trained on), its GLUE task's file columns, then the usual names."""
    if configured and len(configured) != len(task.text_columns):
        raise UserError(f"{len(configured)} text column(s) given ({', '.join(map(str, configured))}) but the model takes "
                        f"{len(task.text_columns)} ({', '.join(task.text_columns)}): name {len(task.text_columns)}")
    files = list(glue.TASKS[task.name].texts.values()) if task.name in glue.TASKS else []
    usual = PAIR if len(task.text_columns) == 2 else SINGLE
    found = [_unique([own, *files[i:i + 1], *usual[i]]) for i, own in enumerate(task.text_columns)]
    return [[name] if name else detected for name, detected in zip(configured or [None] * len(found), found)]


def label_candidates(task: Task, configured: str | None) -> list[str]:
    if configured:
        return [configured]
    files = [glue.TASKS[task.name].label] if task.name in glue.TASKS else []
    return _unique([task.label_column, *files, *LABELS])


def label_values(task: Task, values: list, path: Path, lines: list[int], column: str) -> list:
    """Labels as a file writes them, in the model's terms: class ids (from a class name, or an id
    written as a number) or float scores."""
    out = []
    names = {name: i for i, name in enumerate(task.labels)} | {name: i for i, name in enumerate(task.shown_labels())}
    for value, line in zip(values, lines):
        text = str(value).strip()
        if task.regression:
            try:
                out.append(float(text))
            except ValueError:
                raise UserError(f"{path}:{line}: score {value!r} in column {column!r} is not a number: fix that row") from None
        elif text in names:
            out.append(names[text])
        elif text.isdigit() and int(text) < len(task.labels):
            out.append(int(text))
        else:
            raise UserError(f"{path}:{line}: label {value!r} in column {column!r} is not one of the model's labels "
                            f"({', '.join(task.shown_labels())}) or their ids 0 to {len(task.labels) - 1}: fix that row")
    return out


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


@dataclass
class Chunk:
    """Rows as read (lists for TSV/CSV, dicts for JSONL), their texts and labels as written."""

    rows: list
    texts: list[list[str]]         # one list per text column
    labels: list | None
    lines: list[int]

    @property
    def sentence1(self) -> list[str]:
        return self.texts[0]

    @property
    def sentence2(self) -> list[str]:
        return self.texts[1]


class TextReader:
    """Iterate a text file in chunks. Columns are found from the header (or the first JSON
    object) before any row is scored, so a wrong file fails before any work is done.
    `texts`: for each text, the column names to try in order; `label`: likewise, or None."""

    def __init__(self, path: str | Path, texts: Sequence[Sequence[str]] = PAIR, label: Sequence[str] | None = None,
                 chunk_rows: int = 4096, option: str = "stage.text_columns"):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise UserError(f"{self.path} not found: give an existing .tsv, .csv or .jsonl file")
        if chunk_rows < 1:
            raise UserError(f"chunk_rows={chunk_rows}: use 1 or more rows per chunk")
        self.format = file_format(self.path)
        self.chunk_rows = chunk_rows
        self._file = delimited.open_text(self.path)
        # Records as (line number, fields or JSON object); CSV and TSV by nlpwf's one delimited reader.
        self._lines = self._json_records() if self.format == "jsonl" else delimited.read(self._file, self.format, self.path)
        self._first = next(self._lines, None)
        if self._first is None:
            self.close()
            raise UserError(f"{self.path} is empty: it needs a header line (or JSON keys) naming the text columns, and at least one row")
        self.header = self._first[1] if self.format != "jsonl" else list(self._first[1])
        try:
            self.columns = [self._column(names, option) for names in texts]
            self.label_column = self._column(label, "stage.label_column") if label else None
        except UserError:
            self.close()
            raise
        if self.format != "jsonl":
            self._first = None  # the header line is not a row
            self._lines = delimited.records(self._lines, self.header, self.path)
        self.rows_read = 0

    def _json_records(self) -> Iterator[tuple[int, dict]]:
        lineno = 0
        try:
            for lineno, line in enumerate(self._file, start=1):
                if line.strip():
                    yield lineno, self._json(line, lineno)
        except UnicodeDecodeError as e:
            raise delimited.not_utf8(self.path, lineno, e) from None

    def _json(self, line: str, lineno: int) -> dict:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{self.path}:{lineno}: not valid JSON ({e.msg}): each line must be one JSON object") from e
        if not isinstance(record, dict):
            raise UserError(f"{self.path}:{lineno}: a JSON {type(record).__name__}, not an object: each line must be one JSON object")
        return record

    def _column(self, names: Sequence[str], key: str) -> str:
        for name in names:
            if name in self.header:
                return name
        found = ", ".join(map(repr, self.header[:8]))
        hint = f"set {key}=NAME" if key == "stage.label_column" else f"set {key}=[NAME] (or [NAME1,NAME2] for a pair)"
        raise UserError(f"{self.path} has no column {' or '.join(map(repr, names))} (it has {found}): rename it or {hint}")

    def _fields(self, lineno: int, record) -> tuple[list[str], object]:
        if self.format == "jsonl":
            missing = [c for c in self.columns + ([self.label_column] if self.label_column else []) if c not in record]
            if missing:
                raise UserError(f"{self.path}:{lineno}: no key {missing[0]!r}: every line needs the keys of the first")
            values = [record[c] for c in self.columns]
            label = record[self.label_column] if self.label_column else None
        else:  # as many fields as the header: delimited.records checked
            values = [record[self.header.index(c)] for c in self.columns]
            label = record[self.header.index(self.label_column)] if self.label_column else None
        if not all(isinstance(v, str) for v in values):
            raise UserError(f"{self.path}:{lineno}: a text is not a string: every text column must hold text")
        return values, label

    def chunks(self) -> Iterator[Chunk]:
        lines = self._lines if self._first is None else _prepend(self._first, self._lines)
        chunk = None
        for lineno, record in lines:
            if chunk is None:
                chunk = Chunk([], [[] for _ in self.columns], [] if self.label_column else None, [])
            values, label = self._fields(lineno, record)
            chunk.rows.append(record)
            chunk.lines.append(lineno)
            for column, value in zip(chunk.texts, values):
                column.append(value)
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
            raise UserError(f"{self.path} has a header but no rows: give at least one row")

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
