"""Classification metrics with scikit-learn (the `evaluate` package needs the Hub)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score


def classification(labels, predictions) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(labels, predictions)), "f1": float(f1_score(labels, predictions, zero_division=0))}


def confusion(labels, predictions) -> list[list[int]]:
    return confusion_matrix(labels, predictions, labels=[0, 1]).tolist()


def from_eval_prediction(pred) -> dict[str, float]:
    """`compute_metrics` for transformers' Trainer."""
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return classification(pred.label_ids, np.argmax(logits, axis=-1))
