"""Expert-parallel equivalence cases shared by the gloo tests (pytest) and the NCCL torchrun
scripts: any dispatcher, any EP size.

Every rank builds *all* ranks' inputs from one seed, so each rank can compute the dense
single-process reference for its own tokens and experts without gathering anything.

Experts are random linear maps ``f_e(x) = x @ W[e]`` so outputs and gradients distinguish
experts, tokens and weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTINGS = ("random", "uneven", "one_expert", "empty_experts", "with_drops", "topk_all")


@dataclass
class Case:
    num_experts: int
    hidden: int
    topk: int
    tokens_per_rank: list[int]
    routing: str
    seed: int


def make_inputs(case: Case, world_size: int, dtype=torch.float32):
    """-> per-rank lists of (x [N_r, H], selected [N_r, K], weights [N_r, K]) and W [E, H, H], all on CPU."""
    g = torch.Generator().manual_seed(case.seed)
    xs, ses, ws = make_routings(case, world_size, dtype, generator=g)
    W = (torch.randn(case.num_experts, case.hidden, case.hidden, generator=g) / case.hidden ** 0.5).to(dtype)
    return xs, ses, ws, W


def make_routings(case: Case, world_size: int, dtype=torch.float32, *, generator=None):
    """-> per-rank lists of (x [N_r, H], selected [N_r, K], weights [N_r, K]) on CPU (no expert
    weights: [E, H, H] is too big at H = 7168)."""
    g = generator if generator is not None else torch.Generator().manual_seed(case.seed)
    E, H, K = case.num_experts, case.hidden, case.topk
    xs, ses, ws = [], [], []
    for r in range(world_size):
        n = case.tokens_per_rank[r]
        x = torch.randn(n, H, generator=g).to(dtype)
        scores = torch.rand(n, E, generator=g)
        if case.routing == "uneven":  # skew the load towards the first rank's experts
            scores[:, : max(1, E // world_size)] += 0.7
        if case.routing == "empty_experts":  # half the experts never chosen
            scores[:, E // 2:] -= 10.0
        se = scores.topk(K, dim=-1).indices
        if case.routing == "one_expert":
            se = torch.full((n, K), -1, dtype=torch.int64)
            se[:, 0] = E - 1
        if case.routing == "with_drops":
            se = se.masked_fill(torch.rand(n, K, generator=g) < 0.3, -1)
        w = torch.rand(n, K, generator=g) + 0.1
        xs.append(x), ses.append(se), ws.append(w)
    return xs, ses, ws


def reference_expert_input(xs, ses, rank, num_local_experts):
    """Rows of ``rank``'s experts in the contract's order: (local expert, source rank, token, k)."""
    rows, counts = [], []
    for local in range(num_local_experts):
        e = rank * num_local_experts + local
        n_rows = 0
        for x, se in zip(xs, ses):
            n_idx, _ = (se == e).nonzero(as_tuple=True)  # row-major: sorted by (token, k)
            rows.append(x[n_idx])
            n_rows += n_idx.numel()
        counts.append(n_rows)
    return torch.cat(rows) if rows else torch.empty(0, xs[0].shape[1], dtype=xs[0].dtype), counts


def dense_forward(x, se, w, W):
    """``y[n] = sum_k w[n,k] * x[n] @ W[se[n,k]]`` (dropped slots skipped), in x's dtype."""
    y = x.new_zeros(x.shape[0], W.shape[2])
    for e in range(W.shape[0]):
        n_idx, k_idx = (se == e).nonzero(as_tuple=True)
        if n_idx.numel():
            y = y.index_add(0, n_idx, (x[n_idx] @ W[e]) * w[n_idx, k_idx].unsqueeze(-1))
    return y


def apply_local_experts(expert_input, tokens_per_expert, W_local):
    """Row i of ``expert_input`` goes through its local expert's W. ``[R, H]``."""
    counts = tokens_per_expert.tolist()
    outs, start = [], 0
    for local, c in enumerate(counts):
        outs.append(expert_input[start:start + c] @ W_local[local])
        start += c
    tail = expert_input[start:]  # capacity-bound dispatchers may pad; padding maps to zero
    outs.append(torch.zeros_like(tail))
    return torch.cat(outs)


def run_case(rank: int, world_size: int, make_dispatcher, case: Case, group, device, dtype=torch.float32):
    """Runs one case on this rank; returns max errors (forward, expert_input, grads) vs the
    dense reference, and the row counts. Raises AssertionError on mismatch."""
    xs, ses, ws, W = make_inputs(case, world_size, dtype=torch.float64)
    L = case.num_experts // world_size
    dispatcher = make_dispatcher(case.num_experts, L, case.hidden, world_size)
    dispatcher.set_ep_group(group)

    x = xs[rank].to(device, dtype).clone().requires_grad_()
    w = ws[rank].to(device, torch.float32).clone().requires_grad_()
    se = ses[rank].to(device)
    W_local = W[rank * L:(rank + 1) * L].to(device, dtype).clone().requires_grad_()
    out = dispatcher.dispatch(x, se, w)
    counts = out.tokens_per_expert.tolist()
    n_rows = sum(counts)
    y = dispatcher.combine(apply_local_experts(out.expert_input, out.tokens_per_expert, W_local), out.handle)
    grad_seed = torch.Generator().manual_seed(case.seed + 1000 + rank)
    g = torch.randn(y.shape, generator=grad_seed, dtype=torch.float64)
    (y.double() * g.to(device)).sum().backward()

    # Dense reference over all ranks' tokens, in fp64.
    W_ref = W.clone().requires_grad_()
    refs = []
    total = 0
    for r in range(world_size):
        xr, wr = xs[r].clone().requires_grad_(), ws[r].double().requires_grad_()
        yr = dense_forward(xr, ses[r], wr, W_ref)
        gr = torch.randn(yr.shape, generator=torch.Generator().manual_seed(case.seed + 1000 + r), dtype=torch.float64)
        total = total + (yr * gr).sum()
        refs.append((xr, wr, yr))
    if total.requires_grad:  # False when no rank routed any token anywhere
        total.backward()
    x_ref, w_ref, y_ref = refs[rank]
    for t in (x_ref, w_ref, W_ref):
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    ref_rows, ref_counts = reference_expert_input(xs, ses, rank, L)

    def close(actual, expected, what):
        actual = actual.detach().cpu().double()
        if dtype == torch.float32:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=what)
        else:  # bf16: relative error of the whole tensor (METHOD.md: bf16 lands under 1e-2)
            err = (actual - expected).norm() / expected.norm().clamp(min=1e-30)
            assert err < 1e-2, f"{what}: relative error {err:.2e}"

    assert counts == ref_counts, f"tokens_per_expert {counts} != reference {ref_counts}"
    torch.testing.assert_close(out.expert_input[:n_rows].cpu().double(), ref_rows.to(dtype).double(), rtol=0, atol=0,
                               msg="expert_input rows differ from the contract's order")
    close(y, y_ref, "combine output")
    close(x.grad, x_ref.grad, "grad hidden_states")
    close(w.grad, w_ref.grad, "grad routing_weights")
    close(W_local.grad, W_ref.grad[rank * L:(rank + 1) * L], "grad expert weights")
    assert y.dtype == dtype
    return {"rows": n_rows, "tokens": case.tokens_per_rank[rank]}


def standard_cases(world_size: int, seed: int = 0) -> list[Case]:
    """The awkward routings every dispatcher must pass, sized for CPU."""
    E = 4 * world_size
    n = [5 + 7 * r for r in range(world_size)]
    zero_first = [0] + n[1:]
    return [
        Case(E, 16, 2, n, "random", seed),
        Case(E, 16, 2, n, "uneven", seed + 1),
        Case(E, 16, 2, zero_first, "random", seed + 2),   # a rank with zero tokens
        Case(E, 16, 2, n, "one_expert", seed + 3),        # every token to one expert
        Case(E, 16, 3, n, "empty_experts", seed + 4),
        Case(E, 12, 2, n, "with_drops", seed + 5),        # -1 slots
        Case(world_size, 8, world_size, n, "random", seed + 6),  # top-k = num_experts, L = 1
        Case(2 * world_size, 8, 1, [0] * world_size, "random", seed + 7),  # no tokens anywhere
    ]


def init_torchrun_nccl():
    """For the scripts torchrun runs: this rank's GPU and an NCCL WORLD group (5 min timeout).

    Returns ``(rank, world_size, group, device)``."""
    import datetime
    import os

    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=5))
    return dist.get_rank(), dist.get_world_size(), dist.group.WORLD, torch.device("cuda", local_rank)
