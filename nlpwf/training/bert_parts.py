"""The parts of transformers' BertForSequenceClassification that the unpadded forward (unpad.py)
runs: the one module in nlpwf that knows how transformers builds a BERT inside.

unpad.py computes a BERT classifier's forward from the stock model's own submodules and
weights. Which submodules there are, what they are called and what each one computes is
transformers' internal layout, not an API it promises to keep. `read(model)` looks up every
name unpad.py uses and checks its kind as it goes, so that a release that builds BERT
differently is caught before a step is computed: it raises `Unsupported` naming what differs,
and the caller trains padded. Each lookup below says why it is needed. What a check cannot see
(a submodule that keeps its name and computes something else) is what the unpadding equality
tests catch, run on the oldest and newest transformers setup.cfg admits (tools/check_ranges.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

# Attention implementations whose maths unpad.py's grouped attention computes (the padded
# model's result to float rounding). Another registered function may compute something else.
EXACT_ATTENTION = ("sdpa", "eager")


class Unsupported(Exception):
    """The model is not built the way unpad.py computes it; the message says how it differs."""


class Embeddings(NamedTuple):
    words: torch.nn.Embedding
    positions: torch.nn.Embedding
    token_types: torch.nn.Embedding
    norm: torch.nn.Module
    dropout: torch.nn.Dropout


class Attention(NamedTuple):
    query: torch.nn.Linear
    key: torch.nn.Linear
    value: torch.nn.Linear
    heads: int
    head_size: int
    scaling: float
    dropout: torch.nn.Dropout  # on the attention probabilities


class Residual(NamedTuple):
    """A dense layer, its dropout and the layer norm of (that + the block's input): BertSelfOutput
    and BertOutput are both this."""
    dense: torch.nn.Module
    dropout: torch.nn.Dropout
    norm: torch.nn.Module


class Layer(NamedTuple):
    attention: Attention
    attention_output: Residual
    intermediate: torch.nn.Module  # dense + activation, called as it is
    output: Residual


class Classifier(NamedTuple):
    embeddings: Embeddings
    layers: tuple[Layer, ...]
    pooler: torch.nn.Module      # dense + tanh of hidden_states[:, 0], called as it is
    dropout: torch.nn.Dropout    # the head's, on the pooled output
    classifier: torch.nn.Module
    checkpointing: bool          # activation checkpointing on: unpad.py leaves those steps to the model


def read(model) -> Classifier:
    """The submodules of BertForSequenceClassification `model` that unpad.py computes with, or
    Unsupported naming the first one that is missing or not what it expects."""
    # by exact type: a subclass may override forward, and then the stock forward is not what unpad.py replaces
    if type(model) is not BertForSequenceClassification:
        raise Unsupported(f"{type(model).__name__} is not a BertForSequenceClassification")
    config = model.config
    if config.is_decoder or config.add_cross_attention:
        raise Unsupported("a BERT decoder (causal or cross-attention)")
    if getattr(config, "chunk_size_feed_forward", 0):  # BertLayer would run the feed-forward in chunks
        raise Unsupported("chunked feed-forward (config.chunk_size_feed_forward)")
    # gone from BertConfig in 5.x (always absolute there); earlier configs may name relative kinds
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise Unsupported(f"position_embedding_type={config.position_embedding_type}")
    # private, but the only place the chosen implementation is recorded (BertSelfAttention reads it so too)
    attention = config._attn_implementation
    if attention not in EXACT_ATTENTION:
        raise Unsupported(f"attn_implementation={attention} (unpadding computes what {' and '.join(EXACT_ATTENTION)} compute)")
    root = _Node(model, "")
    emb = root.at("bert.embeddings")
    embeddings = Embeddings(*(emb.get(name, kind) for name, kind in (
        ("word_embeddings", torch.nn.Embedding), ("position_embeddings", torch.nn.Embedding),
        ("token_type_embeddings", torch.nn.Embedding), ("LayerNorm", None), ("dropout", torch.nn.Dropout))))
    stack = root.at("bert.encoder.layer")
    nodes = [stack.at(str(i)) for i in range(len(stack.obj))]
    if not nodes:
        raise Unsupported("a BERT without layers")
    pooler = root.get("bert.pooler")
    if pooler is None:
        raise Unsupported("a BERT without its pooler")
    # BertLayer is a GradientCheckpointingLayer: transformers sets this flag on each when checkpointing is enabled
    checkpointing = any(getattr(node.obj, "gradient_checkpointing", False) for node in nodes)
    return Classifier(embeddings, tuple(_layer(node) for node in nodes), pooler, root.get("dropout", torch.nn.Dropout),
                      root.get("classifier"), checkpointing)


def _layer(layer: _Node) -> Layer:
    """BertLayer `layer`: its self-attention's projections and sizes, its two residual blocks."""
    sa = layer.at("attention.self")
    # Q, K and V are computed from their weights in one matmul, so an adapter's own forward (LoRA,
    # a quantized layer) would be skipped: plain Linear only, by type (PEFT's LoRA layer is also named Linear)
    query, key, value = (sa.get(name, torch.nn.Linear, exact=True) for name in ("query", "key", "value"))
    # the sizes and the scaling BertSelfAttention computes with (scaling: head_size ** -0.5)
    heads, head_size, scaling = (sa.get(name, (int, float)) for name in ("num_attention_heads", "attention_head_size", "scaling"))
    attention = Attention(query, key, value, heads, head_size, scaling, sa.get("dropout", torch.nn.Dropout))
    # BertSelfOutput and BertOutput: norm(dropout(dense(x)) + input); the dropout is applied here with the
    # padded model's mask, so the three are called one by one rather than through their forward
    blocks = [layer.at(name) for name in ("attention.output", "output")]
    residual = [Residual(b.get("dense"), b.get("dropout", torch.nn.Dropout), b.get("LayerNorm")) for b in blocks]
    return Layer(attention, residual[0], layer.get("intermediate"), residual[1])


class _Node(NamedTuple):
    """A submodule and its path from the model: lookups below it name the whole path when they fail."""
    obj: object
    path: str

    def at(self, name: str) -> _Node:
        return _Node(self.get(name), self._join(name))

    def get(self, name: str, kind=None, exact: bool = False):
        obj = self.obj
        for part in name.split("."):
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part, _MISSING)
            if obj is _MISSING:
                raise Unsupported(f"transformers' BertForSequenceClassification has no {self._join(name)} here (unpadding reads it)")
        if kind is not None and not (type(obj) is kind if exact else isinstance(obj, kind)):
            raise Unsupported(f"{self._join(name)} is a {type(obj).__module__}.{type(obj).__qualname__}, "
                              f"not the {kind.__name__ if isinstance(kind, type) else 'number'} unpadding computes with")
        return obj

    def _join(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name


_MISSING = object()


def output(model, logits: torch.Tensor, labels: torch.Tensor | None) -> SequenceClassifierOutput:
    """What BertForSequenceClassification's forward returns for `logits`: its output type, with the
    loss it computes when there are labels: transformers' loss for the head's kind
    (`loss_function`, chosen from the class name), by the config's problem_type (set from the
    labels on the first call, as the forward does). Without the Trainer's num_items_in_batch:
    BERT's forward does not pass it to its loss either."""
    loss = None if labels is None else model.loss_function(labels, logits, model.config)
    return SequenceClassifierOutput(loss=loss, logits=logits)
