"""AllToAllTokenDispatcher capacity mode on gloo, 2 and 4 ranks: against the loop reference of
the drop policy (``tests/capacity_reference.py``) and the dense fp64 reference on the kept
routing, forward and gradients; bitwise equal to dropless mode when nothing overflows; a bad
rank raises on every rank."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_dispatch import AllToAllTokenDispatcher

from ..capacity_reference import kept_routing, routing
from .ep_cases import apply_local_experts, dense_forward, reference_expert_input
from .harness import RankError, run_ranks

pytestmark = pytest.mark.distributed


def _cases(P):
    E2 = 2 * P
    n = [5 + 3 * r for r in range(P)]
    # (E, L, H, K, tokens per rank, routing kind, tied weights, capacity C, seed)
    return [
        (E2, 2, 6, 2, n, "topk", False, max(n), 1),             # no overflow: bitwise vs dropless
        (E2, 2, 6, 2, [6] * P, "one_expert", False, 2, 2),      # every slot to one expert: drops
        (E2, 2, 5, 3, [0] + n[1:], "random", True, 3, 3),       # a rank with zero tokens, ties, repeats
        (P, 1, 4, P, n, "topk", False, 2, 4),                   # top-k = E, L = 1
        (E2, 2, 4, 2, [0] * P, "random", False, 2, 5),          # no tokens anywhere
        (4 * P, 4, 5, 3, n, "random", False, 4, 6),
    ]


def _one_case(rank, P, E, L, H, K, tokens, kind, tied, cap, seed, backend):
    g = torch.Generator().manual_seed(seed)
    routings = [routing(kind, t, K, E, g, tied) for t in tokens]
    xs = [torch.randn(t, H, generator=g, dtype=torch.float64) for t in tokens]
    W = torch.randn(E, H, H, generator=g, dtype=torch.float64) / H ** 0.5
    B = cap * min(K, L)
    kept = [kept_routing(se, w, E, L, B) for se, w in routings]
    se, w = routings[rank]

    def run(d, se_in):
        x = xs[rank].float().clone().requires_grad_()
        wr = w.clone().requires_grad_()
        W_local = W[rank * L:(rank + 1) * L].float().clone().requires_grad_()
        out = d.dispatch(x, se_in, wr)
        y_rows = apply_local_experts(out.expert_input, out.tokens_per_expert, W_local)
        y = d.combine(y_rows, out.handle)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + rank), dtype=torch.float64)
        (y.double() * gy).sum().backward()
        return out, y, x.grad, wr.grad, W_local.grad, gy

    d = AllToAllTokenDispatcher(E, L, H, P, permute_backend=backend, max_tokens_per_rank=cap, dropless=False)
    d.set_ep_group(dist.group.WORLD)
    out, y, gx, gw, gW, gy = run(d, se)
    assert out.expert_input.shape == (P * B, H)
    assert torch.equal(out.handle.dropped_slots, kept[rank][1]), "dropped slots differ from the policy"
    ref_rows, ref_counts = reference_expert_input(xs, [k for k, _ in kept], rank, L)
    R = sum(ref_counts)
    assert out.tokens_per_expert.tolist() == ref_counts
    assert torch.equal(out.expert_input[:R].double(), ref_rows.float().double()) and not out.expert_input[R:].any()

    # dense fp64 reference of the kept routing, every rank's tokens
    W_ref = W.clone().requires_grad_()
    total, mine = 0, None
    for r in range(P):
        xr, wr = xs[r].clone().requires_grad_(), routings[r][1].double().requires_grad_()
        yr = dense_forward(xr, kept[r][0], wr, W_ref)
        gr = torch.randn(yr.shape, generator=torch.Generator().manual_seed(seed + r), dtype=torch.float64)
        total = total + (yr * gr).sum()
        if r == rank:
            mine = (xr, wr, yr)
    if total.requires_grad:
        total.backward()
    xr, wr, yr = mine
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), yr.detach(), **close)
    for got, ref in ((gx, xr.grad), (gw, wr.grad), (gW, None if W_ref.grad is None else W_ref.grad[rank * L:(rank + 1) * L])):
        torch.testing.assert_close(got.double(), torch.zeros_like(got.double()) if ref is None else ref, **close)

    overflow = bool(torch.stack([k[1].any() for k in kept]).any())
    if not overflow:  # bitwise equal to dropless mode
        dl = AllToAllTokenDispatcher(E, L, H, P, permute_backend=backend)
        dl.set_ep_group(dist.group.WORLD)
        out_d, *res_d = run(dl, se)
        assert torch.equal(out_d.expert_input, out.expert_input[:R])
        for a, b in zip((y, gx, gw, gW), res_d):
            assert torch.equal(a, b), "capacity mode differs from dropless"
    return overflow


def _all(rank, P, backend):
    return [_one_case(rank, P, *c, backend) for c in _cases(P)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_capacity_mode_against_references(world_size):
    results = run_ranks(_all, world_size, "torch", timeout=240)
    assert results[0] == results[-1] and any(results[0]) and not all(results[0])  # some cases drop, some do not


def test_capacity_mode_triton_backend_two_ranks():
    from moe_dispatch.permute import triton as tb

    if not tb.is_available(torch.device("cpu")):
        pytest.skip(tb.why_unavailable(torch.device("cpu")))
    run_ranks(_all, 2, "triton", timeout=240)


def _bad_ids_on_one_rank(rank, world_size):
    d = AllToAllTokenDispatcher(2 * world_size, 2, 8, ep_size=world_size, max_tokens_per_rank=4, dropless=False)
    d.set_ep_group(dist.group.WORLD)
    se = torch.randint(0, 2 * world_size, (4, 2))
    if rank == 1:
        se[0, 0] = -3
    d.dispatch(torch.randn(4, 8), se, torch.rand(4, 2))


def test_bad_ids_raise_on_every_rank():
    with pytest.raises(RankError) as info:
        run_ranks(_bad_ids_on_one_rank, 2, timeout=60)
    assert sorted(info.value.errors) == [0, 1]
    assert all("rank(s) [1]" in tb for tb in info.value.errors.values())
