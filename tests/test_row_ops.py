"""row_ops.gather_rows: index_select's forward and, under its promise, index_select's backward to the bit."""
import torch

from nlpwf.training import row_ops


def _grads(x, gather, grad_out):
    x = x.detach().clone().requires_grad_()
    out = gather(x)
    out.backward(grad_out)
    return out.detach(), x.grad


def test_a_gather_of_distinct_rows_differentiates_as_index_select():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(9, 5, dtype=dtype)
        index = torch.tensor([4, 0, 7, 2, 8])  # rows 1, 3, 5, 6 are read by nothing: zero gradient
        grad = torch.randn(len(index), 5, dtype=dtype)
        ref = _grads(x, lambda t: t.index_select(0, index), grad)
        got = _grads(x, lambda t: row_ops.gather_rows(t, index, row_ops.inverse_of(index, len(t))), grad)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        assert got[1][[1, 3, 5, 6]].abs().sum() == 0


def test_a_row_read_twice_takes_the_gradient_of_the_row_inverse_names():
    """The promise: the other reads carry a zero gradient (unpad's masked attention slots); then
    the result is index_select's, which would have summed them."""
    x = torch.randn(4, 3)
    index = torch.tensor([0, 1, 2, 3, 0])
    grad = torch.randn(5, 3)
    grad[4] = 0
    ref = _grads(x, lambda t: t.index_select(0, index), grad)
    got = _grads(x, lambda t: row_ops.gather_rows(t, index, torch.arange(4)), grad)
    assert torch.equal(ref[1], got[1])
    grad[4] = 1  # promise broken: the second read's gradient is not added
    assert torch.equal(_grads(x, lambda t: row_ops.gather_rows(t, index, torch.arange(4)), grad)[1], grad[:4])


def test_inverse_of_names_each_rows_position_or_the_zero_row():
    assert row_ops.inverse_of(torch.tensor([3, 1]), 5).tolist() == [2, 1, 2, 0, 2]
