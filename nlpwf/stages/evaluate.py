"""stage=evaluate: a saved model (fp32 or INT8) scored on labelled data, with its task's metrics.

The data is the `dataset` group's eval split, or `stage.file` (a labelled TSV/CSV/JSONL with a
header; its text and label columns found as predict finds them). The metrics are the ones the
model's task reports in training (accuracy and F1, Matthews correlation, Pearson and
Spearman, ...), named as a training job names them; classifiers also get the confusion matrix
(rows: true label 0, 1, ...; columns: predicted label 0, 1, ...).
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from nlpwf.data.splits import load_splits
from nlpwf.data.tasks import Task
from nlpwf.inference import textfiles
from nlpwf.inference.evaluation import examples_of, score
from nlpwf.inference.load import load_classifier
from nlpwf.results import files
from nlpwf.runtime.threads import serving_threads

log = logging.getLogger(__name__)


def labelled_examples(cfg: DictConfig, task: Task) -> tuple[list[list[str]], list, str]:
    """(texts: one list per text column, labels in the model's terms, where they came from)."""
    stage = cfg.stage
    if stage.file:
        configured = textfiles.configured_columns(stage)
        with textfiles.TextReader(stage.file, textfiles.text_candidates(task, configured),
                                  textfiles.label_candidates(task, stage.get("label_column"))) as reader:
            texts, labels = [[] for _ in task.text_columns], []
            for chunk in reader.chunks():
                for column, values in zip(texts, chunk.texts):
                    column += values
                labels += textfiles.label_values(task, chunk.labels, reader.path, chunk.lines, reader.label_column)
        return texts, labels, str(reader.path)
    data_task, splits = load_splits(cfg.dataset)
    texts, labels = examples_of(splits["eval"], data_task, task)
    return texts, labels, f"{cfg.dataset.name}/{cfg.dataset.eval_split}"


def run(cfg: DictConfig, job_dir: Path) -> dict:
    serving_threads(cfg)
    classifier = load_classifier(cfg.stage.model_path, "evaluate", cfg.stage.max_length, cfg.precision.name, cfg.stage.compile)
    texts, labels, source = labelled_examples(cfg, classifier.task)
    result = score(classifier, texts, labels, cfg.stage.batch_size)
    result.update(model=str(cfg.stage.model_path), backend=classifier.name, eval_data=source)
    files.write_json(Path(job_dir) / files.METRICS_FILE, result)
    shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in result.items() if k.startswith("eval_") and isinstance(v, float))
    log.info("%s on %s: %s", classifier.name, source, shown)
    return result
