"""AllToAllTokenDispatcher capacity mode in one process: the layout and drop policy against the
loop reference of ``tests/capacity_reference.py`` (P ranks simulated by hand), equality with
dropless mode when nothing overflows (bitwise, fp32, with gradients), drops at EP=1, errors.
The multi-rank (gloo) tests are in ``tests/distributed/test_all_to_all_capacity_gloo.py``."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_dispatch import AllToAllTokenDispatcher
from moe_dispatch.dispatchers.capacity import capacity_layout, capacity_regroup_index, capacity_slots
from moe_dispatch.permute import reference as ref_permute
from moe_dispatch.permute import triton as triton_permute

from .capacity_reference import kept_routing, routing
from .distributed.ep_cases import reference_expert_input

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_permute.is_available(torch.device("cpu")), reason="triton backend unavailable on CPU"))]


@st.composite
def simulated_cases(draw):
    P, L = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    K = draw(st.integers(1, 4))
    return dict(P=P, L=L, K=K, C=draw(st.integers(1, 6)), H=draw(st.integers(1, 3)),
                tokens=[draw(st.sampled_from([0, 1, 3, 8, 13])) for _ in range(P)],
                kind=draw(st.sampled_from(["random", "topk", "one_expert"])), tied=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=60, deadline=None)
@given(simulated_cases())
def test_layout_and_regroup_match_the_loop_reference(case):
    """Every rank's send blocks, and what every rank then receives and regroups, by hand."""
    P, L, K, C, H = case["P"], case["L"], case["K"], case["C"], case["H"]
    E, B = P * L, capacity_slots(C, K, L)
    g = torch.Generator().manual_seed(case["seed"])
    xs, ses, kept, sends, send_counts = [], [], [], [], []
    for n in case["tokens"]:
        se, w = routing(case["kind"], n, K, E, g, case["tied"])
        x = torch.randn(n, H, generator=g)
        row_id_map, dropped, counts = capacity_layout(se, w, E, L, B)
        se_kept, dropped_ref = kept_routing(se, w, E, L, B)
        assert torch.equal(dropped, dropped_ref)
        assert torch.equal((row_id_map >= 0), se_kept >= 0)
        for d in range(P):  # block d: kept slots in (local expert, token, k) order, from d * B
            rows, _ = reference_expert_input([torch.arange(n).unsqueeze(1)], [se_kept], d, L)
            sel = (se_kept // L == d) & (se_kept >= 0)
            assert int(counts[d].sum()) == int(sel.sum()) <= B
            got = sorted((int(row_id_map[i, j]) - d * B, int(se_kept[i, j]), i, j) for i, j in sel.nonzero().tolist())
            assert [r for r, *_ in got] == list(range(len(got)))
            assert [(e, i) for _, e, i, _ in got] == sorted((e, i) for _, e, i, _ in got)
            assert rows.view(-1).tolist() == [i for _, _, i, _ in got]
        xs.append(x), ses.append(se), kept.append(se_kept)
        sends.append(ref_permute.permute_rows(x, row_id_map, P * B)), send_counts.append(counts)
    for r in range(P):
        received = torch.cat([s[r * B:(r + 1) * B] for s in sends])
        recv_counts = torch.stack([c[r] for c in send_counts])
        expert_major, rank_major = capacity_regroup_index(recv_counts, B)
        expert_input = received[expert_major]
        ref_rows, ref_counts = reference_expert_input(xs, kept, r, L)
        assert recv_counts.sum(0).tolist() == ref_counts
        R = sum(ref_counts)
        assert torch.equal(expert_input[:R], ref_rows) and not expert_input[R:].any()
        assert torch.equal(expert_input[rank_major], received)


def _run(d, x, se, w, W):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    W = W.clone().requires_grad_()
    out = d.dispatch(x, se, w)
    owner = torch.searchsorted(torch.cumsum(out.tokens_per_expert, 0), torch.arange(out.expert_input.shape[0]), right=True)
    y_rows = torch.einsum("rh,rhg->rg", out.expert_input, W[owner.clamp(max=W.shape[0] - 1)])
    y_rows = torch.where((owner >= W.shape[0]).unsqueeze(1), 7.0, y_rows)  # padding rows: combine ignores them
    y = d.combine(y_rows, out.handle)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    return out, y, x.grad, w.grad, W.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, n, k, e, cap", [("topk", 9, 2, 5, 9), ("random", 7, 3, 4, 7), ("topk", 6, 4, 4, 6),
                                                ("one_expert", 5, 2, 3, 5), ("random", 0, 2, 3, 4), ("topk", 4, 1, 6, 11)])
def test_no_overflow_equals_dropless_bitwise(backend, kind, n, k, e, cap):
    """EP=1 with N <= C and distinct experts per token: nothing can overflow (random routings
    with repeats may; then only the kept part is compared against the reference below)."""
    g = torch.Generator().manual_seed(n * 100 + k)
    se, w = routing(kind, n, k, e, g)
    if kind == "random":
        se = torch.where(se >= 0, (torch.arange(k) + se[:, :1].clamp(min=0)) % e, se)  # distinct per token
    x, W = torch.randn(n, 8, generator=g), torch.randn(e, 8, 8, generator=g)
    cap_d = AllToAllTokenDispatcher(e, e, 8, permute_backend=backend, max_tokens_per_rank=cap, dropless=False)
    drop_d = AllToAllTokenDispatcher(e, e, 8, permute_backend=backend)
    out_c, *res_c = _run(cap_d, x, se, w, W)
    out_d, *res_d = _run(drop_d, x, se, w, W)
    R = int(out_d.tokens_per_expert.sum())  # dropless at EP=1: N*K rows, zero padding past R (-1 slots)
    assert out_c.expert_input.shape[0] == cap * min(k, e) and out_d.expert_input.shape[0] == n * k
    assert torch.equal(out_c.tokens_per_expert, out_d.tokens_per_expert)
    assert torch.equal(out_c.expert_input[:R], out_d.expert_input[:R]) and not out_c.expert_input[R:].any()
    assert not out_d.expert_input[R:].any()
    assert not out_c.handle.dropped_slots.any()
    for a, b in zip(res_c, res_d):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, tied", [("one_expert", False), ("random", True), ("topk", False)])
def test_overflow_drops_by_policy(backend, kind, tied):
    """EP=1 with more slots than capacity: result equals dropless on the reference's kept routing."""
    n, k, e, cap = 12, 2, 4, 5
    g = torch.Generator().manual_seed(3 + tied)
    se, w = routing(kind, n, k, e, g, tied)
    x, W = torch.randn(n, 8, generator=g), torch.randn(e, 8, 8, generator=g)
    se_kept, dropped = kept_routing(se, w, e, e, capacity_slots(cap, k, e))
    assert dropped.any()
    d = AllToAllTokenDispatcher(e, e, 8, permute_backend=backend, max_tokens_per_rank=cap, dropless=False)
    out_c, *res_c = _run(d, x, se, w, W)
    out_d, *res_d = _run(AllToAllTokenDispatcher(e, e, 8, permute_backend=backend), x, se_kept, w, W)
    assert torch.equal(out_c.handle.dropped_slots, dropped)
    R = int(out_d.tokens_per_expert.sum())  # dropless at EP=1: N*K rows, zero padding past R (the dropped slots)
    assert torch.equal(out_c.expert_input[:R], out_d.expert_input[:R]) and not out_d.expert_input[R:].any()
    for a, b in zip(res_c, res_d):
        assert torch.equal(a, b)


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match="needs max_tokens_per_rank"):
        AllToAllTokenDispatcher(4, 4, 8, dropless=False)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        AllToAllTokenDispatcher(4, 4, 8, max_tokens_per_rank=0, dropless=False)
    with pytest.raises(ValueError, match="dropless"):
        AllToAllTokenDispatcher(4, 4, 8, max_tokens_per_rank=4, dropless="no")
    d = AllToAllTokenDispatcher(4, 4, 8, max_tokens_per_rank=4, dropless=False)
    with pytest.raises(ValueError, match=r"rank\(s\) \[0\]"):  # CPU: invalid ids raise (free to check)
        d.dispatch(torch.randn(2, 8), torch.tensor([[0, 4], [1, 2]]), torch.rand(2, 2))
    out = d.dispatch(torch.randn(2, 8), torch.tensor([[0, 3], [1, -1]]), torch.rand(2, 2))
    with pytest.raises(ValueError, match="expert_output"):
        d.combine(torch.randn(3, 8), out.handle)


_SYNCING_OPS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::bincount",
                "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::item"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_path_uses_no_op_that_syncs_on_cuda(backend):
    """On CPU, the ATen ops of a capacity-mode step (dispatch, combine, backward) contain none that
    makes CUDA wait for the host (the GPU test runs it under set_sync_debug_mode("error"))."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name == "aten::index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] if len(args) > 1 else [])):
                name = "aten::index(bool mask)"
            if name == "aten::repeat_interleave" and "output_size" not in (kwargs or {}):
                name = "aten::repeat_interleave(no output_size)"
            seen.add(name)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    se, w = routing("random", 10, 2, 4, g)
    se = se.clamp(min=0)  # valid ids: invalid ones are checked on CPU only (a host read on GPU)
    x = torch.randn(10, 8, requires_grad=True)
    w.requires_grad_()
    d = AllToAllTokenDispatcher(4, 4, 8, permute_backend=backend, max_tokens_per_rank=3, dropless=False)
    d._exchange_capacity_counts = lambda counts, *_: counts  # the CPU-only id check reads the host
    with Record():
        out = d.dispatch(x, se, w)
        d.combine(out.expert_input * 2, out.handle).sum().backward()
    bad = {n for n in seen if n in _SYNCING_OPS or "bool mask" in n or "no output_size" in n}
    assert not bad, bad
