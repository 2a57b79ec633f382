"""Texts (one per example, or a pair) to token ids."""
from __future__ import annotations

import datasets

from nlpwf.data.tasks import TEXT_FIELDS


def tokenize(splits: datasets.DatasetDict, tokenizer, max_length: int, pad_to_max_length: bool) -> datasets.DatasetDict:
    """A pair is encoded as one sequence with two segments, a single text as one segment.
    Without `pad_to_max_length` each batch is padded later to its own longest example by the
    collator, which is most of the speed on CPU."""
    texts = [f for f in TEXT_FIELDS if f in splits["train"].column_names]

    def encode(batch):
        return tokenizer(
            *(batch[f] for f in texts), truncation=True, max_length=max_length,
            padding="max_length" if pad_to_max_length else False,
        )

    encoded = splits.map(encode, batched=True, remove_columns=texts, desc="Tokenizing")
    return encoded.rename_column("label", "labels")
