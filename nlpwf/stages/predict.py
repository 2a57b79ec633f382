"""stage=predict: label every pair of a file with a saved model, chunk by chunk.

Memory holds one chunk of rows (stage.chunk_rows) and its predictions, whatever the file's
size; the output is written beside its final name and renamed there when complete.
"""
from __future__ import annotations

import logging
import resource
import signal
import time
from pathlib import Path

from omegaconf import DictConfig

from nlpwf.errors import UserError
from nlpwf.inference import pairfiles
from nlpwf.inference.load import load_classifier
from nlpwf.results import files
from nlpwf.stages.serving import serving_threads

log = logging.getLogger(__name__)

EXTRA_COLUMNS = ["predicted_label", "probability"]


def output_path(cfg: DictConfig, job_dir: Path, input_path: Path) -> Path:
    if cfg.stage.output:
        return Path(cfg.stage.output).expanduser()
    return Path(job_dir) / f"predictions{input_path.suffix.lower()}"


def run(cfg: DictConfig, job_dir: Path) -> dict:
    stage = cfg.stage
    if not stage.input:
        raise UserError("stage=predict needs stage.input=FILE: a .tsv, .csv or .jsonl file of sentence pairs")
    if stage.batch_size < 1:
        raise UserError(f"stage.batch_size={stage.batch_size}: use 1 or more")
    threads = serving_threads(cfg)
    # Open the input first: a wrong file fails before the model is loaded.
    with pairfiles.PairReader(stage.input, stage.sentence1_column, stage.sentence2_column, chunk_rows=stage.chunk_rows) as reader:
        classifier = load_classifier(stage.model_path, "predict", stage.max_length, cfg.precision.name, stage.compile)
        target = output_path(cfg, job_dir, reader.path)
        if pairfiles.file_format(target) != reader.format:
            raise UserError(f"stage.output={target} must have the input's file type ({reader.path.suffix})")
        writer = pairfiles.AtomicWriter(target, reader.format, None if reader.format == "jsonl" else reader.header, EXTRA_COLUMNS)
        start = time.perf_counter()
        # A job stopped with SIGTERM (a scheduler, a timeout) unwinds like an error: no temp file left.
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            for chunk in reader.chunks():
                labels, probs = classifier.predict(chunk.sentence1, chunk.sentence2, stage.batch_size)
                writer.write(chunk.rows, [[int(x) for x in labels], [round(float(p), 6) for p in probs]])
                log.info("predicted %d pairs", reader.rows_read)
        except BaseException:
            writer.abort()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        writer.commit()
        seconds = time.perf_counter() - start
        rows = reader.rows_read
    result = {
        "predict_pairs": rows, "predict_seconds": round(seconds, 3), "pairs_per_second": round(rows / seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "model": str(stage.model_path), "backend": classifier.name,
        "input": str(reader.path), "output": str(target), "chunk_rows": stage.chunk_rows, "threads": threads,
    }
    files.write_json(Path(job_dir) / files.METRICS_FILE, result)
    log.info("%d pairs in %.1f s (%.1f pairs/s, peak RSS %.0f MB) -> %s", rows, seconds, result["pairs_per_second"],
             result["peak_rss_mb"], target)
    return result


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
