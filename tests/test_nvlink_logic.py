"""NVLinkTokenDispatcher on CPU: the protocol of P ranks simulated in one process.

The same Triton kernels as on GPU run under ``TRITON_INTERPRET=1`` on a ``SimulatedWorkspace``
(P sets of CPU buffers); ``run_lockstep`` runs every rank's program up to its next phase
boundary before any rank continues, so each flag a kernel waits for is already set. Checked
against a dense single-process reference (fp64): ``expert_input`` rows and order,
``tokens_per_expert``, combine, and both backward passes, for P in (1, 2, 4), plus the
protocol invariant that every flag is back to 0 after each operation.
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # conftest sets it on CPU
    pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported)", allow_module_level=True)
pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moe_dispatch.dispatchers._symm_workspace import SimulatedWorkspace  # noqa: E402
from moe_dispatch.dispatchers.nvlink import NVLinkTokenDispatcher, NVLinkTuning, run_lockstep  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU simulation runs under the Triton interpreter only")


# ------------------------------------------------------------------------------------------------
# dense reference
# ------------------------------------------------------------------------------------------------
def reference_rows(ses: list[torch.Tensor], world_size: int, num_local: int):
    """Row of every (source, token, k) slot at its destination rank, in the contract's order
    (local expert, source rank, token, k); and each rank's tokens_per_expert."""
    rows = [torch.full(se.shape, -1, dtype=torch.long) for se in ses]
    counts = []
    for r in range(world_size):
        i, per_expert = 0, []
        for local in range(num_local):
            e, start = r * num_local + local, i
            for s, se in enumerate(ses):
                for n, k in (se == e).nonzero().tolist():
                    rows[s][n, k] = i
                    i += 1
            per_expert.append(i - start)
        counts.append(per_expert)
    return rows, counts


def reference(xs, ses, ws, ys, gs, ges, world_size, num_local):
    """fp64: expert inputs, combine outputs, and the gradients of both operations."""
    rows, counts = reference_rows(ses, world_size, num_local)
    H = xs[0].shape[1]
    R = [sum(c) for c in counts]
    ei = [torch.zeros(R[r], H, dtype=torch.float64) for r in range(world_size)]
    out = [torch.zeros(x.shape, dtype=torch.float64) for x in xs]
    gx = [torch.zeros(x.shape, dtype=torch.float64) for x in xs]
    gy = [torch.zeros(R[r], H, dtype=torch.float64) for r in range(world_size)]
    gw = [torch.zeros(w.shape, dtype=torch.float64) for w in ws]
    for s, se in enumerate(ses):
        for n, k in (se >= 0).nonzero().tolist():
            r, row = int(se[n, k]) // num_local, int(rows[s][n, k])
            w = float(ws[s][n, k])
            ei[r][row] = xs[s][n].double()
            out[s][n] += w * ys[r][row].double()
            gx[s][n] += ges[r][row].double()
            gy[r][row] = w * gs[s][n].double()
            gw[s][n, k] = (gs[s][n].double() * ys[r][row].double()).sum()
    return {"rows": rows, "counts": counts, "ei": ei, "out": out, "gx": gx, "gy": gy, "gw": gw}


# ------------------------------------------------------------------------------------------------
# simulation driver
# ------------------------------------------------------------------------------------------------
def make_ranks(world_size, num_experts, hidden, **kwargs):
    sim = SimulatedWorkspace(world_size, num_experts)
    ds = [NVLinkTokenDispatcher(num_experts, num_experts // world_size, hidden, world_size, **kwargs)
          for _ in range(world_size)]
    for r, d in enumerate(ds):
        d._attach_workspace(sim.rank_view(r))
    return sim, ds


def assert_combines_match_reference(runs, P: int, E: int) -> None:
    """``runs``: ``(inputs from random_inputs, expert outputs per rank, combine outputs per rank)``;
    every rank's combine equals the dense reference of its inputs (fp32 tolerances)."""
    for (xs, ses, ws, gs, _, _), ys, outs in runs:
        ref = reference(xs, ses, ws, ys, gs, ys, P, E // P)
        for s in range(P):
            torch.testing.assert_close(outs[s].double(), ref["out"][s], rtol=1e-5, atol=1e-5)


def assert_flags_clear(sim: SimulatedWorkspace):
    """Protocol invariant: every count flag and chunk flag is 0 between operations."""
    for r in range(sim.world_size):
        v = sim.rank_view(r)
        assert int(v.count_flags(r).abs().sum()) == 0, f"rank {r}: count flags {v.count_flags(r).tolist()}"
        for ch in ("stage", "comb", "gw"):
            assert int(v.ctl(ch, r)[..., 0].abs().sum()) == 0, f"rank {r}: {ch} flags left set"
        assert v.status.tolist() == [0, 0, 0, 0], f"rank {r}: status {v.status.tolist()} (a spin timed out)"


def simulate(sim, ds, xs, ses, ws, make_ys, gs, make_ges):
    P = len(ds)
    disp = run_lockstep([d._dispatch_program(xs[r], ses[r], ws[r]) for r, d in enumerate(ds)])
    assert_flags_clear(sim)
    ys = make_ys([e for e, _, _ in disp])
    out = run_lockstep([d._combine_program(ys[r], disp[r][2], use_weights=True) for r, d in enumerate(ds)])
    assert_flags_clear(sim)
    cb = run_lockstep([d._combine_backward_program(gs[r], ys[r], disp[r][2]) for r, d in enumerate(ds)])
    assert_flags_clear(sim)
    ges = make_ges([e for e, _, _ in disp])
    gx = run_lockstep([d._combine_program(ges[r], disp[r][2], use_weights=False) for r, d in enumerate(ds)])
    assert_flags_clear(sim)
    return {
        "ei": [disp[r][0] for r in range(P)], "tpe": [disp[r][1] for r in range(P)], "handle": [disp[r][2] for r in range(P)],
        "ys": ys, "out": out, "gy": [c[0] for c in cb], "gw": [c[1] for c in cb], "ges": ges, "gx": gx,
    }


def check_against_reference(xs, ses, ws, gs, res, num_local, capacity_rows=None):
    P = len(xs)
    ref = reference(xs, ses, ws, res["ys"], gs, res["ges"], P, num_local)
    close = dict(rtol=1e-5, atol=1e-5)
    for r in range(P):
        R = sum(ref["counts"][r])
        assert res["tpe"][r].dtype == torch.int64
        assert res["tpe"][r].tolist() == ref["counts"][r], f"rank {r} tokens_per_expert"
        ei = res["ei"][r]
        assert ei.shape[0] == (R if capacity_rows is None else capacity_rows), f"rank {r}: {ei.shape[0]} rows"
        assert torch.equal(ei[:R].double(), ref["ei"][r]), f"rank {r}: expert_input rows or order differ"
        torch.testing.assert_close(res["gy"][r][:R].double(), ref["gy"][r], **close, msg=f"rank {r} grad expert_output")
        if capacity_rows is not None:
            assert torch.all(res["gy"][r][R:] == 0), "gradient of padding rows must be zero"
    for s in range(P):
        assert res["out"][s].dtype == xs[s].dtype
        torch.testing.assert_close(res["out"][s].double(), ref["out"][s], **close, msg=f"rank {s} combine")
        torch.testing.assert_close(res["gx"][s].double(), ref["gx"][s], **close, msg=f"rank {s} grad hidden")
        torch.testing.assert_close(res["gw"][s].double(), ref["gw"][s], **close, msg=f"rank {s} grad weights")


def random_inputs(seed, world_size, num_experts, hidden, topk, tokens, mode="random", drop=0.0):
    g = torch.Generator().manual_seed(seed)
    xs, ses, ws, gs = [], [], [], []
    for r in range(world_size):
        n = tokens[r]
        xs.append(torch.randn(n, hidden, generator=g))
        if mode == "one_expert":
            se = torch.full((n, topk), -1, dtype=torch.int64)
            se[:, 0] = num_experts - 1
        else:
            se = torch.stack([torch.randperm(num_experts, generator=g)[:topk] for _ in range(n)]) if n else \
                torch.empty(0, topk, dtype=torch.int64)
            if mode == "empty_experts":  # only the first expert of each rank is ever chosen
                L = num_experts // world_size
                se = (se % world_size) * L
            if drop:
                se = se.masked_fill(torch.rand(n, topk, generator=g) < drop, -1)
        ses.append(se)
        ws.append(torch.rand(n, topk, generator=g) + 0.1)
        gs.append(torch.randn(n, hidden, generator=g))

    def ys(eis):
        gg = torch.Generator().manual_seed(seed + 1)
        return [torch.randn(e.shape, generator=gg) for e in eis]

    def ges(eis):
        gg = torch.Generator().manual_seed(seed + 2)
        return [torch.randn(e.shape, generator=gg) for e in eis]

    return xs, ses, ws, gs, ys, ges


def run_and_check(world_size, num_experts, hidden, topk, tokens, seed=0, mode="random", drop=0.0, **kwargs):
    xs, ses, ws, gs, ys, ges = random_inputs(seed, world_size, num_experts, hidden, topk, tokens, mode, drop)
    sim, ds = make_ranks(world_size, num_experts, hidden, **kwargs)
    res = simulate(sim, ds, xs, ses, ws, ys, gs, ges)
    cap_rows = None
    if kwargs.get("dropless") is False:
        cap_rows = world_size * kwargs["max_tokens_per_rank"] * min(topk, num_experts // world_size)
    check_against_reference(xs, ses, ws, gs, res, num_experts // world_size, cap_rows)
    return sim, ds, res


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
@settings(max_examples=14, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_routings_match_dense_reference(data):
    P = data.draw(st.sampled_from([1, 2, 2, 4]), label="P")
    L = data.draw(st.integers(1, 3), label="L")
    E = P * L
    K = data.draw(st.integers(1, min(E, 4)), label="K")
    H = data.draw(st.sampled_from([4, 12]), label="H")
    tokens = data.draw(st.lists(st.integers(0, 7), min_size=P, max_size=P), label="tokens")
    mode = data.draw(st.sampled_from(["random", "random", "one_expert", "empty_experts"]), label="mode")
    drop = data.draw(st.sampled_from([0.0, 0.3]), label="drop")
    run_and_check(P, E, H, K, tokens, seed=data.draw(st.integers(0, 10**6), label="seed"), mode=mode, drop=drop)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_with_zero_tokens_and_topk_equal_num_experts(world_size):
    tokens = [0] + [3 + r for r in range(1, world_size)]
    run_and_check(world_size, world_size, 8, world_size, tokens, seed=1)   # K = E, L = 1


def test_no_tokens_anywhere():
    run_and_check(2, 4, 8, 2, [0, 0], seed=2)


def test_all_tokens_to_one_expert_many_chunks():
    run_and_check(2, 6, 12, 2, [9, 8], seed=3, mode="one_expert")


def test_capacity_mode_pads_and_zero_grads_padding():
    sim, ds, res = run_and_check(2, 4, 8, 2, [5, 3], seed=4, dropless=False, max_tokens_per_rank=6)
    assert all(d.dropless is False for d in ds)


def test_bf16_within_tolerance():
    """bf16: rows bit-exact; combine (partial sums travel in bf16) and gradients within 1e-2."""
    P, E, H, K = 2, 4, 12, 2
    xs, ses, ws, gs, ys, ges = random_inputs(6, P, E, H, K, [6, 5], drop=0.2)
    xs, gs = [x.bfloat16() for x in xs], [g.bfloat16() for g in gs]
    sim, ds = make_ranks(P, E, H)
    res = simulate(sim, ds, xs, ses, ws, lambda eis: [y.bfloat16() for y in ys(eis)], gs,
                   lambda eis: [g.bfloat16() for g in ges(eis)])
    ref = reference(xs, ses, ws, res["ys"], gs, res["ges"], P, E // P)

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm().clamp(min=1e-30))

    for r in range(P):
        R = sum(ref["counts"][r])
        assert torch.equal(res["ei"][r][:R].double(), ref["ei"][r])
        assert rel(res["gy"][r][:R], ref["gy"][r]) < 1e-2
        assert res["out"][r].dtype == torch.bfloat16
        for key in ("out", "gx", "gw"):
            assert rel(res[key][r], ref[key][r]) < 1e-2, key


@pytest.mark.parametrize("world_size", [4])
def test_capacity_mode_four_ranks(world_size):
    run_and_check(world_size, 8, 4, 2, [3, 0, 5, 4], seed=7, dropless=False, max_tokens_per_rank=5)


def test_capacity_mode_rejects_too_many_tokens():
    sim, ds = make_ranks(2, 4, 8, dropless=False, max_tokens_per_rank=2)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        ds[0].dispatch(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))


def test_invalid_expert_ids_raise_on_every_rank():
    """Rank 1 passes an id >= E; both ranks raise the same ValueError after the count exchange
    (before any token moves), and the flags are clean for the next dispatch."""
    sim, ds = make_ranks(2, 4, 8)
    xs = [torch.randn(3, 8), torch.randn(2, 8)]
    ses = [torch.tensor([[0, 1], [2, 3], [1, -1]]), torch.tensor([[0, 4], [3, 2]])]
    ws = [torch.rand(3, 2), torch.rand(2, 2)]
    progs = [d._dispatch_program(xs[r], ses[r], ws[r]) for r, d in enumerate(ds)]
    for p in progs:
        next(p)  # route + counts exchange
    for p in progs:
        with pytest.raises(ValueError, match=r"rank\(s\) \[1\]"):
            next(p)
    assert_flags_clear(sim)
    ses[1] = torch.tensor([[0, 1], [3, 2]])
    res = run_lockstep([d._dispatch_program(xs[r], ses[r], ws[r]) for r, d in enumerate(ds)])
    _, counts = reference_rows(ses, 2, 2)
    assert [r[1].tolist() for r in res] == counts


def test_two_micro_batches_in_flight_and_growth():
    """dispatch A, dispatch B (larger: the workspace grows), combine B, combine A: handles own all
    combine needs, the staging buffers may be reused in between."""
    P, E, H, K = 2, 4, 8, 2
    a = random_inputs(10, P, E, H, K, [3, 4])
    b = random_inputs(11, P, E, H, K, [9, 7])
    sim, ds = make_ranks(P, E, H)
    da = run_lockstep([d._dispatch_program(a[0][r], a[1][r], a[2][r]) for r, d in enumerate(ds)])
    gen_a = sim.generation
    db = run_lockstep([d._dispatch_program(b[0][r], b[1][r], b[2][r]) for r, d in enumerate(ds)])
    assert sim.generation > gen_a, "the larger batch should have grown the data region"
    ya, yb = a[4]([x for x, _, _ in da]), b[4]([x for x, _, _ in db])
    ob = run_lockstep([d._combine_program(yb[r], db[r][2], use_weights=True) for r, d in enumerate(ds)])
    oa = run_lockstep([d._combine_program(ya[r], da[r][2], use_weights=True) for r, d in enumerate(ds)])
    assert_flags_clear(sim)
    assert_combines_match_reference(((a, ya, oa), (b, yb, ob)), P, E)


def test_dispatchers_sharing_a_workspace_interleave():
    """Two layers (different H and K) share one workspace; their operations interleave."""
    P, E = 2, 4
    sim, ds1 = make_ranks(P, E, 8)
    ds2 = [NVLinkTokenDispatcher(E, E // P, 12, P) for _ in range(P)]
    for a, b in zip(ds2, ds1):
        a.share_workspace(b)
    i1, i2 = random_inputs(30, P, E, 8, 2, [4, 3]), random_inputs(31, P, E, 12, 3, [2, 5])
    d1 = run_lockstep([d._dispatch_program(i1[0][r], i1[1][r], i1[2][r]) for r, d in enumerate(ds1)])
    d2 = run_lockstep([d._dispatch_program(i2[0][r], i2[1][r], i2[2][r]) for r, d in enumerate(ds2)])
    y1, y2 = i1[4]([x for x, _, _ in d1]), i2[4]([x for x, _, _ in d2])
    o2 = run_lockstep([d._combine_program(y2[r], d2[r][2], use_weights=True) for r, d in enumerate(ds2)])
    o1 = run_lockstep([d._combine_program(y1[r], d1[r][2], use_weights=True) for r, d in enumerate(ds1)])
    assert_flags_clear(sim)
    assert_combines_match_reference(((i1, y1, o1), (i2, y2, o2)), P, E)
    with pytest.raises(ValueError, match="same num_experts"):
        NVLinkTokenDispatcher(2 * E, E, 8, P).share_workspace(ds1[0])


def test_repeated_expert_in_a_token():
    """Routers never repeat an expert within a token, but the protocol allows it: two rows."""
    xs = [torch.randn(2, 4), torch.randn(1, 4)]
    ses = [torch.tensor([[1, 1], [0, 3]]), torch.tensor([[3, 3]])]
    ws = [torch.rand(2, 2), torch.rand(1, 2)]
    gs = [torch.randn(2, 4), torch.randn(1, 4)]
    sim, ds = make_ranks(2, 4, 4)
    res = simulate(sim, ds, xs, ses, ws, lambda eis: [torch.randn(e.shape) for e in eis], gs,
                   lambda eis: [torch.randn(e.shape) for e in eis])
    check_against_reference(xs, ses, ws, gs, res, 2)


def test_single_rank_public_api_autograd_matches_reference_path():
    """ep_size=1 through dispatch()/combine() and autograd (fused kernels, P = 1) equals the torch
    reference path (permute_backend='torch'), forward and gradients."""
    torch.manual_seed(5)
    E, H, K, N = 5, 12, 2, 9
    se = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    se[2, 1] = -1
    x0, w0 = torch.randn(N, H, dtype=torch.float64).float(), torch.rand(N, K)
    W = torch.randn(E, H, H) / H ** 0.5
    results = []
    for backend in ("auto", "torch"):
        d = NVLinkTokenDispatcher(E, E, H, 1, permute_backend=backend)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        Wl = W.clone().requires_grad_()
        out = d.dispatch(x, se, w)
        rows, start = [], 0
        for e, c in enumerate(out.tokens_per_expert.tolist()):
            rows.append(out.expert_input[start:start + c] @ Wl[e])
            start += c
        y = d.combine(torch.cat(rows), out.handle)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((out.expert_input.detach(), out.tokens_per_expert, y.detach(), x.grad, w.grad, Wl.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_single_rank_capacity_mode_public_api():
    E, H, K, N, cap = 4, 8, 2, 5, 6
    se = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    x, w = torch.randn(N, H), torch.rand(N, K)
    d = NVLinkTokenDispatcher(E, E, H, max_tokens_per_rank=cap, dropless=False)
    out = d.dispatch(x, se, w)
    assert out.expert_input.shape == (cap * K, H)
    R = int(out.tokens_per_expert.sum())
    ref = NVLinkTokenDispatcher(E, E, H, permute_backend="torch").dispatch(x, se, w)
    torch.testing.assert_close(out.expert_input[:R], ref.expert_input)
    y = d.combine(out.expert_input * 2, out.handle)
    torch.testing.assert_close(y, 2 * (x * w.sum(1, keepdim=True)), rtol=1e-5, atol=1e-5)


def test_single_rank_invalid_ids_raise():
    d = NVLinkTokenDispatcher(4, 4, 8)
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        d.dispatch(torch.randn(2, 8), torch.tensor([[0, 4], [1, 2]]), torch.rand(2, 2))


def test_argument_checks():
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        NVLinkTokenDispatcher(4, 4, 8, dropless=False)
    with pytest.raises(ValueError, match="num_local_experts"):
        NVLinkTokenDispatcher(4, 3, 8, ep_size=1)
    with pytest.raises(ValueError, match="permute_backend"):
        NVLinkTokenDispatcher(4, 4, 8, permute_backend="nope")
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        NVLinkTokenDispatcher(4, 4, 8, max_tokens_per_rank=0)
    d = NVLinkTokenDispatcher(4, 4, 8)
    with pytest.raises(TypeError, match="selected_experts"):
        d.dispatch(torch.randn(2, 8), torch.zeros(2, 1), torch.rand(2, 1))
    with pytest.raises(ValueError, match="hidden_states"):
        d.dispatch(torch.randn(2, 7), torch.zeros(2, 1, dtype=torch.long), torch.rand(2, 1))
    with pytest.raises(ValueError, match="routing_weights"):
        d.dispatch(torch.randn(2, 8), torch.zeros(2, 1, dtype=torch.long), torch.rand(2, 2))
    d2 = NVLinkTokenDispatcher(4, 2, 8, ep_size=2)
    with pytest.raises(RuntimeError, match="set_ep_group"):
        d2.dispatch(torch.randn(2, 8), torch.zeros(2, 1, dtype=torch.long), torch.rand(2, 1))
    with pytest.raises(ValueError, match="group"):
        d2.set_ep_group(None)
    out = d.dispatch(torch.randn(2, 8), torch.zeros(2, 1, dtype=torch.long), torch.rand(2, 1))
    with pytest.raises(ValueError, match="expert_output"):
        d.combine(torch.randn(3, 8), out.handle)
    with pytest.raises(TypeError, match="handle"):
        d.combine(out.expert_input, object())


def test_tuning_overrides_and_kernel_spin_timeout_reports():
    """A rank whose peer never writes its counts gives up after max_spins, sets status, and the
    dispatcher raises instead of hanging."""
    sim, ds = make_ranks(2, 4, 8)
    ds[0].tuning_overrides = {"max_spins": 5}
    prog = ds[0]._dispatch_program(torch.randn(2, 8), torch.tensor([[0, 3], [1, 2]]), torch.rand(2, 2))
    next(prog)  # rank 1 never runs
    with pytest.raises(RuntimeError, match="timed out"):
        next(prog)
    d = NVLinkTokenDispatcher(4, 2, 8, 2)
    d.tuning_overrides = {"chunk_target": 10**6}
    with pytest.raises(ValueError, match="chunk_target"):
        d.tuning(sim.rank_view(0), 8)
    assert isinstance(ds[1].tuning(sim.rank_view(1), 8), NVLinkTuning)


# ------------------------------------------------------------------------------------------------
# the real SymmetricWorkspace class, on a fake symmetric-memory backend (CPU)
# ------------------------------------------------------------------------------------------------
class _FakeGroup:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


class _FakeSymm:
    """Symmetric allocations for P ranks in one process: allocation i of every rank is created
    together; each tensor sits 256 bytes into its allocation (like a pool block), so the
    workspace must find peers' buffers through ``buffer_ptrs`` + offset, as on GPU."""

    OFFSET = 256

    def __init__(self, world_size):
        self.world_size = world_size
        self.allocs: list[list[torch.Tensor]] = []
        self.next_index = [0] * world_size
        self.by_ptr: dict[int, tuple[int, int]] = {}

    def empty(self, nbytes, dtype, device):
        assert dtype == torch.uint8
        rank = self._current_rank
        i = self.next_index[rank]
        self.next_index[rank] += 1
        if i == len(self.allocs):
            self.allocs.append([torch.full((nbytes + self.OFFSET,), 0x5A, dtype=torch.uint8) for _ in range(self.world_size)])
        t = self.allocs[i][rank][self.OFFSET:]
        self.by_ptr[t.data_ptr()] = (i, rank)
        return t

    def rendezvous(self, tensor, group):
        i, rank = self.by_ptr[tensor.data_ptr()]
        owner = self

        class Handle:
            def __init__(self):
                self.rank, self.world_size = rank, owner.world_size
                self.buffer_ptrs = [owner.allocs[i][r].data_ptr() for r in range(owner.world_size)]

            def get_buffer(self, peer, sizes, dtype, storage_offset=0):
                base = owner.allocs[i][peer].view(dtype)
                n = 1
                for d in sizes:
                    n *= d
                return base[storage_offset:storage_offset + n].view(sizes)

            def barrier(self, channel=0):
                pass

        return Handle()


def test_symmetric_workspace_class_on_fake_backend(monkeypatch):
    import contextlib
    import types

    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    from moe_dispatch.dispatchers import _symm_workspace as W

    P, E, H, K = 2, 4, 8, 2
    fake = _FakeSymm(P)
    monkeypatch.setattr(symm_mem, "empty", lambda n, dtype, device: fake.empty(n, dtype, device))
    monkeypatch.setattr(symm_mem, "rendezvous", fake.rendezvous)
    monkeypatch.setattr(dist, "get_rank", lambda g: g.rank)
    monkeypatch.setattr(dist, "get_world_size", lambda g: g.size)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(slice(None), [obj] * len(out)))
    monkeypatch.setattr(W, "check_peer_access", lambda group, device: None)
    monkeypatch.setattr(W, "_use_cuda_backend", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=4))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    views = []
    for r in range(P):  # "collective" construction, rank by rank
        fake._current_rank = r
        ws = W.SymmetricWorkspace(_FakeGroup(r, P), E, torch.device("cpu"))
        ws.simulated, ws.split_roles = True, True  # simulation launch parameters, role-by-role launches
        ws.s_cap_align = 4  # so that the second batch below must grow (re-rendezvous) the data region
        views.append(ws)
    ds = [NVLinkTokenDispatcher(E, E // P, H, P) for _ in range(P)]
    for d, v in zip(ds, views):
        d._attach_workspace(v)

    def grow_as(rank):  # ensure_data allocates: make the fake know whose allocation it is
        orig = views[rank].ensure_data

        def ensure(*args):
            fake._current_rank = rank
            return orig(*args)
        views[rank].ensure_data = ensure

    for r in range(P):
        grow_as(r)
    for seed, tokens in ((0, [3, 5]), (1, [9, 7])):  # the second batch grows the data region
        xs, ses, ws_, gs, ys, ges = random_inputs(seed, P, E, H, K, tokens, drop=0.2)
        res = {}
        disp = run_lockstep([d._dispatch_program(xs[r], ses[r], ws_[r]) for r, d in enumerate(ds)])
        res["ei"], res["tpe"] = [x[0] for x in disp], [x[1] for x in disp]
        res["ys"] = ys(res["ei"])
        res["out"] = run_lockstep([d._combine_program(res["ys"][r], disp[r][2], use_weights=True) for r, d in enumerate(ds)])
        cb = run_lockstep([d._combine_backward_program(gs[r], res["ys"][r], disp[r][2]) for r, d in enumerate(ds)])
        res["gy"], res["gw"] = [c[0] for c in cb], [c[1] for c in cb]
        res["ges"] = ges(res["ei"])
        res["gx"] = run_lockstep([d._combine_program(res["ges"][r], disp[r][2], use_weights=False) for r, d in enumerate(ds)])
        check_against_reference(xs, ses, ws_, gs, res, E // P)
        for r, v in enumerate(views):
            assert int(v.count_flags(r).abs().sum()) == 0 and v.status.tolist() == [0, 0, 0, 0]
            for ch in ("stage", "comb", "gw"):
                assert int(v.ctl(ch, r)[..., 0].abs().sum()) == 0
    assert len(fake.allocs) == 3, "meta + data + grown data"
    assert views[0].s_cap >= 9
    for v in views:
        v.close()
