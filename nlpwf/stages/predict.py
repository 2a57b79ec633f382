"""stage=predict: label every row of a file with a saved model, chunk by chunk.

The model's task decides the columns read and written: the text column(s) it was trained on
(or GLUE's names for them, or stage.text_columns), and, for a classifier, `predicted_label`
(the class name), `probability` (of that class) and `probability_NAME` for every class; for a
score (regression), `predicted_score`. Memory holds one chunk of rows (stage.chunk_rows) and
its predictions, whatever the file's size; the output is written beside its final name and
renamed there when complete.
"""
from __future__ import annotations

import logging
import resource
import signal
import time
from pathlib import Path

from omegaconf import DictConfig

from nlpwf import models
from nlpwf.data.tasks import Task
from nlpwf.errors import UserError
from nlpwf.inference import textfiles
from nlpwf.inference.classifier import Classifier
from nlpwf.inference.load import load_classifier, saved_task
from nlpwf.results import files
from nlpwf.stages.serving import configured_columns, serving_threads

log = logging.getLogger(__name__)


def output_path(cfg: DictConfig, job_dir: Path, input_path: Path) -> Path:
    if cfg.stage.output:
        return Path(cfg.stage.output).expanduser()
    return Path(job_dir) / f"predictions{input_path.suffix.lower()}"


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
            predicted, probs = classifier.predict(*chunk.texts, batch_size=batch_size)
            if task.regression:
                columns = [[round(float(s), 6) for s in predicted]]
            else:
                names = task.shown_labels()
                columns = [[names[int(i)] for i in predicted], [round(float(probs[r, i]), 6) for r, i in enumerate(predicted)]]
                columns += [[round(float(p), 6) for p in probs[:, k]] for k in range(len(names))]
            writer.write(chunk.rows, columns)
            log.info("predicted %d rows", reader.rows_read)
    except BaseException:
        writer.abort()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    writer.commit()
    return reader.rows_read


def run(cfg: DictConfig, job_dir: Path) -> dict:
    stage = cfg.stage
    if not stage.input:
        raise UserError("stage=predict needs stage.input=FILE: a .tsv, .csv or .jsonl file of texts (or pairs)")
    if stage.batch_size < 1:
        raise UserError(f"stage.batch_size={stage.batch_size}: use 1 or more")
    threads = serving_threads(cfg)
    # The model's task (its config alone) says which columns to read: the input is opened before
    # the weights are loaded, so a wrong file fails first.
    task = saved_task(models.saved_model_dir(stage.model_path, "predict"))
    with open_input(stage.input, task, configured_columns(stage), stage.chunk_rows) as reader:
        classifier = load_classifier(stage.model_path, "predict", stage.max_length, cfg.precision.name, stage.compile)
        target = output_path(cfg, job_dir, reader.path)
        start = time.perf_counter()
        rows = write_predictions(classifier, reader, target, stage.batch_size)
        seconds = time.perf_counter() - start
    result = {
        "predict_pairs": rows, "predict_seconds": round(seconds, 3), "pairs_per_second": round(rows / seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "model": str(stage.model_path), "backend": classifier.name,
        "input": str(reader.path), "output": str(target), "chunk_rows": stage.chunk_rows, "threads": threads,
        "labels": list(task.shown_labels()) or ["score"],
    }
    files.write_json(Path(job_dir) / files.METRICS_FILE, result)
    log.info("%d rows in %.1f s (%.1f rows/s, peak RSS %.0f MB) -> %s", rows, seconds, result["pairs_per_second"],
             result["peak_rss_mb"], target)
    return result


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
