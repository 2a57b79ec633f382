"""stage=predict: label every row of a file with a saved model, chunk by chunk.

The model's task decides the columns read and written (inference.predictions): the text
column(s) it was trained on (or GLUE's names for them, or stage.text_columns), and the
prediction columns. Memory holds one chunk of rows (stage.chunk_rows) and its predictions,
whatever the file's size; the output is renamed to its name only when complete.
"""
from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

from omegaconf import DictConfig

from nlpwf import models
from nlpwf.errors import UserError
from nlpwf.inference.load import load_classifier, saved_task
from nlpwf.inference.predictions import open_input, write_predictions
from nlpwf.inference.textfiles import configured_columns
from nlpwf.results import files
from nlpwf.runtime.threads import serving_threads

log = logging.getLogger(__name__)


def output_path(cfg: DictConfig, job_dir: Path, input_path: Path) -> Path:
    if cfg.stage.output:
        return Path(cfg.stage.output).expanduser()
    return Path(job_dir) / f"predictions{input_path.suffix.lower()}"


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


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
