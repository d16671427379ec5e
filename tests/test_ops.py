"""The sparse-delta autograd function against a dense reference, gradcheck, and what it saves for backward."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from hf_speft import ops
from hf_speft.ops import SparsePattern, sparse_delta, sparse_values_grad, input_for_values_grad


def random_problem(out_features=7, in_features=5, nnz=9, tokens=(3, 4), dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(out_features * in_features, generator=generator)[:nnz].sort().values
    weight = torch.randn(out_features, in_features, generator=generator, dtype=dtype)
    x = torch.randn(*tokens, in_features, generator=generator, dtype=dtype, requires_grad=True)
    values = torch.randn(nnz, generator=generator, dtype=dtype, requires_grad=True)
    return indices, weight, x, values


def dense_reference(indices, weight, x, values):
    delta = torch.zeros(weight.numel(), dtype=values.dtype).index_put((indices,), values).view_as(weight)
    return x @ (weight + delta).t()


def test_matches_dense_reference_forward_and_backward():
    indices, weight, x, values = random_problem(out_features=13, in_features=11, nnz=30, tokens=(2, 6))
    pattern = SparsePattern(indices, 13, 11)
    grad_out = torch.randn(2, 6, 13, dtype=torch.float64)
    out = sparse_delta(x @ weight.t(), x, values, pattern)
    grads = torch.autograd.grad(out, (x, values), grad_out)
    x_ref, values_ref = x.detach().requires_grad_(), values.detach().requires_grad_()
    expected = dense_reference(indices, weight, x_ref, values_ref)
    expected_grads = torch.autograd.grad(expected, (x_ref, values_ref), grad_out)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_gradcheck():
    indices, weight, x, values = random_problem()
    pattern = SparsePattern(indices, 7, 5)
    base_out = (x @ weight.t()).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda b, xx, v: sparse_delta(b, xx, v, pattern), (base_out, x, values))


def test_values_grad_alone_is_the_values_gradient_of_the_delta():
    """`sparse_values_grad` (for a delta already inside the product) equals the values' gradient of x·(W+Δ)ᵀ."""
    indices, weight, x, values = random_problem(dtype=torch.float32)
    pattern = SparsePattern(indices, 7, 5)
    grad_out = torch.randn(*x.shape[:-1], 7)
    grad_values = sparse_values_grad(grad_out, x.detach(), values.detach(), pattern)
    values_ref = values.detach().requires_grad_()
    (expected,) = torch.autograd.grad(dense_reference(indices, weight, x.detach(), values_ref), values_ref, grad_out)
    assert grad_values.dtype == values.dtype and grad_values.shape == values.shape
    torch.testing.assert_close(grad_values, expected, atol=1e-5, rtol=1e-5)
    empty = SparsePattern(indices[:0], 7, 5)
    assert torch.equal(sparse_values_grad(grad_out, x.detach(), values[:0].detach(), empty), torch.zeros(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_their_dtype_and_float32_values_grads(dtype):
    indices, weight, x, values = random_problem(out_features=16, in_features=8, nnz=20, dtype=torch.float32)
    pattern = SparsePattern(indices, 16, 8)
    x_half = x.detach().to(dtype).requires_grad_()
    out = sparse_delta(x_half @ weight.to(dtype).t(), x_half, values, pattern)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert values.grad.dtype == torch.float32 and x_half.grad.dtype == dtype
    expected = dense_reference(indices, weight, x.detach(), values.detach())
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


def test_saves_only_the_input_for_backward_in_the_layout_the_values_gradient_reads():
    """Nothing weight-sized is kept for backward: the only saved tensors are x (as its tokens-last copy, which two
    products on the same input share) and the values."""
    indices, weight, x, values = random_problem(out_features=64, in_features=32, nnz=40, dtype=torch.float32)
    pattern = SparsePattern(indices, 64, 32)
    base_out = (x @ weight.t()).detach().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sparse_delta(base_out, x, values, pattern)
        sparse_delta(base_out, x, values, pattern)  # a sibling layer on the same input
    assert sorted(t.numel() for t in saved) == sorted([x.numel(), values.numel()] * 2)
    saved_x = [t for t in saved if t.numel() == x.numel()]
    assert all(torch.equal(t, x.detach().reshape(-1, 32)) and t.t().is_contiguous() for t in saved_x)
    assert saved_x[0].data_ptr() == saved_x[1].data_ptr()


def test_the_values_gradient_input_is_one_detached_copy_per_input_and_version_held_weakly():
    x = torch.randn(2, 3, 5, requires_grad=True)
    first = input_for_values_grad(x)
    assert first.shape == (6, 5) and first.t().is_contiguous() and not first.requires_grad
    assert torch.equal(first, x.detach().reshape(6, 5))
    assert input_for_values_grad(x).data_ptr() == first.data_ptr()
    assert input_for_values_grad(x.detach().clone()).data_ptr() != first.data_ptr()  # another tensor: its own copy
    with torch.no_grad():
        x.add_(1)  # a new version of the same tensor: a new copy with the new values
    second = input_for_values_grad(x)
    assert second.data_ptr() != first.data_ptr() and torch.equal(second, x.detach().reshape(6, 5))
    view = x.detach()[1:]
    assert input_for_values_grad(view).data_ptr() == view.data_ptr()  # a view into another tensor: x itself, no copy
    copy = weakref.ref(second._base)
    del first, second
    gc.collect()
    assert copy() is None  # the cache keeps no copy alive once its users dropped it


def test_an_eager_backward_computes_the_values_gradient_without_the_dispatcher_grad_mode_with_it(monkeypatch):
    """The fold's backward calls the op's function directly (a small layer's product costs less than the
    dispatcher's round trip); with grad mode on (create_graph) it goes through the op, which has no derivative."""
    indices, weight, x, values = random_problem(dtype=torch.float32)
    pattern = SparsePattern(indices, 7, 5)
    grad_out = torch.randn(*x.shape[:-1], 7)
    through_op = []
    original = ops._backward_op
    monkeypatch.setattr(ops, "_backward_op", lambda *args: through_op.append(1) or original(*args))
    with torch.no_grad():  # as in a backward
        eager = sparse_values_grad(grad_out, x.detach(), values.detach(), pattern)
    assert not through_op
    traced = sparse_values_grad(grad_out, x.detach(), values.detach(), pattern)
    assert through_op and torch.equal(eager, traced)


def test_empty_mask_is_identity():
    pattern = SparsePattern(torch.zeros(0, dtype=torch.int64), 4, 3)
    base_out = torch.randn(2, 4)
    assert sparse_delta(base_out, torch.randn(2, 3), torch.zeros(0), pattern) is base_out


def test_sparse_delta_under_bf16_autocast_matches_fp32():
    """Mixed precision (Trainer bf16=True) autocasts matmuls; the sparse kernels must still run (in fp32)."""
    torch.manual_seed(0)
    pattern = SparsePattern(torch.randperm(24 * 16)[:40].sort().values, 24, 16)
    values = torch.randn(40, requires_grad=True)
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_delta(torch.zeros(5, 24), x, values, pattern)
    out.sum().backward()
    reference = x.detach() @ pattern.delta(values.detach()).to_dense().t()
    torch.testing.assert_close(out.float(), reference, atol=1e-5, rtol=1e-5)
    assert values.grad is not None and x.grad is not None
