"""GLUE's paraphrase TSV files (MRPC's layout), read exactly as GLUE writes them."""
from __future__ import annotations

import csv
from pathlib import Path

from nlpwf.errors import UserError

# Split names as the Hub names them, and the GLUE file each is read from.
GLUE_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
GLUE_COLUMNS = {"label": "Quality", "sentence1": "#1 String", "sentence2": "#2 String"}


def read_glue_tsv(path: Path) -> dict[str, list]:
    """Read a GLUE paraphrase TSV exactly as GLUE writes it.

    GLUE's files are tab separated with no quoting (MRPC has stray `"` that a CSV reader
    would treat as quotes and silently merge rows) and start with a UTF-8 byte-order mark.
    """
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if not header:
            raise UserError(f"{path} is empty: it needs a header line and at least one labelled pair")
        missing = [c for c in GLUE_COLUMNS.values() if c not in header]
        if missing:
            raise UserError(
                f"{path} has no column {', '.join(map(repr, missing))}: expected GLUE's header "
                f"'Quality, #1 ID, #2 ID, #1 String, #2 String' (GLUE's own test.tsv is unlabelled; "
                f"use a labelled file or dataset.eval_split=validation)"
            )
        index = {name: header.index(col) for name, col in GLUE_COLUMNS.items()}
        out: dict[str, list] = {"sentence1": [], "sentence2": [], "label": []}
        for lineno, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise UserError(
                    f"{path}:{lineno}: expected {len(header)} tab-separated columns, found {len(row)}: "
                    f"fix that line (GLUE files use tabs and no quoting)"
                )
            label = row[index["label"]].strip()
            if label not in ("0", "1"):
                raise UserError(f"{path}:{lineno}: label {label!r} is not 0 or 1: fix the Quality column")
            out["label"].append(int(label))
            out["sentence1"].append(row[index["sentence1"]])
            out["sentence2"].append(row[index["sentence2"]])
    if not out["label"]:
        raise UserError(f"{path} has no rows: an empty split cannot be trained or evaluated on")
    return out
