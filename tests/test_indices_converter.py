"""Top-k ids -> (routing_map, dense_probs): Triton kernels vs the torch reference, forward and
backward. On CPU the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_dispatch.dispatchers.deepep.routing_maps import (
    _indices_to_multihot_op,
    _multihot_probs_backward_op,
    indices_to_multihot,
    indices_to_multihot_reference,
    multihot_probs_backward_reference,
    resolve_converter_backend,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

try:
    resolve_converter_backend("triton", DEVICE)
    _TRITON_OK, _WHY = True, ""
except ValueError as exc:  # no triton, or CPU without TRITON_INTERPRET=1
    _TRITON_OK, _WHY = False, str(exc)
needs_triton = pytest.mark.skipif(not _TRITON_OK, reason=f"triton converter unavailable: {_WHY}")


def random_topk(num_rows, num_experts, topk, drop, seed, dtype=torch.int64):
    """Distinct ids per row (as top-k gives), each slot -1 with probability ``drop``; rows 0 and 3
    (when present) are all -1, like tokens that reached this rank for no local expert."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(num_rows, num_experts, generator=g).argsort(dim=1)[:, :topk]
    idx = idx.masked_fill(torch.rand(num_rows, topk, generator=g) < drop, -1)
    idx[[r for r in (0, 3) if r < num_rows]] = -1
    weights = torch.rand(num_rows, topk, generator=g) + 0.05
    return idx.to(dtype), weights


def reference_grad(idx, weights, num_experts, grad_dense):
    w = weights.detach().clone().requires_grad_()
    _, dense = indices_to_multihot_reference(idx, w, num_experts)
    dense.backward(grad_dense)
    return w.grad


def test_worked_example_both_backends():
    idx = torch.tensor([[2, 0], [-1, 1]], device=DEVICE)
    backends = ["torch"] + (["triton"] if _TRITON_OK else [])
    for backend in backends:
        w = torch.tensor([[0.7, 0.3], [0.5, 0.9]], device=DEVICE, requires_grad=True)
        routing_map, dense = indices_to_multihot(idx, w, 3, backend=backend)
        assert routing_map.dtype == torch.bool and dense.dtype == torch.float32
        assert routing_map.tolist() == [[True, False, True], [False, True, False]]
        torch.testing.assert_close(dense.detach().cpu(), torch.tensor([[0.3, 0.0, 0.7], [0.0, 0.9, 0.0]]))
        dense.backward(torch.tensor([[1.0, 2, 3], [4, 5, 6]], device=DEVICE))
        torch.testing.assert_close(w.grad.cpu(), torch.tensor([[3.0, 1.0], [0.0, 5.0]]))


@needs_triton
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_rows=st.integers(0, 40),
    num_experts=st.integers(1, 24),
    topk_frac=st.floats(0.0, 1.0),
    drop=st.sampled_from([0.0, 0.3, 1.0]),
    idx_dtype=st.sampled_from([torch.int64, torch.int32]),
    layout=st.sampled_from(["contiguous", "strided"]),
    grad_layout=st.sampled_from(["dense", "expanded"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_matches_reference(num_rows, num_experts, topk_frac, drop, idx_dtype, layout, grad_layout, seed):
    topk = max(1, round(topk_frac * num_experts))  # K from 1 up to L
    idx, weights = random_topk(num_rows, num_experts, topk, drop, seed, idx_dtype)
    if layout == "strided":  # column-major storage: non-unit strides in both dims
        idx = idx.t().contiguous().t()
        weights = weights.t().contiguous().t()
    idx, weights = idx.to(DEVICE), weights.to(DEVICE)

    w = weights.clone().requires_grad_()
    routing_map, dense = indices_to_multihot(idx, w, num_experts, backend="triton")
    ref_map, ref_dense = indices_to_multihot_reference(idx, weights, num_experts)
    assert routing_map.shape == (num_rows, num_experts) and routing_map.dtype == torch.bool
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(dense, ref_dense, rtol=0, atol=0)
    assert torch.equal(routing_map.sum(1), (idx >= 0).sum(1))  # distinct ids: one hit per kept slot

    g = torch.Generator().manual_seed(seed + 1)
    if grad_layout == "expanded":  # what autograd hands over for e.g. dense.sum(0) losses
        grad_dense = torch.randn(1, num_experts, generator=g).to(DEVICE).expand(num_rows, num_experts)
    else:
        grad_dense = torch.randn(num_rows, num_experts, generator=g).to(DEVICE)
    dense.backward(grad_dense)
    torch.testing.assert_close(w.grad, reference_grad(idx, weights, num_experts, grad_dense), rtol=0, atol=0)
    assert bool((w.grad[idx < 0] == 0).all())


@needs_triton
def test_several_tiles_and_out_of_range_ids():
    # L = 300 spans three 128-wide column tiles; 150 rows span several row tiles.
    idx, weights = random_topk(150, 300, 7, 0.2, seed=3)
    idx[5, 2] = 300  # out of range: ignored, zero gradient (both backends)
    idx[6, 0] = -7
    idx, weights = idx.to(DEVICE), weights.to(DEVICE)
    routing_map, dense = indices_to_multihot(idx, weights, 300, backend="triton")
    ref_map, ref_dense = indices_to_multihot_reference(idx, weights, 300)
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(dense, ref_dense, rtol=0, atol=0)
    grad_dense = torch.randn(150, 300, device=DEVICE)
    got = _multihot_probs_backward_op(grad_dense, idx, True)
    torch.testing.assert_close(got, multihot_probs_backward_reference(grad_dense, idx), rtol=0, atol=0)
    assert got[5, 2] == 0 and got[6, 0] == 0


@needs_triton
def test_empty_rows():
    idx = torch.empty(0, 3, dtype=torch.int64, device=DEVICE)
    w = torch.empty(0, 3, device=DEVICE, requires_grad=True)
    routing_map, dense = indices_to_multihot(idx, w, 5, backend="triton")
    assert routing_map.shape == (0, 5) and dense.shape == (0, 5)
    dense.sum().backward()
    assert w.grad.shape == (0, 3)


def test_weights_dtype_and_grad_dtype():
    idx = torch.tensor([[1, -1]], device=DEVICE)
    w = torch.tensor([[0.25, 0.5]], dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    _, dense = indices_to_multihot(idx, w, 2)
    assert dense.dtype == torch.float32
    dense.sum().backward()
    assert w.grad.dtype == torch.bfloat16 and w.grad.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(use_triton):
    if use_triton and not _TRITON_OK:
        pytest.skip(_WHY)
    idx, weights = random_topk(9, 6, 3, 0.3, seed=1)
    idx, weights = idx.to(DEVICE), weights.to(DEVICE).requires_grad_()
    # test_aot_dispatch_dynamic is left out for the forward op: its harness sums every output
    # into a float, which a bool output cannot take.
    torch.library.opcheck(_indices_to_multihot_op, (idx, weights, 6, use_triton),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(_multihot_probs_backward_op, (torch.randn(9, 6, device=DEVICE), idx, use_triton))


def test_bad_arguments_name_the_argument():
    idx = torch.zeros(2, 2, dtype=torch.int64)
    w = torch.zeros(2, 2)
    with pytest.raises(TypeError, match="topk_idx"):
        indices_to_multihot(idx.float(), w, 4)
    with pytest.raises(TypeError, match="topk_weights"):
        indices_to_multihot(idx, idx, 4)
    with pytest.raises(ValueError, match="topk_weights"):
        indices_to_multihot(idx, torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="num_local_experts"):
        indices_to_multihot(idx, w, 0)
    with pytest.raises(ValueError, match="backend"):
        indices_to_multihot(idx, w, 4, backend="cuda")
