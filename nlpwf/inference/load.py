"""A saved model folder, fp32 or INT8, as a ready `Classifier` that knows its task."""
from __future__ import annotations

from pathlib import Path

from nlpwf import models
from nlpwf.config.checks import PRECISIONS
from nlpwf.data.tasks import Task
from nlpwf.errors import UserError
from nlpwf.inference import int8
from nlpwf.inference.classifier import Classifier, SequenceLogits
from nlpwf.runtime import isa


def load_fp32(folder: Path) -> SequenceLogits:
    return SequenceLogits(models.load_saved_model(folder)).eval()


def saved_task(folder: Path) -> Task:
    """The task a saved model (fp32 or INT8, whose folder keeps the source's config) was trained for."""
    return Task.from_model_config(models.load_saved_config(folder))


def load_classifier(path: str | None, stage: str, max_length: int, precision: str = "auto", compile: bool = True) -> Classifier:
    """A saved model, fp32 or INT8 (an inference.int8 folder), ready to score texts. An fp32
    model runs in `precision` (auto: bf16 autocast where this CPU has native bf16)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision={precision} is not supported here: use auto, fp32 or bf16")
    folder = models.saved_model_dir(path, stage)
    tokenizer = models.load_saved_tokenizer(folder)
    task = saved_task(folder)
    if models.is_quantized(folder):
        forward, backend = int8.load(folder, compile=compile)
        return Classifier(forward, tokenizer, max_length, "fp32", name=backend, task=task)
    chosen = isa.resolve(precision)
    return Classifier(load_fp32(folder), tokenizer, max_length, chosen, name=chosen, task=task)
