"""A file of texts to the same file with a model's predictions, chunk by chunk (stage=predict,
and a training job's dataset.test_file).

The model's task decides the columns read and written: the text column(s) it was trained on
(or GLUE's names for them, or the configured ones), and, for a classifier, `predicted_label`
(the class name), `probability` (of that class) and `probability_NAME` for every class; for a
score (regression), `predicted_score`. Memory holds one chunk of rows and its predictions,
whatever the file's size; the output is written beside its final name and renamed there when
complete.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path

from nlpwf.data.tasks import Task
from nlpwf.errors import UserError
from nlpwf.inference import textfiles
from nlpwf.inference.classifier import Classifier

log = logging.getLogger(__name__)


def extra_columns(task: Task) -> list[str]:
    if task.regression:
        return ["predicted_score"]
    return ["predicted_label", "probability", *(f"probability_{name}" for name in task.shown_labels())]


def open_input(path: str | Path, task: Task, configured: list[str] | None, chunk_rows: int) -> textfiles.TextReader:
    """The input, its text columns found for the model's task (a wrong file fails here, before any work)."""
    return textfiles.TextReader(path, textfiles.text_candidates(task, configured), chunk_rows=chunk_rows)


def write_predictions(classifier: Classifier, reader: textfiles.TextReader, target: Path, batch_size: int) -> int:
    """Every row of `reader`, with the model's prediction columns, into `target`. Returns the rows."""
    if textfiles.file_format(target) != reader.format:
        raise UserError(f"stage.output={target} must have the input's file type ({reader.path.suffix})")
    task = classifier.task
    writer = textfiles.AtomicWriter(target, reader.format, None if reader.format == "jsonl" else reader.header, extra_columns(task))
    # A job stopped with SIGTERM (a scheduler, a timeout) unwinds like an error: no temp file left.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for chunk in reader.chunks():
            writer.write(chunk.rows, prediction_columns(classifier, chunk.texts, batch_size))
            log.info("predicted %d rows", reader.rows_read)
    except BaseException:
        writer.abort()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    writer.commit()
    return reader.rows_read


def prediction_columns(classifier: Classifier, texts: list[list[str]], batch_size: int) -> list[list]:
    """The values of `extra_columns` for these texts, one list per column, rounded for a text file."""
    predicted, probs = classifier.predict(*texts, batch_size=batch_size)
    if classifier.task.regression:
        return [[round(float(s), 6) for s in predicted]]
    names = classifier.task.shown_labels()
    columns = [[names[int(i)] for i in predicted], [round(float(probs[r, i]), 6) for r, i in enumerate(predicted)]]
    return columns + [[round(float(p), 6) for p in probs[:, k]] for k in range(len(names))]


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
