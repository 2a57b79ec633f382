"""GLUE's nine tasks, each read from its folder exactly as GLUE distributes it.

Every task has its own file layout: CoLA's train/dev files have no header line, MNLI's dev
files are dev_matched.tsv and dev_mismatched.tsv, MNLI, QNLI and RTE write their labels as
names and the others as 0/1, STS-B's label is a float score, and GLUE's test files carry no
labels. The files are tab separated with no quoting and may start with a byte-order mark: read
by data.delimited as TSV.

A file is read line by line into datasets' Arrow cache (memory-mapped, so MNLI's 393k pairs
never sit in Python lists), every line checked on the way: a wrong line is reported by number.
Label names and their order are GLUE's (as the Hub's `nyu-mll/glue` names them), so a model
trained from a folder and one trained from the Hub agree on what label 1 means.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import datasets

from nlpwf.data import delimited
from nlpwf.data.tasks import Task, features
from nlpwf.errors import UserError

HUB_ID = "nyu-mll/glue"
# Split names as the Hub names them, and the GLUE file each is read from.
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
MNLI_FILES = {"train": "train.tsv", "validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv",
              "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv"}
# Bump when what the reader produces from a file changes: the Arrow cache is keyed on it.
READER_VERSION = "2"


@dataclass(frozen=True)
class GlueTask:
    name: str
    title: str                      # as GLUE writes it: CoLA, SST-2, ...
    texts: dict[str, str]           # the Hub's text column -> the column of GLUE's file (1 or 2 texts)
    label: str                      # the label column of GLUE's file
    labels: tuple[str, ...]         # class names in GLUE's order (label id = position); () for STS-B's score
    names_in_file: bool = False     # labels written as names (MNLI, QNLI, RTE) rather than as ids 0, 1, ...
    headerless: tuple[str, ...] = ()  # CoLA: train/dev have no header; these are its four fields
    files: dict[str, str] = field(default_factory=lambda: SPLIT_FILES)
    empty_texts: bool = False       # GLUE's own QQP has two empty questions (huggingface/datasets#277)

    @property
    def regression(self) -> bool:
        return not self.labels

    def layout(self) -> str:
        return ", ".join(self.headerless) + " (no header line)" if self.headerless else f"columns {', '.join(self.signature())}"

    def signature(self) -> list[str]:
        """The columns that identify this task's files."""
        return [*self.texts.values(), self.label]

    def as_task(self) -> Task:
        """What a model learns from this task's files: its texts (the Hub's names) and labels."""
        return Task(self.name, tuple(self.texts), "label", self.labels)


NLI = ("entailment", "not_entailment")
TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", "CoLA", {"sentence": "sentence"}, "label", ("unacceptable", "acceptable"),
             headerless=("source", "label", "original_label", "sentence")),
    GlueTask("sst2", "SST-2", {"sentence": "sentence"}, "label", ("negative", "positive")),
    GlueTask("mrpc", "MRPC", {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality", ("not_equivalent", "equivalent")),
    GlueTask("qqp", "QQP", {"question1": "question1", "question2": "question2"}, "is_duplicate", ("not_duplicate", "duplicate"),
             empty_texts=True),
    GlueTask("stsb", "STS-B", {"sentence1": "sentence1", "sentence2": "sentence2"}, "score", ()),
    GlueTask("mnli", "MNLI", {"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label",
             ("entailment", "neutral", "contradiction"), names_in_file=True, files=MNLI_FILES),
    GlueTask("qnli", "QNLI", {"question": "question", "sentence": "sentence"}, "label", NLI, names_in_file=True),
    GlueTask("rte", "RTE", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", NLI, names_in_file=True),
    GlueTask("wnli", "WNLI", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", ("not_entailment", "entailment")),
]}


def task(name: str | None) -> GlueTask:
    if name not in TASKS:
        raise UserError(f"dataset.task={name} is not a GLUE task: use one of {', '.join(TASKS)}, "
                        f"or dataset=files for your own data")
    return TASKS[name]


def split_file(glue: GlueTask, folder: Path, split: str) -> Path:
    if split not in glue.files:
        raise UserError(f"{glue.title} has no split {split!r}: use one of {', '.join(glue.files)}")
    return folder / glue.files[split]


def read_split(glue: GlueTask, path: Path, cache_dir: str | None = None) -> datasets.Dataset:
    """One GLUE file as a memory-mapped Dataset of sentence1 (sentence2) and label."""
    return delimited.to_dataset(rows, {"glue": glue, "path": Path(path)}, features(glue.as_task()), Path(path),
                                f"glue {READER_VERSION} {glue.name}", cache_dir)


def rows(glue: GlueTask, path: Path) -> Iterator[dict]:
    """The rows of one GLUE file as {"sentence1", ("sentence2"), "label"}, each line checked."""
    path = Path(path)
    lines = delimited.rows(path, "tsv")
    first = next(lines, None)
    if first is None:
        raise UserError(f"{path} is empty: GLUE's {glue.title} files have {glue.layout()} and at least one labelled row")
    _check_first_line(glue, path, first[1])
    header = list(glue.headerless) or first[1]
    index = {name: header.index(column) for name, column in zip(("sentence1", "sentence2"), glue.texts.values())}
    label_at = header.index(glue.label)
    count = 0
    for lineno, row in itertools.chain([first], lines) if glue.headerless else lines:  # CoLA's first line is a row
        if len(row) != len(header):
            raise UserError(f"{path}:{lineno}: expected {len(header)} tab-separated columns, found {len(row)}: "
                            f"fix that line (GLUE files use tabs and no quoting)")
        out = {name: row[i] for name, i in index.items()}
        if not glue.empty_texts:
            for i in index.values():
                if not row[i].strip():
                    raise UserError(f"{path}:{lineno}: the {header[i]} column is empty: every row needs its text")
        out["label"] = _label(glue, row[label_at], path, lineno)
        count += 1
        yield out
    if count == 0:
        raise UserError(f"{path} has no rows: an empty split cannot be trained or evaluated on")


def _check_first_line(glue: GlueTask, path: Path, first: list[str]) -> None:
    """Refuse a file that is not this task's: another task's, or GLUE's unlabelled test file."""
    other = _looks_like(first)
    if other is not None and glue.name not in other:
        titles = " / ".join(TASKS[name].title for name in other)
        use = " or ".join(f"dataset={name}" for name in other)
        raise UserError(f"{path} is laid out as GLUE's {titles} ({TASKS[other[0]].layout()}), not as {glue.title} "
                        f"({glue.layout()}): use {use} for this folder, or point dataset.data_dir at a {glue.title} folder")
    texts = list(glue.texts.values())
    if glue.headerless:
        unlabelled = first[:1] == ["index"] and all(t in first for t in texts)
    else:
        missing = [c for c in glue.signature() if c not in first]
        unlabelled = missing == [glue.label]
        if missing and not unlabelled:
            raise UserError(f"{path} has no column {', '.join(map(repr, missing))}: expected GLUE's {glue.title} header "
                            f"with {glue.layout()} (it has {', '.join(first[:10])})")
    if unlabelled:
        eval_split = next(s for s in glue.files if s.startswith("validation"))
        raise UserError(f"{path} has no column {glue.label!r}: it is unlabelled, as GLUE's own test files are "
                        f"(GLUE's {glue.title} train/dev files have {glue.layout()}): use a labelled file "
                        f"or dataset.eval_split={eval_split}")


def _looks_like(first: list[str]) -> list[str] | None:
    """The GLUE tasks whose train/dev files start with this line (RTE's and WNLI's look alike)."""
    cola = TASKS["cola"]
    if len(first) == len(cola.headerless) and first[1].strip() in ("0", "1"):
        return ["cola"]
    matches = [t for t in TASKS.values() if not t.headerless and all(c in first for c in t.signature())]
    if not matches:
        return None
    widest = max(len(t.signature()) for t in matches)  # SST-2's columns are a subset of QNLI's
    return [t.name for t in matches if len(t.signature()) == widest]


def _label(glue: GlueTask, value: str, path: Path, lineno: int):
    value = value.strip()
    if glue.regression:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise UserError(f"{path}:{lineno}: score {value!r} is not a number: fix the {glue.label} column")
        return score
    if glue.names_in_file:
        if value in glue.labels:
            return glue.labels.index(value)
        valid = glue.labels
    else:
        ids = [str(i) for i in range(len(glue.labels))]
        if value in ids:
            return int(value)
        valid = ids
    raise UserError(f"{path}:{lineno}: label {value!r} is not {', '.join(valid[:-1])} or {valid[-1]}: fix the {glue.label} "
                    f"column (or check that this is GLUE's {glue.title})")
