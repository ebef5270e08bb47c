"""AllToAllTokenDispatcher in one process: protocol, exactness, gradients, errors."""
from __future__ import annotations

import re
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_dispatch import AllToAllTokenDispatcher, DispatchOutput, TokenDispatcher

from .distributed.ep_cases import Case, run_case


def test_protocol_conformance():
    d = AllToAllTokenDispatcher(8, 8, 16)
    assert isinstance(d, TokenDispatcher)
    out = d.dispatch(torch.randn(3, 16), torch.tensor([[0, 1], [1, 2], [7, -1]]), torch.rand(3, 2))
    assert isinstance(out, DispatchOutput)
    assert out.tokens_per_expert.dtype == torch.int64 and out.tokens_per_expert.shape == (8,)
    assert out.tokens_per_expert_list() == [1, 2, 1, 0, 0, 0, 0, 1]
    with pytest.raises(Exception):
        out.handle.row_id_map = None  # handles are frozen


@st.composite
def single_rank_cases(draw):
    e = draw(st.integers(1, 9))
    return Case(num_experts=e, hidden=draw(st.integers(1, 6)), topk=draw(st.integers(1, e)),
                tokens_per_rank=[draw(st.integers(0, 20))],
                routing=draw(st.sampled_from(["random", "uneven", "one_expert", "empty_experts", "with_drops"])),
                seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=40, deadline=None)
@given(single_rank_cases())
def test_dispatch_combine_equals_dense_reference(case):
    run_case(0, 1, lambda E, L, H, P: AllToAllTokenDispatcher(E, L, H, P, permute_backend="torch"),
             case, None, torch.device("cpu"))


@pytest.mark.parametrize("seed", [0, 1])
def test_identity_and_scaled_experts(seed):
    g = torch.Generator().manual_seed(seed)
    d = AllToAllTokenDispatcher(6, 6, 10)
    x = torch.randn(17, 10, generator=g)
    se = torch.rand(17, 6, generator=g).topk(3, -1).indices
    w = torch.rand(17, 3, generator=g)
    out = d.dispatch(x, se, w)
    torch.testing.assert_close(d.combine(out.expert_input, out.handle), x * w.sum(1, keepdim=True))
    scale = torch.repeat_interleave(torch.arange(1.0, 7.0), out.tokens_per_expert).unsqueeze(1)
    dense = sum(w[:, k:k + 1] * x * (se[:, k:k + 1] + 1) for k in range(3))
    torch.testing.assert_close(d.combine(out.expert_input * scale, out.handle), dense)


def test_bf16_output_dtype_and_fp32_weighting():
    d = AllToAllTokenDispatcher(4, 4, 8)
    x = torch.randn(9, 8, dtype=torch.bfloat16)
    se = torch.randint(0, 4, (9, 2))
    w = torch.rand(9, 2)
    out = d.dispatch(x, se, w)
    y = d.combine(out.expert_input.float(), out.handle)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (x.float() * w.sum(1, keepdim=True)).bfloat16())


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(0)
    d = AllToAllTokenDispatcher(3, 3, 4)
    se = torch.tensor([[0, 2], [1, -1], [2, 1], [0, 1], [2, 0]])
    x = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, w, W):
        out = d.dispatch(x, se, w)
        counts = out.tokens_per_expert_list()
        R = sum(counts)  # EP=1: the -1 slot leaves one zero padding row at the end
        assert out.expert_input.shape[0] == 10 and not out.expert_input[R:].any()
        rows = torch.cat([chunk @ W[e] for e, chunk in enumerate(out.expert_input[:R].split(counts))]
                         + [out.expert_input[R:]])
        return d.combine(rows, out.handle)

    assert torch.autograd.gradcheck(f, (x, w, W))


@pytest.mark.parametrize("kw, words", [
    (dict(num_experts=6, num_local_experts=3, ep_size=4), "divisible by ep_size"),
    (dict(num_experts=8, num_local_experts=3, ep_size=2), "num_local_experts * ep_size"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(permute_backend="fast"), "permute_backend"),
])
def test_bad_constructor_arguments(kw, words):
    args = dict(num_experts=8, num_local_experts=8, hidden_size=4)
    args.update(kw)
    with pytest.raises(ValueError, match=re.escape(words)):
        AllToAllTokenDispatcher(**args)


@pytest.mark.parametrize("args, exc, words", [
    ((torch.randn(3, 5), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)), ValueError, "hidden size 4"),
    ((torch.randn(3, 4), torch.zeros(3, 2), torch.rand(3, 2)), TypeError, "selected_experts must be an integer"),
    ((torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)), TypeError, "routing_weights must be floating"),
    ((torch.randn(3, 4), torch.zeros(2, 2, dtype=torch.long), torch.rand(2, 2)), ValueError, "selected_experts must be [N, K]"),
    ((torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 1)), ValueError, "routing_weights must have"),
    ((torch.randn(3, 4), torch.full((3, 2), 8), torch.rand(3, 2)), ValueError, "selected_experts must be in [-1, 8)"),
    ((torch.randn(3, 4).int(), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)), TypeError, "hidden_states must be floating"),
])
def test_bad_dispatch_arguments(args, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        AllToAllTokenDispatcher(8, 8, 4).dispatch(*args)


def test_combine_checks_rows_against_handle():
    d = AllToAllTokenDispatcher(4, 4, 4)
    out = d.dispatch(torch.randn(3, 4), torch.tensor([[0, 1], [1, 2], [3, -1]]), torch.rand(3, 2))
    with pytest.raises(ValueError, match="expert_output must be"):
        d.combine(torch.randn(4, 4), out.handle)
    with pytest.raises(TypeError, match="handle"):
        d.combine(out.expert_input, None)


def test_ep_without_group_is_an_error():
    d = AllToAllTokenDispatcher(8, 4, 4, ep_size=2)
    with pytest.raises(RuntimeError, match="set_ep_group"):
        d.dispatch(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.long), torch.rand(2, 1))
    with pytest.raises(ValueError, match="group must be"):
        d.set_ep_group(None)
