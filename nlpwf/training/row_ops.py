"""Row gathers for the unpadded forward (unpad.py) whose backward is a gather too.

`x.index_select(0, index)` differentiates into a zero-filled tensor the size of `x` and a
scatter-add of the gradient into it (index_add_), because torch cannot know that the rows are
read once each. On CPU that scatter runs serially, and in bf16 it was the second-largest op of
an unpadded training step after autocast's casts (12% of a bf16 MiniLM-L6 step on MRPC, Intel
Xeon with AMX). unpad.py's gathers move packed tokens into attention slots and back, so each
row that carries a gradient is read once, and where the inverse map is known the backward is a
plain gather of the gradient's rows: the same numbers (each row's gradient is copied, never
summed), without the zero-fill and the scatter.
"""
from __future__ import annotations

import torch


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, pad: bool) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.pad = pad
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        if ctx.pad:  # rows of `x` that no output row carries read this zero row
            grad = torch.cat([grad, grad.new_zeros((1, *grad.shape[1:]))])
        return grad.index_select(0, inverse), None, None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`x.index_select(0, index)`, differentiated as the gather `grad[inverse]`: `inverse[r]` is the
    output row whose gradient is row r's, or `len(index)` for a row of `x` that receives none.

    The caller's promise: every output row that `inverse` does not name has a zero gradient
    (a row read twice counts once; in unpad.py the second reads are masked attention slots,
    whose gradients are exactly zero). Under that promise the result equals index_select's
    backward to the bit."""
    return _GatherRows.apply(x, index, inverse, bool((inverse == len(index)).any()))


def inverse_of(index: torch.Tensor, rows: int) -> torch.Tensor:
    """For an `index` that reads each of `rows` rows at most once: each row's position in it, or
    len(index) for a row it does not read (the zero row of gather_rows's backward)."""
    inverse = torch.full((rows,), len(index), dtype=torch.long)
    inverse[index] = torch.arange(len(index))
    return inverse
