"""A tiny saved model for the evaluate / predict / quantize / benchmark tests: a two-layer
random BERT saved as a training job saves one (weights, config, tokenizer), built in a second."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import compose


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    from nlpwf import models

    # BERT's default init (std 0.02) gives a random model near-constant logits; a wider one
    # makes its outputs, and so its labels, depend on the input as a trained model's do.
    cfg = compose("model=tiny_bert", "+model.config.initializer_range=0.5").model
    torch.manual_seed(seed)
    model = models.load_model(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    models.load_tokenizer(cfg).save_pretrained(str(folder))
    return folder


def sentence_pairs(n: int, start: int = 0) -> list[tuple[str, str]]:
    words = ["cat", "dog", "market", "shares", "rose", "fell", "court", "ruled", "river", "city"]
    return [(f"The {words[i % 10]} and the {words[(i * 3) % 10]} met on day {i} .",
             f"A {words[(i * 7) % 10]} saw {words[(i + 1) % 10]} {i % 5} times .") for i in range(start, start + n)]
