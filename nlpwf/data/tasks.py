"""What a job learns: one or two texts, and a label that is a class or a score.

Every source (a GLUE folder, your files, the Hub) ends as splits of `sentence1` (and
`sentence2`) and `label`: a ClassLabel, whose names are the classes (label id = position), or a
float32 score. `Task` says which, and goes into the model's config (id2label, problem_type,
finetuning_task, and the columns the texts came from), so a saved model knows its label names,
and whether it predicts a score, without the data.

Your own data's label kind is found from the whole train column: integers and strings are
classes, floats are a score (`dataset.problem` forces either). Class names are sorted (numbers
numerically), so every process of a job, and every run on the same data, numbers them alike.
The columns are scanned with Arrow compute over the memory-mapped files, never as Python lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from nlpwf.config.checks import PROBLEMS
from nlpwf.errors import UserError

TEXT_FIELDS = ("sentence1", "sentence2")
CLASSIFICATION, REGRESSION = PROBLEMS
# The name of a regression head's one output, as pipeline() and predict print it.
SCORE_LABEL = "score"
# What a saved model that records no columns reads: nlpwf's sentence-pair models before tasks.
PAIR_COLUMNS = ("sentence1", "sentence2")
# Text column names tried, in order, when dataset.text_columns is not set.
DEFAULT_TEXT_COLUMNS = (("sentence1", "sentence2"), ("text",), ("sentence",))


@dataclass(frozen=True)
class Task:
    name: str                      # a GLUE task (which picks its metrics) or the dataset's name
    text_columns: tuple[str, ...]  # the columns the texts came from (one or two)
    label_column: str
    labels: tuple[str, ...] = ()   # class names, label id = position; () for a score

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def problem_type(self) -> str:
        return "regression" if self.regression else "single_label_classification"

    def model_config(self) -> dict:
        """The settings of the model's head, saved in its config.json."""
        names = self.labels or (SCORE_LABEL,)
        return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)},
                "problem_type": self.problem_type, "finetuning_task": self.name,
                "text_columns": list(self.text_columns), "label_column": self.label_column}

    @classmethod
    def from_model_config(cls, config) -> Task:
        """The task of a saved model. A model nlpwf did not train (or trained before tasks) is read as
        transformers reads it: one output is a score, more are classes."""
        regression = config.problem_type == "regression" or config.num_labels == 1
        labels = () if regression else tuple(str(config.id2label[i]) for i in range(config.num_labels))
        return cls(getattr(config, "finetuning_task", None) or "", tuple(getattr(config, "text_columns", None) or PAIR_COLUMNS),
                   getattr(config, "label_column", None) or "label", labels)

    def shown_labels(self) -> list[str]:
        """Class names for output files; a model trained without names (transformers' LABEL_0, ...) shows its ids."""
        return [str(i) if name == f"LABEL_{i}" else name for i, name in enumerate(self.labels)]


def features(task: Task) -> datasets.Features:
    """sentence1 (and sentence2) and label: the columns every source's splits end with."""
    texts = {name: datasets.Value("string") for name in TEXT_FIELDS[:len(task.text_columns)]}
    label = datasets.Value("float32") if task.regression else datasets.ClassLabel(names=list(task.labels))
    return datasets.Features({**texts, "label": label})


def prepare(raw: dict[str, datasets.Dataset], sources: dict[str, str], name: str, text_columns: Sequence[str] | None,
            label_column: str, problem: str | None, untyped: bool) -> tuple[Task, dict[str, datasets.Dataset]]:
    """Your own splits (files or the Hub), with their own columns, as a Task and splits of
    sentence1 (sentence2) and label. `raw` has "train" and the eval splits; `sources` says where
    each came from, for messages; `untyped`: every value is text (CSV, TSV), so numbers are
    recognised here."""
    texts = choose_text_columns(raw["train"].column_names, text_columns, sources["train"])
    for split, ds in raw.items():
        _require_columns(ds, [*texts, label_column], sources[split])
        for column in texts:
            check_texts(ds, column, sources[split])
    train = _label_values(raw["train"], label_column, sources["train"], problem, untyped)
    if problem is None:
        problem = REGRESSION if pa.types.is_floating(train.type) else CLASSIFICATION
    if problem == REGRESSION:
        task = Task(name, tuple(texts), label_column)
        keys = None
    else:
        keys = _classes(raw["train"], train, label_column, sources["train"])
        task = Task(name, tuple(texts), label_column, tuple(_name(k) for k in keys.to_pylist()))
    out = {}
    for split, ds in raw.items():
        values = train if split == "train" else _label_values(ds, label_column, sources[split], problem, untyped)
        if keys is not None and split != "train":
            if values.type != train.type:  # e.g. train has names, this split only numbers: compare as written
                values = pc.cast(values, pa.string())
            _check_seen(values, keys, sources[split], sources["train"], label_column)
        out[split] = _encode(ds, texts, label_column, task, values.type, keys)
    return task, out


def choose_text_columns(columns: list[str], configured: Sequence[str] | str | None, source: str) -> list[str]:
    if isinstance(configured, str):
        configured = [configured]
    if configured:
        if not 1 <= len(configured) <= 2:
            raise UserError(f"dataset.text_columns={list(configured)}: give one text column or two (a pair)")
        return list(configured)
    for candidate in DEFAULT_TEXT_COLUMNS:
        if all(c in columns for c in candidate):
            return list(candidate)
    raise UserError(f"{source} has no column named sentence1/sentence2, text or sentence (it has {_shown(columns)}): "
                    f"set dataset.text_columns=[COLUMN] or [COLUMN1,COLUMN2]")


def _require_columns(ds: datasets.Dataset, wanted: list[str], source: str) -> None:
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        key = "dataset.label_column" if missing[0] == wanted[-1] else "dataset.text_columns"
        raise UserError(f"{source} has no column {missing[0]!r} (it has {_shown(ds.column_names)}): "
                        f"set {key} to one of these, or rename the column")


def check_texts(ds: datasets.Dataset, column: str, source: str) -> None:
    """Every row of a text column holds text, and none is empty."""
    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise UserError(f"{source}: column {column!r} holds {_dtype(feature)} values, not text: "
                        f"choose text columns with dataset.text_columns")
    values = ds.data.column(column)
    empty = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0), True)
    row = pc.index(empty, True).as_py()
    if row >= 0:
        raise UserError(f"{source}: row {row + 1} has no text in column {column!r}: fill it in or remove the row")


def _label_values(ds: datasets.Dataset, column: str, source: str, problem: str | None, untyped: bool) -> pa.ChunkedArray:
    """The label column as Arrow values of its kind: int64 (or bool) ids or classes, float64
    scores, or strings. A missing label is refused here, for every kind."""
    feature = ds.features[column]
    values = ds.data.column(column)
    if isinstance(feature, datasets.ClassLabel):
        if problem == REGRESSION:
            raise UserError(f"{source}: column {column!r} holds classes ({', '.join(feature.names[:5])}), not scores: "
                            f"remove dataset.problem=regression")
        unlabelled = pc.index(pc.less(values, 0), True).as_py()
        if unlabelled >= 0:
            raise UserError(f"{source}: row {unlabelled + 1} has label -1, which marks an unlabelled split (as GLUE's "
                            f"test splits are): evaluate on a labelled split, e.g. dataset.eval_split=validation")
        return values
    if not isinstance(feature, datasets.Value) or not (feature.dtype in ("string", "large_string", "bool")
                                                       or pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise UserError(f"{source}: column {column!r} holds {_dtype(feature)} values: a label must be a class "
                        f"(text or a whole number) or a score (a number)")
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        values = pc.utf8_trim_whitespace(values)
        missing = pc.fill_null(pc.equal(values, ""), True)
    else:
        missing = pc.is_null(values)
    row = pc.index(missing, True).as_py()
    if row >= 0:
        raise UserError(f"{source}: row {row + 1} has no label in column {column!r}: label every row or remove it")
    if problem == REGRESSION:
        return _as_scores(values, source, column)
    if untyped:  # CSV/TSV text: whole numbers are numbered classes, other numbers are scores
        for numeric in (pa.int64(), pa.float64()):
            try:
                values = pc.cast(values, numeric)
                break
            except pa.ArrowInvalid:
                continue
    if pa.types.is_floating(values.type) and problem == CLASSIFICATION:
        whole = pc.equal(values, pc.floor(values))
        row = pc.index(whole, False).as_py()
        if row >= 0:
            raise UserError(f"{source}: row {row + 1} has label {values[row].as_py()} in column {column!r}, not a class: "
                            f"classes are whole numbers or names (or remove dataset.problem=classification for scores)")
        return pc.cast(values, pa.int64())
    return values


def _as_scores(values: pa.ChunkedArray, source: str, column: str) -> pa.ChunkedArray:
    if pa.types.is_boolean(values.type):
        raise UserError(f"{source}: column {column!r} holds true/false, not scores: remove dataset.problem=regression")
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        try:
            return pc.cast(values, pa.float64())
        except pa.ArrowInvalid:
            bad = next(i for i, v in enumerate(_iter(values)) if not _is_number(v))
            raise UserError(f"{source}: row {bad + 1} has {values[bad].as_py()!r} in column {column!r}, not a number: "
                            f"a score for regression must be numeric; fix the row (or use dataset.problem=classification "
                            f"for named classes)") from None
    values = pc.cast(values, pa.float64())
    finite = pc.is_finite(values)
    row = pc.index(finite, False).as_py()
    if row >= 0:
        raise UserError(f"{source}: row {row + 1} has score {values[row].as_py()} in column {column!r}: scores must be finite numbers")
    return values


def _iter(values: pa.ChunkedArray):
    for chunk in values.chunks:  # one chunk at a time: only reached to name the row of an error
        yield from chunk.to_pylist()


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def _classes(ds: datasets.Dataset, values: pa.ChunkedArray, column: str, source: str) -> pa.Array:
    """The train split's classes in label-id order: a ClassLabel's own order (the Hub's, GLUE's),
    else sorted (numbers numerically)."""
    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        keys = pa.array(feature.names)
        used = pc.unique(values)
    else:
        keys = pc.unique(values)  # an Array, whatever the chunks
        keys = keys.take(pc.sort_indices(keys))
        used = keys
    if len(used) < 2:
        raise UserError(f"{source}: every row of column {column!r} has the same label ({_name(keys[0].as_py()) if len(keys) else ''}): "
                        f"classification needs two classes or more in the train split (for scores, dataset.problem=regression)")
    return keys


def _check_seen(values: pa.ChunkedArray, keys: pa.Array, source: str, train_source: str, column: str) -> None:
    if pa.types.is_integer(values.type) and pa.types.is_string(keys.type):  # ClassLabel ids against their names
        unseen = pc.greater_equal(values, len(keys))
    else:
        unseen = pc.is_null(pc.index_in(values, value_set=keys.cast(values.type)))
    row = pc.index(unseen, True).as_py()
    if row >= 0:
        raise UserError(f"{source}: row {row + 1} has label {_name(values[row].as_py())!r} in column {column!r}, which never "
                        f"appears in the train split ({train_source}), so no model can learn it: fix the row, or train on "
                        f"data that has it")


def _encode(ds: datasets.Dataset, texts: list[str], column: str, task: Task, value_type: pa.DataType,
            keys: pa.Array | None) -> datasets.Dataset:
    """sentence1 (sentence2) and label ids or scores, batch by batch as Arrow tables. `value_type`
    is what `_label_values` made of this split's whole column, so every batch converts alike."""
    class_label = isinstance(ds.features[column], datasets.ClassLabel)
    value_set = None if keys is None or class_label else keys.cast(value_type)

    def encode(batch: pa.Table) -> pa.Table:
        out = {field: batch.column(name) for field, name in zip(TEXT_FIELDS, texts)}
        values = batch.column(column)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            values = pc.utf8_trim_whitespace(values)
            if not pa.types.is_string(value_type):  # numbers written as text: "3" and "3.0" alike
                values = pc.cast(values, pa.float64())
        if values.type != value_type:
            values = pc.cast(values, value_type)
        if task.regression:
            out["label"] = pc.cast(values, pa.float32())
        else:
            out["label"] = pc.cast(values if class_label else pc.index_in(values, value_set=value_set), pa.int64())
        return pa.table(out)

    encoded = ds.with_format("arrow").map(encode, batched=True, remove_columns=ds.column_names, features=features(task),
                                          desc="Labelling")
    return encoded.with_format(None)


def _name(key) -> str:
    return str(key).lower() if isinstance(key, bool) else str(key)


def _dtype(feature) -> str:
    return feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__


def _shown(columns: list[str]) -> str:
    return ", ".join(map(repr, columns[:10])) + (", ..." if len(columns) > 10 else "")


def relabel(data: Task, model: Task) -> list[int] | None:
    """How the data's label ids map to a saved model's (data id -> model id), for scoring a model
    on data it was not trained from in this process. Matched by class name; a model trained
    without names (LABEL_0, ...) or on numbered classes is matched by id. None for scores."""
    if data.regression != model.regression:
        raise UserError(f"the model predicts {'a score' if model.regression else 'classes'} but the data's label is "
                        f"{'a score' if data.regression else 'a class'}: evaluate it on data of the task it was trained for")
    if model.regression:
        return None
    shown = model.shown_labels()
    if set(data.labels) <= set(model.labels):
        return [model.labels.index(name) for name in data.labels]
    if set(data.labels) <= set(shown):
        return [shown.index(name) for name in data.labels]
    if all(name == f"LABEL_{i}" for i, name in enumerate(model.labels)) and len(data.labels) == len(model.labels):
        return list(range(len(data.labels)))
    raise UserError(f"the model's labels ({', '.join(model.labels)}) are not the data's ({', '.join(data.labels)}): "
                    f"evaluate it on data of the task it was trained for")
