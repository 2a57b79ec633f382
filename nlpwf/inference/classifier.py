"""Scoring texts (one per example, or pairs) with a model, whatever its precision.

A model here is a function (input_ids, attention_mask, token_type_ids) -> outputs: an fp32
transformers model (optionally under bf16 autocast), or an INT8 model (inference.int8). Its
outputs are one logit per class, or one score (a regression head). The stages evaluate,
predict, quantize and benchmark all go through `Classifier`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from nlpwf.data.tasks import Task


class SequenceLogits(torch.nn.Module):
    """A sequence classifier as positional tensors in, outputs out: the form torch.export, INC
    and the benchmark need (transformers' output objects and kwargs are not)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


class Classifier:
    """A model and its tokenizer, scoring texts in batches. `task` (from the saved model's config)
    says what the outputs are: its class names, or a score."""

    def __init__(self, forward: Callable, tokenizer, max_length: int, precision: str = "fp32", name: str = "fp32",
                 task: Task | None = None):
        self.forward = forward
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.precision = precision
        self.name = name
        self.task = task

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode(self, *texts: Sequence[str]) -> dict:
        return self.tokenizer(*(list(t) for t in texts), truncation=True, max_length=self.max_length)

    def batches(self, *texts: Sequence[str], batch_size: int = 32) -> Iterator[tuple[np.ndarray, tuple]]:
        """(row indices, tensors) batches, shortest examples first: padding each batch only to its
        own longest example saves most of the compute on real text of mixed length."""
        encoded = self.encode(*texts)
        order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            features = [{k: encoded[k][i] for k in encoded} for i in rows]
            yield rows, tensors(self.tokenizer.pad(features, return_tensors="pt"))

    @torch.inference_mode()
    def logits(self, *texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """The model's outputs, one row per example: (n, classes), or (n, 1) for a score."""
        out = None
        with self._autocast():
            for rows, inputs in self.batches(*texts, batch_size=batch_size):
                values = self.forward(*inputs).float().numpy()
                if out is None:
                    out = np.zeros((len(texts[0]), values.shape[-1]), dtype=np.float32)
                out[rows] = values
        return out if out is not None else np.zeros((0, 1), dtype=np.float32)

    def predict(self, *texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """Classes: (label ids, the probability of every class, one row per example). A score
        (one output): (the scores, None)."""
        logits = self.logits(*texts, batch_size=batch_size)
        if logits.shape[-1] == 1:
            return logits[:, 0], None
        probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        return probs.argmax(axis=-1), probs


def tensors(encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three positional inputs of `SequenceLogits`; single-segment tokenizers get zeros."""
    ids = encoded["input_ids"]
    types = encoded.get("token_type_ids")
    return ids, encoded["attention_mask"], types if types is not None else torch.zeros_like(ids)
