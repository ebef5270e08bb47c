"""The torch reference permute: worked example, round trips, padding, gradients, errors."""
from __future__ import annotations

import re
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_dispatch import count_tokens_per_expert, permute, permute_with_probs, unpermute


def test_worked_example_from_the_docstring():
    se = torch.tensor([[2, 0], [0, -1], [2, 1]])
    x = torch.randn(3, 5)
    permuted, row_id_map = permute(x, se, 3, backend="torch")
    assert row_id_map.tolist() == [[3, 0], [1, -1], [4, 2]]
    torch.testing.assert_close(permuted, x[[0, 1, 2, 0, 2]], rtol=0, atol=0)
    padded, padded_map = permute(x, se, 3, backend="torch", align_size=4)
    assert padded_map.tolist() == [[8, 0], [1, -1], [9, 4]]
    assert padded.shape == (12, 5)
    assert padded[[2, 3, 5, 6, 7, 10, 11]].abs().sum() == 0


@st.composite
def routings(draw):
    n = draw(st.integers(0, 24))
    e = draw(st.integers(1, 9))
    k = draw(st.integers(1, e))
    h = draw(st.integers(1, 7))
    kind = draw(st.sampled_from(["random", "one_expert", "drops", "empty_experts"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, e, generator=g)
    if kind == "empty_experts":
        scores[:, e // 2:] -= 5
    se = scores.topk(k, dim=-1).indices
    if kind == "one_expert":
        se = torch.full((n, k), -1, dtype=torch.long)
        se[:, 0] = draw(st.integers(0, e - 1))
    if kind == "drops":
        se = se.masked_fill(torch.rand(n, k, generator=g) < 0.4, -1)
    x = torch.randn(n, h, generator=g)
    w = torch.rand(n, k, generator=g)
    return x, se, w, e


@settings(max_examples=60, deadline=None)
@given(routings(), st.sampled_from([1, 4, 16]))
def test_round_trip_exact_fp32(case, align):
    x, se, w, e = case
    permuted, probs, row_id_map = permute_with_probs(x, w, se, e, backend="torch", align_size=align)
    valid = se >= 0
    # every kept slot lands in a row holding its token; dropped slots map to -1
    assert ((row_id_map >= 0) == valid).all()
    rows = row_id_map[valid]
    assert rows.unique().numel() == rows.numel()
    torch.testing.assert_close(permuted[rows], x.unsqueeze(1).expand(-1, se.shape[1], -1)[valid], rtol=0, atol=0)
    torch.testing.assert_close(probs[rows], w[valid], rtol=0, atol=0)
    # groups are ascending by expert, padded to `align`, and ordered by (token, k) inside
    counts = count_tokens_per_expert(se, e)
    padded_counts = (counts + align - 1) // align * align
    assert permuted.shape[0] == int(padded_counts.sum())
    starts = torch.cumsum(padded_counts, 0) - padded_counts
    for expert in range(e):
        n_idx, k_idx = (se == expert).nonzero(as_tuple=True)
        expected = starts[expert] + torch.arange(n_idx.numel())
        assert row_id_map[n_idx, k_idx].tolist() == expected.tolist()
    used = torch.zeros(permuted.shape[0], dtype=torch.bool)
    used[rows] = True
    assert permuted[~used].abs().sum() == 0 and probs[~used].abs().sum() == 0
    # unpermute: identity experts give sum_k w x (exactly the fp32 weighted sum)
    out = unpermute(permuted, row_id_map, w, backend="torch")
    torch.testing.assert_close(out, (x.unsqueeze(1) * (w * valid).unsqueeze(-1)).sum(1))
    torch.testing.assert_close(unpermute(permuted, row_id_map, backend="torch"), x * valid.sum(1, keepdim=True).float())


def test_num_out_rows_larger_pads_and_smaller_drops():
    se = torch.tensor([[0, 1], [1, 0], [1, -1]])
    x = torch.randn(3, 4)
    big, m = permute(x, se, 2, backend="torch", num_out_rows=8)
    assert big.shape == (8, 4) and big[5:].abs().sum() == 0
    small, m2 = permute(x, se, 2, backend="torch", num_out_rows=3)
    assert small.shape == (3, 4)
    assert m2.tolist() == [[0, 2], [-1, 1], [-1, -1]]


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(3)
    se = torch.tensor([[1, 0], [2, -1], [1, 2], [0, 1]])
    x = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.randn(7, 3, dtype=torch.float64, generator=g)  # 7 kept slots

    def f(x, w):
        permuted, row_id_map = permute(x, se, 3, backend="torch")
        return unpermute(permuted * scale, row_id_map, w, backend="torch")

    assert torch.autograd.gradcheck(f, (x, w))


@pytest.mark.parametrize("bad, exc, words", [
    (dict(selected_experts=torch.tensor([[0.0, 1.0]])), TypeError, "selected_experts must be an integer"),
    (dict(selected_experts=torch.tensor([[0, 5]])), ValueError, "selected_experts must be in [-1, 4), got 5"),
    (dict(selected_experts=torch.tensor([[0, -2]])), ValueError, "got -2"),
    (dict(selected_experts=torch.tensor([0, 1])), ValueError, "selected_experts must be [N, K]"),
    (dict(tokens=torch.ones(1, 3, dtype=torch.int32)), TypeError, "tokens must be floating point"),
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(align_size=0), ValueError, "align_size"),
    (dict(backend="cuda-magic"), ValueError, "permute backend must be one of"),
])
def test_bad_arguments_are_named(bad, exc, words):
    args = dict(tokens=torch.randn(1, 3), selected_experts=torch.tensor([[0, 1]]), num_experts=4)
    args.update(bad)
    with pytest.raises(exc, match=re.escape(words)):
        permute(**args)


def test_te_backend_unavailable_on_cpu_says_why():
    with pytest.raises(ValueError, match="not available"):
        permute(torch.randn(2, 3), torch.tensor([[0], [1]]), 2, backend="te")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["te", "triton", "cuda"])
def test_cuda_backends_equal_torch(backend):
    from moe_dispatch.permute import resolve_backend
    dev = torch.device("cuda")
    try:
        resolve_backend(backend, dev)
    except ValueError as exc:
        pytest.skip(str(exc))
    for seed, (n, h, e, k) in enumerate([(1000, 256, 8, 2), (517, 129, 64, 8), (64, 4096, 7, 7)]):
        g = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(n, h, device=dev, generator=g, dtype=torch.bfloat16)
        se = torch.rand(n, e, device=dev, generator=g).topk(k, -1).indices
        w = torch.rand(n, k, device=dev, generator=g)
        p_ref, m_ref = permute(x, se, e, backend="torch")
        p, m = permute(x, se, e, backend=backend)
        assert torch.equal(m, m_ref) and torch.equal(p, p_ref)
        out_ref = unpermute(p_ref.float(), m_ref, w, backend="torch")
        out = unpermute(p.float(), m, w, backend=backend)
        torch.testing.assert_close(out, out_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["te", "triton", "cuda", "torch"])
def test_cuda_permute_counted_equals_torch(backend):
    """permute_counted on CUDA with -1 slots and num_out_rows = N*K (the EP=1 dispatch): rows,
    row map and counts equal the reference, padding rows zero, gradients equal (the te backend
    zeroes TE's copies of dropped slots, so they add nothing to the tokens' gradient)."""
    from moe_dispatch.permute import backend_module, reference, resolve_backend
    dev = torch.device("cuda")
    try:
        resolve_backend(backend, dev)
    except ValueError as exc:
        pytest.skip(str(exc))
    for seed, (n, h, e, k) in enumerate([(1000, 256, 8, 2), (517, 128, 64, 8)]):
        g = torch.Generator(device=dev).manual_seed(seed)
        se = torch.rand(n, e, device=dev, generator=g).topk(k, -1).indices
        se = se.masked_fill(torch.rand(n, k, device=dev, generator=g) < 0.25, -1)
        x0 = torch.randn(n, h, device=dev, generator=g)
        grads = []
        for mod in (reference, backend_module(backend)):
            x = x0.clone().requires_grad_()
            permuted, _, row_id_map, counts = mod.permute_counted(x, se, e, None, 1, n * k)
            R = int(counts.sum())
            assert R == int((se >= 0).sum()) and not permuted[R:].any()
            (permuted * torch.arange(n * k, device=dev).unsqueeze(1)).sum().backward()  # padding rows get gradient too
            grads.append((permuted.detach(), row_id_map, counts, x.grad))
        for a, b in zip(*grads):
            assert torch.equal(a, b)
