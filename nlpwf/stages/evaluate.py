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

import numpy as np
from omegaconf import DictConfig

from nlpwf.data.splits import load_splits
from nlpwf.data.tasks import TEXT_FIELDS, Task, relabel
from nlpwf.errors import UserError
from nlpwf.inference import textfiles
from nlpwf.inference.classifier import Classifier
from nlpwf.inference.load import load_classifier
from nlpwf.results import files, metrics
from nlpwf.stages.serving import configured_columns, serving_threads

log = logging.getLogger(__name__)


def labelled_examples(cfg: DictConfig, task: Task) -> tuple[list[list[str]], list, str]:
    """(texts: one list per text column, labels in the model's terms, where they came from)."""
    stage = cfg.stage
    if stage.file:
        configured = configured_columns(stage)
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


def examples_of(split, data_task: Task, task: Task) -> tuple[list[list[str]], list]:
    """A prepared split's texts and labels, its label ids turned into the model's."""
    if len(data_task.text_columns) != len(task.text_columns):
        raise UserError(f"the model takes {len(task.text_columns)} text(s) per example ({', '.join(task.text_columns)}) "
                        f"but the data has {len(data_task.text_columns)} ({', '.join(data_task.text_columns)}): "
                        f"use data of the task it was trained for")
    texts = [split[name] for name in TEXT_FIELDS[:len(task.text_columns)]]
    mapping = relabel(data_task, task)
    labels = split["label"] if mapping is None else np.asarray(mapping)[np.asarray(split["label"], dtype=int)].tolist()
    return texts, labels


def score(classifier: Classifier, texts: list[list[str]], labels, batch_size: int) -> dict:
    """The model task's metrics on these examples, named eval_*, as a training job names them."""
    task = classifier.task
    outputs = classifier.logits(*texts, batch_size=batch_size)
    result = {f"eval_{k}": v for k, v in metrics.scores(task.name, task.num_labels, labels, outputs).items()}
    if not task.regression:
        predicted = metrics.predictions(outputs, task.num_labels)
        result["eval_confusion_matrix"] = metrics.confusion(labels, predicted, task.num_labels)
    result["eval_pairs"] = len(labels)
    return result


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
