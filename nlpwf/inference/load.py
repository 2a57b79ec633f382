"""A saved model folder, fp32 or INT8, as a ready `Classifier`."""
from __future__ import annotations

from pathlib import Path

from nlpwf import models
from nlpwf.config.checks import PRECISIONS
from nlpwf.errors import UserError
from nlpwf.inference import int8
from nlpwf.inference.classifier import Classifier, PairLogits


def load_fp32(folder: Path) -> PairLogits:
    model = models.load_saved_model(folder)
    if model.config.num_labels != 2:
        raise UserError(f"{folder} classifies into {model.config.num_labels} labels: nlpwf's pair stages need a 2-label model")
    return PairLogits(model).eval()


def load_classifier(path: str | None, stage: str, max_length: int, precision: str = "fp32", compile: bool = True) -> Classifier:
    """A saved model, fp32 or INT8 (an inference.int8 folder), ready to score pairs."""
    if precision not in PRECISIONS:
        raise UserError(f"precision={precision} is not supported here: use fp32 or bf16")
    folder = models.saved_model_dir(path, stage)
    tokenizer = models.load_saved_tokenizer(folder)
    if models.is_quantized(folder):
        forward, backend = int8.load(folder, compile=compile)
        return Classifier(forward, tokenizer, max_length, "fp32", name=backend)
    return Classifier(load_fp32(folder), tokenizer, max_length, precision, name=precision)
