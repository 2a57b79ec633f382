"""stage=evaluate: a saved model (fp32 or INT8) scored on labelled pairs.

The pairs are the `dataset` group's eval split, or `stage.file` (a labelled TSV/CSV/JSONL;
GLUE's own TSVs qualify). metrics.json gets accuracy, F1 and the confusion matrix
(rows: true label 0, 1; columns: predicted 0, 1), named as a training job names them.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from nlpwf.data.splits import load_splits
from nlpwf.inference import pairfiles
from nlpwf.inference.classifier import Classifier
from nlpwf.inference.load import load_classifier
from nlpwf.results import files, metrics
from nlpwf.stages.serving import serving_threads

log = logging.getLogger(__name__)


def labelled_pairs(cfg: DictConfig) -> tuple[list[str], list[str], list[int], str]:
    """(sentence1, sentence2, labels, where they came from)."""
    if cfg.stage.file:
        with pairfiles.PairReader(cfg.stage.file, label=True) as reader:
            s1, s2, labels = [], [], []
            for chunk in reader.chunks():
                s1 += chunk.sentence1
                s2 += chunk.sentence2
                labels += chunk.labels
        return s1, s2, labels, str(reader.path)
    split = load_splits(cfg.dataset)["eval"]
    return split["sentence1"], split["sentence2"], split["label"], f"{cfg.dataset.name}/{cfg.dataset.eval_split}"


def score(classifier: Classifier, s1, s2, labels, batch_size: int) -> dict:
    predictions, _ = classifier.predict(s1, s2, batch_size)
    result = {f"eval_{k}": v for k, v in metrics.classification(labels, predictions).items()}
    result["eval_confusion_matrix"] = metrics.confusion(labels, predictions)
    result["eval_pairs"] = len(labels)
    return result


def run(cfg: DictConfig, job_dir: Path) -> dict:
    serving_threads(cfg)
    s1, s2, labels, source = labelled_pairs(cfg)
    classifier = load_classifier(cfg.stage.model_path, "evaluate", cfg.stage.max_length, cfg.precision.name, cfg.stage.compile)
    result = score(classifier, s1, s2, labels, cfg.stage.batch_size)
    result.update(model=str(cfg.stage.model_path), backend=classifier.name, eval_data=source)
    files.write_json(Path(job_dir) / files.METRICS_FILE, result)
    log.info("%s on %s: accuracy %.4f, F1 %.4f, confusion %s", classifier.name, source,
             result["eval_accuracy"], result["eval_f1"], result["eval_confusion_matrix"])
    return result
