"""A classifier scored on labelled examples with its task's metrics, named as a training job
names them (stage=evaluate, and the fp32 / INT8 comparisons of stage=quantize and benchmark)."""
from __future__ import annotations

import numpy as np

from nlpwf.data.tasks import TEXT_FIELDS, Task, relabel
from nlpwf.errors import UserError
from nlpwf.inference.classifier import Classifier
from nlpwf.results import metrics


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
    """The model task's metrics on these examples, named eval_*, as a training job names them;
    classifiers also get the confusion matrix (rows: true label 0, 1, ...; columns: predicted)."""
    task = classifier.task
    outputs = classifier.logits(*texts, batch_size=batch_size)
    result = {f"eval_{k}": v for k, v in metrics.scores(task.name, task.num_labels, labels, outputs).items()}
    if not task.regression:
        predicted = metrics.predictions(outputs, task.num_labels)
        result["eval_confusion_matrix"] = metrics.confusion(labels, predicted, task.num_labels)
    result["eval_pairs"] = len(labels)
    return result
