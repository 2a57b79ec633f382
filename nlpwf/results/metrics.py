"""Each task's metrics, with scikit-learn and scipy (the `evaluate` package needs the Hub).

GLUE's tasks get their official metrics (as GLUE and transformers' run_glue report them):
CoLA Matthews correlation, STS-B Pearson and Spearman, MRPC and QQP accuracy and F1, the
rest accuracy; run_glue's `combined_score` (the mean) where a task has two. Any other data:
two classes accuracy and F1 (of class 1), more classes accuracy and macro F1, a score
Pearson, Spearman and the mean squared error. Names are without the `eval_` prefix that
Trainer and the stages add.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, matthews_corrcoef, mean_squared_error

# GLUE task -> its metrics, the main one (a job's default objective) first.
GLUE = {
    "cola": ("matthews_correlation", "accuracy"),
    "sst2": ("accuracy",), "mnli": ("accuracy",), "qnli": ("accuracy",), "rte": ("accuracy",), "wnli": ("accuracy",),
    "mrpc": ("accuracy", "f1", "combined_score"), "qqp": ("accuracy", "f1", "combined_score"),
    "stsb": ("spearmanr", "pearson", "combined_score", "mse"),
}


def names(task: str | None, num_labels: int) -> tuple[str, ...]:
    """The metrics a task reports, its main one first."""
    if task in GLUE:
        return GLUE[task]
    if num_labels == 1:
        return ("spearmanr", "pearson", "mse")
    return ("accuracy", "f1") if num_labels == 2 else ("accuracy", "macro_f1")


def main_metric(task: str | None, num_labels: int) -> str:
    return names(task, num_labels)[0]


def predictions(outputs: np.ndarray, num_labels: int) -> np.ndarray:
    """Class ids (argmax of the logits), or the scores of a one-output (regression) head."""
    outputs = np.asarray(outputs)
    return outputs.reshape(-1) if num_labels == 1 else outputs.argmax(axis=-1)


def scores(task: str | None, num_labels: int, labels, outputs) -> dict[str, float]:
    """The task's metrics from true labels and the model's outputs (logits, or scores)."""
    wanted = names(task, num_labels)
    predicted = predictions(outputs, num_labels)
    labels = np.asarray(labels)
    out: dict[str, float] = {}
    if num_labels == 1:
        out.update(regression(labels, predicted))
    else:
        out["accuracy"] = float(accuracy_score(labels, predicted))
        if "f1" in wanted:
            out["f1"] = float(f1_score(labels, predicted, zero_division=0))
        if "macro_f1" in wanted:
            out["macro_f1"] = float(f1_score(labels, predicted, average="macro", labels=list(range(num_labels)), zero_division=0))
        if "matthews_correlation" in wanted:
            out["matthews_correlation"] = float(matthews_corrcoef(labels, predicted))
    if "combined_score" in wanted:
        first, second = wanted[:2]
        out["combined_score"] = (out[first] + out[second]) / 2
    return {name: out[name] for name in wanted}


def regression(labels, predicted) -> dict[str, float]:
    return {"pearson": _correlation(pearsonr, labels, predicted), "spearmanr": _correlation(spearmanr, labels, predicted),
            "mse": float(mean_squared_error(labels, predicted))}


def _correlation(statistic, labels, predicted) -> float:
    """A correlation; 0.0 where it is undefined (constant predictions, as an untrained model's can
    be), as scikit-learn's Matthews correlation does, rather than NaN in metrics.json."""
    if len(labels) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input, which is answered here
        value = float(statistic(labels, predicted)[0])
    return 0.0 if math.isnan(value) else value


def confusion(labels, predictions, num_labels: int = 2) -> list[list[int]]:
    """Rows: true label 0, 1, ...; columns: predicted label 0, 1, ..."""
    return confusion_matrix(labels, predictions, labels=list(range(num_labels))).tolist()


def for_trainer(task: str | None, num_labels: int):
    """`compute_metrics` for transformers' Trainer."""

    def compute(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return scores(task, num_labels, pred.label_ids, logits)

    return compute
