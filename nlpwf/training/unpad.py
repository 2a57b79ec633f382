"""Training a BERT sequence classifier without computing its padding.

With dynamic padding and batches in random order, about 30% of the tokens a BERT encoder
computes on MRPC are padding. `apply(model)` makes a BertForSequenceClassification run
everything that works token by token (embeddings, Q/K/V, attention output, feed-forward, layer
norms, dropout) on the real tokens of the batch only (and up to ROWS - 1 padding tokens, so that
the matrices come in few shapes: see Packing), packed as one (tokens, hidden) matrix. Attention,
which mixes the tokens of a sequence, runs on groups of sequences of similar length, each padded
only to its own longest (see Groups). The head reads nothing of the encoder but the pooled first
token, so the last layer computes keys and values for every token and the query, attention,
output and feed-forward of each sequence's first token alone: in MiniLM-L6 a sixth of the
encoder's dense maths, 10/12 of it never read.

The maths is the padded model's. A pad token never reaches a real one (its key is masked) and the
head reads the first token, so the padded rows only ever fed themselves. Dropout masks are drawn
over the padded shape, as the padded model draws them (torch's CPU RNG is one serial stream), and
cut to the rows computed, so a training step computes the same loss and gradients as the padded
one, to float rounding, dropout included, and leaves the RNG where a padded step would: training
with and without unpadding gives the same loss trace, which is what the tests check. A batch this
cannot take (left padding, no padding at all, outputs such as attentions or hidden states asked
for, a tuple instead of an output object) runs the model's own forward.

How it is attached, and why so. `apply` sets `model.forward` to an `UnpaddedForward` built
around the model: an instance attribute, the mechanism accelerate itself uses to put autocast
around a model's forward (it wraps this one the same way, and unwraps it to save). Nothing else
changes: the model's class, modules, parameters, buffers, state dict and config are the stock
BertForSequenceClassification's, so checkpoints, `save_pretrained` (the saved model reloads as a
plain BERT) and resume see a plain BERT, and `model.bert` called on its own is the stock encoder.
Calling the model runs the unpadded forward inside every wrapper's own: DDP's forward (its
_pre_forward prepares the reducer, whose hooks on these same parameters then all-reduce their
gradients), autocast, module hooks. The alternatives were worse: a wrapper module around the
model renames every state-dict key and changes what the Trainer saves; computing the submodules
from the Trainer's compute_loss runs outside DDP's forward, so the reducer would not be prepared
and gradients would not be synchronised; swapping the encoder's class (what this replaced) makes
the model lie about its type, needs transformers' private output-recording registry, and can only
learn that the head reads the pooled token alone from a flag set by hooks on the head. Here the
forward replaced is the head's own, which knows that. How transformers builds BERT inside is read
in bert_parts.py, the one module that knows it; when that is not what unpadding expects, `apply`
says why and the model trains padded.
"""
from __future__ import annotations

import inspect
import logging
from typing import NamedTuple

import torch

from nlpwf.training import bert_parts, row_ops

log = logging.getLogger(__name__)

# Keyword arguments that change nothing the model computes (Trainer passes the loss's token count,
# which BERT's loss does not use).
IGNORED_KWARGS = {"return_dict", "num_items_in_batch"}
ROWS = 16  # packed token rows are rounded up to a multiple of this (see Packing)
GROUP = 4  # attention runs on groups of this many sequences of similar length (see Groups)


def apply(model) -> str | None:
    """Make BertForSequenceClassification `model` compute its forward unpadded. Call it on the
    model itself before DDP wraps it (the Trainer wraps in train()). Returns None when done, else
    the reason it was left padded."""
    if is_applied(model):
        return None
    try:
        bert_parts.read(model)
    except bert_parts.Unsupported as e:
        return str(e)
    model.forward = UnpaddedForward(model)
    return None


def remove(model) -> None:
    """Back to the class's forward (after `apply`, before anything wrapped it)."""
    if isinstance(model.__dict__.get("forward"), UnpaddedForward):
        del model.forward


def attached(model) -> UnpaddedForward | None:
    """The UnpaddedForward of `model` (or of the model DDP wraps), through the wrappers accelerate
    puts around a forward (each names the one it wraps as `__wrapped__`)."""
    forward = getattr(model, "module", model).__dict__.get("forward")
    if forward is None:
        return None
    forward = inspect.unwrap(forward, stop=lambda f: isinstance(f, UnpaddedForward))
    return forward if isinstance(forward, UnpaddedForward) else None


def is_applied(model) -> bool:
    return attached(model) is not None


def counts(model) -> dict:
    """Training batches run unpadded and run padded (no padding, left padding, ...) so far."""
    forward = attached(model)
    packed, padded = forward.batches if forward is not None else (0, 0)
    return {"perf_unpadded_batches": packed, "perf_padded_batches": padded}


class UnpaddedForward:
    """BertForSequenceClassification.forward computed without the padding, from `model`'s own
    submodules (read by bert_parts on every call, so it always runs the modules the model has)
    and the head's own loss and output type (bert_parts.output). What it cannot take runs the class's own forward: a
    batch it cannot pack, and a model changed since `apply` into one it cannot compute (logged
    once)."""

    def __init__(self, model):
        self.model = model
        self.batches = [0, 0]  # training batches run unpadded, padded
        self.warned = False

    # The stock forward's parameters, by name: the Trainer keeps the dataset columns the model's forward names.
    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, labels=None, **kwargs):
        model = self.model
        parts = self._parts()
        packs = parts is not None and _can_pack(model, parts, input_ids, attention_mask, inputs_embeds, kwargs)
        if model.training:
            self.batches[0 if packs else 1] += 1
        if not packs:
            return type(model).forward(model, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                       position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        pack = Packing(attention_mask, ROWS)
        pooled = pooled_output(parts, pack, input_ids, attention_mask, token_type_ids, position_ids)
        logits = parts.classifier(parts.dropout(pooled))  # as the head's forward: its dropout, then the classifier
        return bert_parts.output(model, logits, labels)

    def _parts(self) -> bert_parts.Classifier | None:
        try:
            return bert_parts.read(self.model)
        except bert_parts.Unsupported as e:
            if not self.warned:
                self.warned = True
                log.warning("perf.unpad: the model changed since unpadding was applied (%s), so it computes the padded batches", e)
            return None


def _can_pack(model, parts: bert_parts.Classifier, input_ids, attention_mask, inputs_embeds, kwargs) -> bool:
    if input_ids is None or inputs_embeds is not None or attention_mask is None or attention_mask.dim() != 2:
        return False
    config = model.config
    if any(v for k, v in kwargs.items() if k not in IGNORED_KWARGS) or config.output_attentions \
            or config.output_hidden_states or kwargs.get("return_dict", config.return_dict) is False:
        return False  # attentions, hidden states, a tuple: the model's own forward provides them
    if parts.checkpointing and model.training:
        return False
    if not bool(attention_mask[:, 0].all()):
        return False  # left padding: the padded model pools a pad token
    return not bool(attention_mask.all())  # no padding: nothing to remove


def pooled_output(parts: bert_parts.Classifier, pack: Packing, input_ids, attention_mask, token_type_ids,
                  position_ids) -> torch.Tensor:
    """BertModel's pooled output, (batch, hidden), computed on the packed tokens: every layer
    but the last for every token, the last for the first tokens' rows (see the module doc)."""
    x = _embed(parts.embeddings, pack, input_ids, token_type_ids, position_ids)
    # attention as transformers' eager attention computes it: on CPU eager trains faster than sdpa,
    # whose math path (the only one with dropout) upcasts bf16 and checks for fully masked rows
    groups = Groups(pack, attention_mask, parts.layers[0].attention.heads, _compute_dtype(x))
    for layer in parts.layers[:-1]:
        x = _layer(layer, pack, x, groups)
    return parts.pooler(_layer(parts.layers[-1], pack, x, groups, first_only=True).unsqueeze(1))


def _embed(emb: bert_parts.Embeddings, pack: Packing, input_ids, token_type_ids, position_ids) -> torch.Tensor:
    """BertEmbeddings.forward on the packed tokens (positions default to 0.., token types to 0)."""
    ids = pack.gather(input_ids)
    if position_ids is None:
        positions = pack.index % pack.length
    else:
        positions = pack.gather(position_ids.expand(pack.batch, pack.length))
    types = torch.zeros_like(ids) if token_type_ids is None else pack.gather(token_type_ids)
    x = emb.words(ids) + emb.token_types(types)
    x = x + emb.positions(positions)
    return _dropout(emb.norm(x), emb.dropout, pack)


def _layer(layer: bert_parts.Layer, pack: Packing, x: torch.Tensor, groups: Groups, first_only: bool = False) -> torch.Tensor:
    """BertLayer.forward on packed tokens: attention on groups, the rest packed. `first_only`:
    the output of each sequence's first token alone, (batch, hidden)."""
    first = row_ops.gather_rows(x, pack.first, row_ops.inverse_of(pack.first, len(x))) if first_only else None
    a = _self_attention(layer.attention, x, groups, first)
    h = _residual(layer.attention_output, a, x if first is None else first, pack, first_only)
    return _residual(layer.output, layer.intermediate(h), h, pack, first_only)


def _residual(block: bert_parts.Residual, x: torch.Tensor, residual: torch.Tensor, pack: Packing, first_only: bool) -> torch.Tensor:
    """BertSelfOutput / BertOutput.forward: norm(dropout(dense(x)) + residual), the padded model's dropout mask."""
    return block.norm(_dropout(block.dense(x), block.dropout, pack, first_only) + residual)


def _self_attention(att: bert_parts.Attention, x: torch.Tensor, groups: Groups, first: torch.Tensor | None) -> torch.Tensor:
    """Attention of every packed token of `x`, or (`first`: the sequences' first-token rows of
    `x`) of the first tokens only, over every token's keys and values."""
    # Q, K and V from one matmul over the stacked weights: the same dot products, but one
    # GEMM three times as wide, one bf16 cast of x and one gather instead of three each
    projections = (att.query, att.key, att.value) if first is None else (att.key, att.value)
    weight = torch.cat([p.weight for p in projections])
    bias = torch.cat([p.bias for p in projections]) if att.query.bias is not None else None
    queries = None if first is None else att.query(first)
    return groups.attend(torch.nn.functional.linear(x, weight, bias), att, queries)


class Packing:
    """Where the real tokens of a right-padded (batch, length) batch are in its flattened layout,
    plus the first few padding tokens that round their count up to a multiple of `rows`.

    Why round: oneDNN builds a kernel for each new matrix shape (its bf16 matmuls pay up to twice
    their run time on a shape's first call), and the real token count of a batch is a new number
    almost every step, where the padded model's batch x length recurs. A padding token computed
    here is computed exactly as the padded model computes it, and feeds only itself."""

    def __init__(self, attention_mask: torch.Tensor, rows: int = 1):
        self.batch, self.length = attention_mask.shape
        keep = attention_mask.flatten() != 0
        real = int(keep.sum())
        extra = min(-real % rows, keep.numel() - real)
        if extra:
            keep[(~keep).nonzero().flatten()[:extra]] = True
        self.index = keep.nonzero().flatten()  # row-major
        self.rows = keep.view(self.batch, self.length).sum(dim=1)  # packed tokens of each sequence
        self.first = torch.cumsum(self.rows, 0) - self.rows  # each sequence's first token among the packed ones

    def gather(self, padded: torch.Tensor) -> torch.Tensor:
        """(batch, length, ...) → (tokens, ...)."""
        return padded.reshape(self.batch * self.length, *padded.shape[2:]).index_select(0, self.index)


class Group(NamedTuple):
    seqs: torch.Tensor      # the group's sequences (rows of the batch)
    width: int              # its padded length
    mask: torch.Tensor      # additive key mask, (sequences x heads, 1, width)
    position: torch.Tensor  # (sequences, width): each slot's position in the padded layout


class Groups:
    """The batch's sequences sorted by packed length and cut into groups of `size`, each padded
    only to its own longest: attention runs on these (`attend`) instead of on the batch padded to
    its longest.

    Why: attention is the one part of the encoder still computed on a padded layout, and its
    cost grows with the square of the padded length. On MRPC batches of 16 in random order,
    groups of 4 compute 39% fewer attention scores than the whole batch padded to its longest;
    an fp32 training step of MiniLM-L6 took 1/1.07 of its time with them (bf16: no change, its
    small matmuls cost about the same whatever their size). The maths stays the padded model's:
    padding keys are masked, padding queries are dropped, and neither the order nor the number
    of masked keys changes a softmax. Built once per batch, used by every layer.

    The packed tokens go into the groups' slots in one gather (`slots`), and come back in one
    (`back`), each differentiated as a gather (row_ops): every packed token sits in exactly one
    valid slot, and a slot past a sequence's end, which reads its first token again, is masked as
    a key and dropped as a query, so its gradient is exactly zero."""

    def __init__(self, pack: Packing, attention_mask: torch.Tensor, heads: int, dtype, size: int = GROUP):
        self.pack, self.heads = pack, heads
        real = attention_mask.flatten().index_select(0, pack.index) != 0  # rounding rows are padding: masked as keys
        self.order = torch.argsort(pack.rows, descending=True, stable=True)
        # bf16 matmuls run in oneDNN, which builds a kernel for each new shape (see Packing): widths
        # rounded up to ROWS recur. fp32 ones do not (MKL), and there exact widths measured faster.
        step = 1 if dtype == torch.float32 else ROWS
        self.groups, slots, valids = [], [], []
        for start in range(0, pack.batch, size):
            seqs = self.order[start:start + size]
            rows = pack.rows.index_select(0, seqs)[:, None]
            width = -(-int(rows.max()) // step) * step
            slot = torch.arange(width)
            valid = slot < rows
            first = pack.first.index_select(0, seqs)[:, None]
            # a slot past a sequence's end reads its first token: a finite value, masked as a key,
            # and dropped as a query, so it adds nothing forward and receives a zero gradient
            index = torch.where(valid, first + slot, first)
            keys = valid & real[index]
            mask = torch.zeros(keys.shape, dtype=dtype).masked_fill_(~keys, torch.finfo(dtype).min)
            mask = mask[:, None, None, :].expand(len(seqs), heads, 1, width).reshape(-1, 1, width)  # baddbmm broadcasts it
            # where each slot sits in the padded (batch, length) layout: for the padded model's dropout masks
            position = pack.index.index_select(0, index.flatten()).view(index.shape) % pack.length
            self.groups.append(Group(seqs, width, mask, position))
            slots.append(index.flatten())
            valids.append(valid.flatten())
        self.slots = torch.cat(slots)  # the packed token read into each slot, group after group
        self.sizes = [len(g.seqs) * g.width for g in self.groups]
        valid = torch.cat(valids)
        # each packed token's (valid) slot; each slot's packed token, or len(pack.index) where it holds none
        self.back = torch.empty(len(pack.index), dtype=torch.long)
        self.back[self.slots[valid]] = valid.nonzero().flatten()
        self.token_of = torch.where(valid, self.slots, len(pack.index))
        self.back_seqs = torch.empty_like(self.order)
        self.back_seqs[self.order] = torch.arange(pack.batch)

    def attend(self, stacked: torch.Tensor, att: bert_parts.Attention, first: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of packed (tokens, 3 x hidden) Q/K/V rows, as transformers' eager attention
        computes it on the padded layout: scaled scores plus the mask, softmax, dropout with the
        padded model's mask, times V. Returns (tokens, hidden). With `first`, the queries of the
        sequences' first tokens alone, (batch, hidden) in batch order: then `stacked` holds only
        K/V rows, and each sequence's output row is returned."""
        pack, heads, head_size, dropout = self.pack, self.heads, att.head_size, att.dropout
        keep = _bernoulli((pack.batch, heads, pack.length, pack.length), dropout.p) if _draws(dropout) else None
        slots = row_ops.gather_rows(stacked, self.slots, self.back).split(self.sizes)
        if first is not None:  # each group's first-token queries, as (sequences, heads, 1, head_size)
            first = row_ops.gather_rows(first, self.order, self.back_seqs).view(pack.batch, 1, heads, head_size).transpose(1, 2)
            first = first.split([len(g.seqs) for g in self.groups])
        outs = []
        for i, (seqs, width, mask, position) in enumerate(self.groups):
            n = len(seqs)
            *q, k, v = slots[i].view(n, width, -1, heads, head_size).transpose(1, 3).unbind(2)  # each (n, heads, width, head_size)
            q = q[0] if first is None else first[i]
            cut = None
            if keep is not None:  # the mask's rows at the queries' padded positions (a first token's is 0)
                rows = position[:, None, :, None] if first is None else 0
                cut = keep[seqs[:, None, None, None], torch.arange(heads)[None, :, None, None], rows, position[:, None, None, :]]
            outs.append(_attention(q, k, v, mask, att.scaling, cut, dropout.p).transpose(1, 2).reshape(-1, heads * head_size))
        out = torch.cat(outs)
        if first is None:
            return row_ops.gather_rows(out, self.back, self.token_of)
        return row_ops.gather_rows(out, self.back_seqs, self.order)


def _attention(q, k, v, mask, scaling: float, keep: torch.Tensor | None = None, p: float = 0.0) -> torch.Tensor:
    """transformers' eager attention on (n, heads, tokens, head_size), `mask` (n x heads, 1, keys): the scaling and the mask
    inside one batched matmul (one pass over the scores instead of three), softmax in fp32,
    dropout by `keep`, times V. Without dropout the softmax takes and gives the scores' dtype:
    torch computes a bf16 softmax in fp32 and rounds it once, the same probabilities as fp32
    then a cast, in one pass instead of two, and its backward rounds the probabilities it reads
    to bf16 (a bf16 step of MiniLM-L6 took about 1/1.08 of its time, Intel Xeon with AMX).
    torch's fused attention (scaled_dot_product_attention's flash kernel, dropout off) trained
    bf16 MiniLM-L6 at 0.71x this speed on the same Xeon, so it is not used."""
    n, heads, queries, head_size = q.shape
    width = k.shape[2]
    scores = torch.baddbmm(mask, q.reshape(n * heads, queries, head_size), k.reshape(n * heads, width, head_size).transpose(1, 2),
                           alpha=scaling)
    if keep is None:  # bf16 scores: torch's softmax computes in fp32 and rounds once, what fp32-then-cast gives
        probs = torch.softmax(scores, dim=-1)
    else:  # the mask multiplies the fp32 probabilities, as transformers' eager attention does
        probs = _apply_mask(torch.softmax(scores, dim=-1, dtype=torch.float32), keep.reshape(scores.shape), p)
    return torch.bmm(probs.to(v.dtype), v.reshape(n * heads, width, head_size)).view(n, heads, queries, head_size)


def _dropout(x: torch.Tensor, module: torch.nn.Dropout, pack: Packing, first_only: bool = False) -> torch.Tensor:
    """`module(x)` for packed `x` (or only the sequences' first tokens) with the padded model's
    mask: drawn over the padded shape, then the rows of the tokens in `x` kept."""
    if not _draws(module):
        return module(x)  # identity, or zeros for p=1: no draw either way
    keep = _bernoulli((pack.batch * pack.length, *x.shape[1:]), module.p)
    rows = pack.index.index_select(0, pack.first) if first_only else pack.index
    return _apply_mask(x, keep.index_select(0, rows), module.p)


def _bernoulli(shape, p: float) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.bool).bernoulli_(1 - p)


def _apply_mask(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    noise = keep.to(x.dtype)
    noise.div_(1 - p)
    return x * noise


def _draws(module: torch.nn.Dropout) -> bool:
    """Whether torch's dropout draws a mask (it returns early for p 0 or 1 and outside training)."""
    return module.training and 0 < module.p < 1


def _compute_dtype(x: torch.Tensor):
    """The dtype matmuls of `x` compute in: autocast's where it is on."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
