"""Running a saved model on sentence pairs, whatever its precision.

A model here is a function (input_ids, attention_mask, token_type_ids) -> logits: an fp32
transformers model (optionally under bf16 autocast), or an INT8 model from `nlpwf.int8`. The
stages evaluate, predict, quantize and benchmark all go through `Classifier`.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from nlpwf import distributed
from nlpwf.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
# Files transformers' save_pretrained writes; one of the weight files must be there too.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


class PairLogits(torch.nn.Module):
    """A sequence classifier as positional tensors in, logits out: the form torch.export,
    INC and the benchmark need (transformers' output objects and kwargs are not)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def set_threads(cfg: DictConfig) -> int:
    threads = distributed.threads_per_process(cfg.compute.threads_per_process, 1)
    distributed.set_threads(threads)
    return threads


def model_dir(path: str | None, stage: str) -> Path:
    """The folder `stage.model_path` names, checked to be a saved model (fp32 or INT8)."""
    from nlpwf import int8

    if not path:
        raise UserError(
            f"stage={stage} needs stage.model_path=DIR: the model/ folder of a training job "
            f"(e.g. outputs/DATE/TIME/model) or the model_int8/ folder of a quantize job"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"stage.model_path={path} is not a directory: point it at a training job's model/ folder")
    if not (folder / "config.json").is_file():
        raise UserError(f"stage.model_path={path} is not a saved model (no config.json): point it at a training job's model/ folder")
    if not int8.is_quantized(folder) and not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"stage.model_path={path} has no weights ({' or '.join(WEIGHT_FILES[:2])}): point it at a training job's model/ folder")
    return folder


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{folder} has no usable tokenizer ({e.__class__.__name__}): use a model/ folder saved by a training job, which includes it") from e


def load_fp32(folder: Path) -> PairLogits:
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{folder} does not hold a loadable model ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}): point stage.model_path at a training job's model/ folder") from e
    if model.config.num_labels != 2:
        raise UserError(f"{folder} classifies into {model.config.num_labels} labels: nlpwf's pair stages need a 2-label model")
    return PairLogits(model).eval()


class Classifier:
    """A model and its tokenizer, scoring sentence pairs in batches."""

    def __init__(self, forward: Callable, tokenizer, max_length: int, precision: str = "fp32", name: str = "fp32"):
        self.forward = forward
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.precision = precision
        self.name = name

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode(self, s1: Sequence[str], s2: Sequence[str]) -> dict:
        return self.tokenizer(list(s1), list(s2), truncation=True, max_length=self.max_length)

    def batches(self, s1: Sequence[str], s2: Sequence[str], batch_size: int) -> Iterator[tuple[np.ndarray, tuple]]:
        """(row indices, tensors) batches, shortest pairs first: padding each batch only to its
        own longest pair saves most of the compute on real text of mixed length."""
        encoded = self.encode(s1, s2)
        order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            features = [{k: encoded[k][i] for k in encoded} for i in rows]
            yield rows, tensors(self.tokenizer.pad(features, return_tensors="pt"))

    @torch.inference_mode()
    def logits(self, s1: Sequence[str], s2: Sequence[str], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(s1), 2), dtype=np.float32)
        with self._autocast():
            for rows, inputs in self.batches(s1, s2, batch_size):
                out[rows] = self.forward(*inputs).float().numpy()
        return out

    def predict(self, s1: Sequence[str], s2: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Predicted labels and the probability the model gives each."""
        probs = torch.softmax(torch.from_numpy(self.logits(s1, s2, batch_size)), dim=-1).numpy()
        labels = probs.argmax(axis=-1)
        return labels, probs[np.arange(len(labels)), labels]


def tensors(encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three positional inputs of `PairLogits`; single-segment tokenizers get zeros."""
    ids = encoded["input_ids"]
    types = encoded.get("token_type_ids")
    return ids, encoded["attention_mask"], types if types is not None else torch.zeros_like(ids)


def load_classifier(path: str | None, stage: str, max_length: int, precision: str = "fp32", compile: bool = True) -> Classifier:
    """A saved model, fp32 or INT8 (nlpwf.int8 folder), ready to score pairs."""
    from nlpwf import int8

    if precision not in PRECISIONS:
        raise UserError(f"precision={precision} is not supported here: use fp32 or bf16")
    folder = model_dir(path, stage)
    tokenizer = load_tokenizer(folder)
    if int8.is_quantized(folder):
        forward, backend = int8.load(folder, compile=compile)
        return Classifier(forward, tokenizer, max_length, "fp32", name=backend)
    return Classifier(load_fp32(folder), tokenizer, max_length, precision, name=precision)
