"""Training a BERT without computing its padding.

With dynamic padding and batches in random order, about 30% of the tokens a BERT encoder
computes on MRPC are padding. `apply(model)` makes a BERT model run everything that works token
by token (embeddings, Q/K/V, attention output, feed-forward, layer norms, dropout) on the real
tokens of the batch only (and up to ROWS - 1 padding tokens, so that the matrices come in few
shapes: see Packing), packed as one (tokens, hidden) matrix. Attention, which mixes the tokens
of a sequence, runs in training on groups of sequences of similar length, each padded only to
its own longest (see Groups), and in evaluation on the batch's padded layout with the model's
own implementation (sdpa or eager) and mask. Nothing else changes: same modules, same
parameters, same checkpoints, and a model that saves and reloads as a plain BERT.

In a sequence classifier's forward, whose head reads only the pooled first token, the last
layer computes only what reaches that token: keys and values for every token, and the query,
attention, output and feed-forward of each sequence's first token alone (see `hook_pooled_only`).
In MiniLM-L6 that is a sixth of the encoder's dense maths, 10/12 of it left out, none of it read.

The maths is the padded model's. A pad token never reaches a real one (its key is masked), the
sequence classifier reads the first token, and the hidden states returned hold zeros at the
padding left out, so the padded rows only ever fed themselves. Dropout masks are drawn over the padded
shape, as the padded model draws them (torch's CPU RNG is one serial stream), and cut to the
real tokens' rows, so a training step computes the same loss and gradients as the padded one,
to float rounding, dropout included, and leaves the RNG where a padded step would. A batch this
cannot take (left padding, no padding at all, outputs such as attentions or hidden states asked
for) runs the model's own forward.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_flash_attention_utils import _pad_input
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertForSequenceClassification, BertModel, eager_attention_forward
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

# Keyword arguments that change nothing the encoder computes (Trainer passes the loss's token count).
IGNORED_KWARGS = {"return_dict", "num_items_in_batch"}
ROWS = 16  # packed token rows are rounded up to a multiple of this (see Packing)
GROUP = 4  # training attention runs on groups of this many sequences of similar length (see Groups)
ATTENTION = ("sdpa", "eager")  # implementations that take a padded 4D mask; flex/flash index differently
# Heads whose forward reads nothing of the encoder's output but the pooled first token (outputs[1]).
POOLED_HEADS = (BertForSequenceClassification,)


def unsupported(model) -> str | None:
    """Why `model` cannot train unpadded, or None when it can."""
    base = getattr(model, "base_model", None)
    if type(base) not in (BertModel, UnpaddedBertModel):
        return f"{type(model).__name__} is not a BERT model"
    config = base.config
    if config.is_decoder or config.add_cross_attention:
        return "a BERT decoder (causal or cross-attention)"
    if getattr(config, "chunk_size_feed_forward", 0):
        return "chunked feed-forward (config.chunk_size_feed_forward)"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={config.position_embedding_type}"
    # Q, K and V are computed from their weights in one matmul: an adapter's own forward would be skipped
    # (by type, not name: PEFT's LoRA layer is also called Linear)
    wrapped = {type(m) for layer in base.encoder.layer for m in
               (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value)} - {torch.nn.Linear}
    if wrapped:
        names = ", ".join(sorted(f"{t.__module__}.{t.__qualname__}" for t in wrapped))
        return f"Q/K/V projections that are not plain torch.nn.Linear layers ({names})"
    if config._attn_implementation not in ATTENTION:
        return f"attn_implementation={config._attn_implementation} (unpadding wraps {' or '.join(ATTENTION)})"
    return None


def apply(model) -> str | None:
    """Make `model` (a BertFor... model, not yet wrapped by DDP) train unpadded. Returns None when
    done, else the reason it was left padded."""
    reason = unsupported(model)
    if reason is None:
        base = model.base_model
        base.__class__ = UnpaddedBertModel
        base.unpad_batches = [0, 0]
        base.pooled_only = False
        # transformers records hidden states and attentions by the model's class name: the same as BertModel's
        _CAN_RECORD_REGISTRY[base] = getattr(base, "_can_record_outputs", None)
        if type(model) in POOLED_HEADS and "pooled_only_hooks" not in base.__dict__:
            base.pooled_only_hooks = hook_pooled_only(model)
    return reason


def remove(model) -> None:
    base = getattr(model, "base_model", None)
    if type(base) is UnpaddedBertModel:
        for hook in base.__dict__.pop("pooled_only_hooks", ()):
            hook.remove()
        base.__class__ = BertModel


def hook_pooled_only(model) -> tuple:
    """Let `model`'s encoder compute only the pooled first token in its last layer while `model`
    runs its forward (and only then: the encoder called on its own returns every token). Hooks,
    so that the head's own forward runs unchanged; the flag is cleared even if it raises."""
    base = model.base_model

    def on(module, args):
        base.pooled_only = True

    def off(module, args, output):
        base.pooled_only = False

    return model.register_forward_pre_hook(on), model.register_forward_hook(off, always_call=True)


def is_applied(model) -> bool:
    model = getattr(model, "module", model)  # DDP
    return type(getattr(model, "base_model", None)) is UnpaddedBertModel


def pooled_only_applied(model) -> bool:
    """Whether `model`'s forward computes its last layer for the pooled token only (see hook_pooled_only)."""
    model = getattr(model, "module", model)  # DDP
    return is_applied(model) and "pooled_only_hooks" in model.base_model.__dict__


def counts(model) -> dict:
    """Training batches run unpadded and run padded (no padding, left padding, ...) so far."""
    base = getattr(getattr(model, "module", model), "base_model", None)
    packed, padded = getattr(base, "unpad_batches", (0, 0))
    return {"perf_unpadded_batches": packed, "perf_padded_batches": padded}


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

    def scatter(self, packed: torch.Tensor) -> torch.Tensor:
        """(tokens, ...) → (batch, length, ...), zeros at the padding."""
        return _pad_input(packed, self.index, self.batch, self.length)


class Group(NamedTuple):
    seqs: torch.Tensor      # the group's sequences (rows of the batch)
    width: int              # its padded length
    index: torch.Tensor     # (sequences x width) packed token read into each slot
    mask: torch.Tensor      # additive key mask, (sequences x heads, 1, width)
    position: torch.Tensor  # (sequences, width): each slot's position in the padded layout


class PaddedAttention:
    """Evaluation: the model's own attention implementation (sdpa or eager) and 4D mask on the
    batch's padded layout, as the padded model runs it."""

    def __init__(self, pack: Packing, config, attention_mask: torch.Tensor, dtype):
        self.pack = pack
        self.function = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
        # the public helper BertModel's forward calls (its private wrapper changed its signature in transformers 5.25)
        self.mask = create_bidirectional_mask(config=config, attention_mask=attention_mask,
                                              inputs_embeds=torch.empty((pack.batch, pack.length, 0), dtype=dtype))

    def attend(self, stacked: torch.Tensor, sa, first: torch.Tensor | None = None) -> torch.Tensor:
        """As Groups.attend, with the model's own attention function on the padded layout."""
        pack = self.pack
        *q, k, v = pack.scatter(stacked).view(pack.batch, pack.length, -1, sa.num_attention_heads,
                                              sa.attention_head_size).permute(2, 0, 3, 1, 4).unbind(0)
        if first is None:
            out, _ = self.function(sa, q[0], k, v, self.mask, dropout=0.0, scaling=sa.scaling)
            return pack.gather(out.reshape(pack.batch, pack.length, -1))
        q = first.view(pack.batch, 1, -1, sa.attention_head_size).transpose(1, 2)
        mask = None if self.mask is None else self.mask[..., :1, :]  # the first query's row
        out, _ = self.function(sa, q, k, v, mask, dropout=0.0, scaling=sa.scaling)
        return out.reshape(pack.batch, -1)


class Groups:
    """The batch's sequences sorted by packed length and cut into groups of `size`, each padded
    only to its own longest: training attention runs on these (`attend`) instead of on the
    batch padded to its longest.

    Why: attention is the one part of the encoder still computed on a padded layout, and its
    cost grows with the square of the padded length. On MRPC batches of 16 in random order,
    groups of 4 compute 39% fewer attention scores than the whole batch padded to its longest;
    an fp32 training step of MiniLM-L6 took 1/1.07 of its time with them (bf16: no change, its
    small matmuls cost about the same whatever their size). The maths stays the padded model's:
    padding keys are masked, padding queries are dropped, and neither the order nor the number
    of masked keys changes a softmax. Built once per batch, used by every layer."""

    def __init__(self, pack: Packing, attention_mask: torch.Tensor, heads: int, dtype, size: int = GROUP):
        self.pack, self.heads = pack, heads
        real = attention_mask.flatten().index_select(0, pack.index) != 0  # rounding rows are padding: masked as keys
        order = torch.argsort(pack.rows, descending=True, stable=True)
        # bf16 matmuls run in oneDNN, which builds a kernel for each new shape (see Packing): widths
        # rounded up to ROWS recur. fp32 ones do not (MKL), and there exact widths measured faster.
        step = 1 if dtype == torch.float32 else ROWS
        self.groups, offset, back_rows, back_slots = [], 0, [], []
        for start in range(0, pack.batch, size):
            seqs = order[start:start + size]
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
            self.groups.append(Group(seqs, width, index.flatten(), mask, position))
            back_rows.append(index[valid])
            back_slots.append(offset + valid.flatten().nonzero().flatten())
            offset += valid.numel()
        # each packed token's row in the groups' outputs, concatenated; each sequence's row among the groups'
        self.back = torch.empty(len(pack.index), dtype=torch.long)
        self.back[torch.cat(back_rows)] = torch.cat(back_slots)
        self.back_seqs = torch.empty_like(order)
        self.back_seqs[order] = torch.arange(pack.batch)

    def attend(self, stacked: torch.Tensor, sa, first: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of packed (tokens, 3 x hidden) Q/K/V rows for BertSelfAttention `sa`, as
        transformers' eager attention computes it on the padded layout: scaled scores plus the
        mask, softmax in fp32, dropout with the padded model's mask, times V. Returns (tokens, hidden).
        With `first`, the queries of the sequences' first tokens alone, (batch, hidden) in batch
        order: then `stacked` holds only K/V rows, and each sequence's output row is returned."""
        pack, heads, head_size, dropout = self.pack, self.heads, sa.attention_head_size, sa.dropout
        keep = _bernoulli((pack.batch, heads, pack.length, pack.length), dropout.p) if _draws(dropout) else None
        outs = []
        for seqs, width, index, mask, position in self.groups:
            n = len(seqs)
            x = stacked.index_select(0, index).view(n, width, -1, heads, head_size).permute(2, 0, 3, 1, 4)
            *q, k, v = (t.reshape(n * heads, width, head_size) for t in x.unbind(0))
            q = q[0] if first is None else first.index_select(0, seqs).view(n * heads, 1, head_size)
            # the scaling and the mask inside the matmul: one pass over the scores instead of three
            probs = torch.softmax(torch.baddbmm(mask, q, k.transpose(1, 2), alpha=sa.scaling), dim=-1, dtype=torch.float32)
            if keep is not None:  # the mask's rows at the queries' padded positions (a first token's is 0)
                rows = position[:, None, :, None] if first is None else 0
                cut = keep[seqs[:, None, None, None], torch.arange(heads)[None, :, None, None], rows, position[:, None, None, :]]
                probs = _apply_mask(probs, cut.reshape(probs.shape), dropout.p)
            out = torch.bmm(probs.to(v.dtype), v)
            outs.append(out.view(n, heads, -1, head_size).transpose(1, 2).reshape(-1, heads * head_size))
        return torch.cat(outs).index_select(0, self.back if first is None else self.back_seqs)


def _bernoulli(shape, p: float) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.bool).bernoulli_(1 - p)


def _apply_mask(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    noise = keep.to(x.dtype)
    noise.div_(1 - p)
    return x * noise


class UnpaddedBertModel(BertModel):
    """BertModel whose forward packs the real tokens (see the module doc). Set on a model's
    instance by `apply`; its parameters, buffers and state dict are BertModel's."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                **kwargs):
        packs = self._can_pack(input_ids, attention_mask, inputs_embeds, kwargs)
        if self.training and "unpad_batches" in self.__dict__:
            self.unpad_batches[0 if packs else 1] += 1
        if not packs:
            return super().forward(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                   position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        pack = Packing(attention_mask, ROWS)
        x = self._embed(pack, input_ids, token_type_ids, position_ids)
        if self.training:
            # attention on groups (see Groups), computed as transformers' eager attention: on CPU eager trains faster
            # than sdpa, whose math path (the only one with dropout) upcasts bf16 and checks for fully masked rows
            attention = Groups(pack, attention_mask, self.config.num_attention_heads, _compute_dtype(x))
        else:
            attention = PaddedAttention(pack, self.config, attention_mask, x.dtype)
        layers = self.encoder.layer
        first_only = self.__dict__.get("pooled_only", False) and self.pooler is not None and len(layers) > 0
        for layer in layers[:-1] if first_only else layers:
            x = self._layer(layer, pack, x, attention)
        if first_only:  # the head reads only the pooled first token (see hook_pooled_only): (batch, 1, hidden) is all there is
            sequence = self._layer(layers[-1], pack, x, attention, first_only=True).unsqueeze(1)
            pooled = self.pooler(sequence)
        else:
            pooled = self.pooler(x.index_select(0, pack.first).unsqueeze(1)) if self.pooler is not None else None
            sequence = pack.scatter(x)
        if kwargs.get("return_dict") is False:
            return (sequence, pooled)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=sequence, pooler_output=pooled)

    def _can_pack(self, input_ids, attention_mask, inputs_embeds, kwargs) -> bool:
        if input_ids is None or inputs_embeds is not None or attention_mask is None or attention_mask.dim() != 2:
            return False
        if any(v for k, v in kwargs.items() if k not in IGNORED_KWARGS) or self.config.output_attentions \
                or self.config.output_hidden_states:
            return False  # attentions, hidden states, a cache, encoder states: the model's own forward provides them
        if self.encoder.layer and self.encoder.layer[0].gradient_checkpointing and self.training:
            return False
        if not bool(attention_mask[:, 0].all()):
            return False  # left padding: the padded model pools a pad token
        return not bool(attention_mask.all())  # no padding: nothing to remove

    @staticmethod
    def _dropout(x: torch.Tensor, module: torch.nn.Dropout, pack: Packing, first_only: bool = False) -> torch.Tensor:
        """`module(x)` for packed `x` (or only the sequences' first tokens) with the padded model's
        mask: drawn over the padded shape, then the rows of the tokens in `x` kept."""
        if not _draws(module):
            return module(x)  # identity, or zeros for p=1: no draw either way
        keep = _bernoulli((pack.batch * pack.length, *x.shape[1:]), module.p)
        rows = pack.index.index_select(0, pack.first) if first_only else pack.index
        return _apply_mask(x, keep.index_select(0, rows), module.p)

    def _embed(self, pack: Packing, input_ids, token_type_ids, position_ids) -> torch.Tensor:
        """BertEmbeddings.forward on the real tokens."""
        emb = self.embeddings
        ids = pack.gather(input_ids)
        if position_ids is None:
            positions = pack.index % pack.length
        else:
            positions = pack.gather(position_ids.expand(pack.batch, pack.length))
        if token_type_ids is None:
            types = torch.zeros_like(ids)
        else:
            types = pack.gather(token_type_ids)
        x = emb.word_embeddings(ids) + emb.token_type_embeddings(types)
        x = x + emb.position_embeddings(positions)
        x = emb.LayerNorm(x)
        return self._dropout(x, emb.dropout, pack)

    def _layer(self, layer, pack: Packing, x: torch.Tensor, attention, first_only: bool = False) -> torch.Tensor:
        """BertLayer.forward on packed tokens: attention on groups or the padded layout, the rest
        packed. `first_only`: the output of each sequence's first token alone, (batch, hidden)."""
        first = x.index_select(0, pack.first) if first_only else None
        a = self._self_attention(layer.attention.self, x, attention, first)
        if first_only:
            x = first
        out = layer.attention.output
        h = out.LayerNorm(self._dropout(out.dense(a), out.dropout, pack, first_only) + x)
        i = layer.intermediate(h)
        out = layer.output
        return out.LayerNorm(self._dropout(out.dense(i), out.dropout, pack, first_only) + h)

    @staticmethod
    def _self_attention(sa, x: torch.Tensor, attention, first: torch.Tensor | None) -> torch.Tensor:
        """Attention of every packed token of `x`, or (`first`: the sequences' first-token rows of
        `x`) of the first tokens only, over every token's keys and values."""
        # Q, K and V from one matmul over the stacked weights: the same dot products, but one
        # GEMM three times as wide, one bf16 cast of x and one scatter or gather instead of three each
        projections = (sa.query, sa.key, sa.value) if first is None else (sa.key, sa.value)
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections]) if sa.query.bias is not None else None
        queries = None if first is None else sa.query(first)
        return attention.attend(torch.nn.functional.linear(x, weight, bias), sa, queries)


def _draws(module: torch.nn.Dropout) -> bool:
    """Whether torch's dropout draws a mask (it returns early for p 0 or 1 and outside training)."""
    return module.training and 0 < module.p < 1


def _compute_dtype(x: torch.Tensor):
    """The dtype matmuls of `x` compute in: autocast's where it is on."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
