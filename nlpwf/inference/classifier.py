"""Scoring sentence pairs with a model, whatever its precision.

A model here is a function (input_ids, attention_mask, token_type_ids) -> logits: an fp32
transformers model (optionally under bf16 autocast), or an INT8 model (inference.int8). The
stages evaluate, predict, quantize and benchmark all go through `Classifier`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import torch


class PairLogits(torch.nn.Module):
    """A sequence classifier as positional tensors in, logits out: the form torch.export,
    INC and the benchmark need (transformers' output objects and kwargs are not)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


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
