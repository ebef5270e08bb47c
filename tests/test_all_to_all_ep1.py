"""AllToAllTokenDispatcher at EP=1 without a group, dropless (issue 16's fast path): dispatch is
one ``permute_counted`` on ``N * K`` rows, combine one ``unpermute``.

Against the path it replaced (exact rows: the backend's ``permute`` on ``sum(counts)`` rows, the
same ``unpermute``), bitwise in fp32 -- expert rows, ``tokens_per_expert``, combine output and the
gradients of ``hidden_states``, ``routing_weights`` and the expert weights -- for the torch and
triton backends (triton under the interpreter on CPU: small sizes), with -1 slots (their zero
padding rows at the end get zero gradient), zero tokens, every slot to one expert, empty experts,
top-k = E. Also: the ops it issues (CPU, ATen ops recorded: none that syncs on CUDA; triton: the
permute kernels and allocations only), ``permute_counted`` of every backend against the counts
of the reference, and ids outside ``[0, E)`` dropped by every backend function. The GPU checks
(no host sync under ``set_sync_debug_mode("error")``, CUDA-graph capture) are in
``tests/test_fastpath_gpu.py``.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_dispatch import AllToAllTokenDispatcher
from moe_dispatch.permute import backend_module, reference
from moe_dispatch.permute import triton as triton_backend

_TRITON_CPU = triton_backend.is_available(torch.device("cpu"))
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not _TRITON_CPU, reason="triton backend unavailable on CPU"))]
KINDS = ("random", "with_drops", "one_expert", "empty_experts", "topk_all", "all_dropped")


def _routing(kind: str, n: int, k: int, e: int, g: torch.Generator) -> torch.Tensor:
    """int64 ``[n, k]`` expert ids in ``[-1, e)``; ``topk_all`` needs ``k == e``."""
    if kind == "random":  # repeats within a token allowed, some -1
        return torch.randint(-1, e, (n, k), generator=g)
    if kind == "one_expert":
        return torch.full((n, k), int(torch.randint(e, (1,), generator=g)), dtype=torch.long)
    if kind == "all_dropped":
        return torch.full((n, k), -1, dtype=torch.long)
    scores = torch.rand(n, e, generator=g)
    if kind == "empty_experts":
        scores[:, (e + 1) // 2:] -= 2.0
    se = scores.topk(min(k, e), -1).indices
    if kind == "with_drops":
        se = se.masked_fill(torch.rand(n, k, generator=g) < 0.3, -1)
    return se


def _experts(expert_input, tokens_per_expert, W):
    """Row r of expert e -> ``row @ W[e]``; padding rows (past ``sum(tokens_per_expert)``) ->
    ``3 * row + 7``: non-zero, and a path for a gradient that combine must not send."""
    counts = tokens_per_expert.tolist()
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(expert_input[start:start + c] @ W[e])
        start += c
    outs.append(expert_input[start:] * 3 + 7)
    return torch.cat(outs)


def _step(dispatch, combine, x, se, w, W, g_out):
    """dispatch -> experts -> combine -> backward; returns what is compared."""
    x, w, W = (t.clone().requires_grad_() for t in (x, w, W))
    expert_input, tokens_per_expert, handle = dispatch(x, se, w)
    expert_input.retain_grad()
    y = combine(_experts(expert_input, tokens_per_expert, W), handle)
    y.backward(g_out)
    return dict(expert_input=expert_input.detach(), tokens_per_expert=tokens_per_expert, y=y.detach(),
                grad_x=x.grad, grad_w=w.grad, grad_W=W.grad, grad_expert_input=expert_input.grad)


def _old_path(backend):
    """What dropless dispatch did at EP=1 before: the backend's permute on exactly the kept
    rows (the count exchange, token exchange and regroup are identities on one rank)."""
    mod = backend_module(backend)

    def run(x, se, w, E):
        counts = reference.count_slots(se, E)
        rows = int(counts.sum())
        permuted, _, row_id_map = mod.permute(x, se, E, None, 1, rows)
        return permuted, counts, (row_id_map, w)

    def combine(rows, handle):
        row_id_map, w = handle
        return mod.unpermute(rows, row_id_map, w)
    return run, combine


def _check_case(backend, kind, n, k, e, h, seed):
    g = torch.Generator().manual_seed(seed)
    se = _routing(kind, n, k, e, g)
    x, w = torch.randn(n, h, generator=g), torch.rand(n, k, generator=g) + 0.1
    W, g_out = torch.randn(e, h, h, generator=g), torch.randn(n, h, generator=g)
    d = AllToAllTokenDispatcher(e, e, h, permute_backend=backend)

    def fast_dispatch(x, se, w):
        out = d.dispatch(x, se, w)
        return out.expert_input, out.tokens_per_expert, out.handle

    run, old_combine = _old_path(backend)
    fast = _step(fast_dispatch, d.combine, x, se, w, W, g_out)
    old = _step(lambda x, se, w: run(x, se, w, e), old_combine, x, se, w, W, g_out)

    R = int(old["tokens_per_expert"].sum())
    assert fast["expert_input"].shape == (n * k, h)
    assert fast["tokens_per_expert"].dtype == torch.int64 and fast["tokens_per_expert"].shape == (e,)
    assert torch.equal(fast["tokens_per_expert"], old["tokens_per_expert"])
    assert torch.equal(fast["expert_input"][:R], old["expert_input"])
    assert not fast["expert_input"][R:].any(), "padding rows must be zero"
    assert not fast["grad_expert_input"][R:].any(), "padding rows must get no gradient"
    assert torch.equal(fast["grad_expert_input"][:R], old["grad_expert_input"])
    for name in ("y", "grad_x", "grad_w", "grad_W"):
        assert torch.equal(fast[name], old[name]), name


@st.composite
def _cases(draw, max_tokens):
    kind = draw(st.sampled_from(KINDS))
    e = draw(st.integers(1, 9))
    k = e if kind == "topk_all" else draw(st.integers(1, min(e, 4)) if kind in ("with_drops", "empty_experts")
                                          else st.integers(1, 4))
    return dict(kind=kind, n=draw(st.sampled_from([0, 1, 2, max_tokens // 2, max_tokens])), k=k, e=e,
                h=draw(st.integers(1, 6)), seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=40, deadline=None)
@given(_cases(max_tokens=20))
def test_fast_path_equals_old_path_torch(case):
    _check_case("torch", **case)


@pytest.mark.skipif(not _TRITON_CPU, reason="triton backend unavailable on CPU")
@settings(max_examples=25, deadline=None)
@given(_cases(max_tokens=9))
def test_fast_path_equals_old_path_triton(case):
    _check_case("triton", **case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, n, k, e", [("with_drops", 13, 2, 5), ("one_expert", 7, 3, 4), ("random", 0, 2, 3),
                                           ("empty_experts", 9, 2, 6), ("topk_all", 5, 4, 4), ("all_dropped", 4, 2, 3)])
def test_fast_path_awkward_routings(backend, kind, n, k, e):
    _check_case(backend, kind, n, k, e, 8, n * 31 + k)


def test_handle_and_combine_checks():
    d = AllToAllTokenDispatcher(4, 4, 8)
    se = torch.tensor([[0, -1], [3, 3], [-1, -1]])
    out = d.dispatch(torch.randn(3, 8), se, torch.rand(3, 2))
    assert out.expert_input.shape == (6, 8) and out.tokens_per_expert.tolist() == [1, 0, 0, 2]
    assert out.handle.num_received_rows == 6 and out.handle.group is None and out.handle.rank_major_index is None
    with pytest.raises(ValueError, match=re.escape("expert_output must be [R=6, H=8]")):
        d.combine(torch.randn(3, 8), out.handle)  # sum(tokens_per_expert) rows: R is N * K here


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [4, 100, -2, -7])
def test_bad_ids_raise_on_cpu(backend, bad):
    d = AllToAllTokenDispatcher(4, 4, 8, permute_backend=backend)
    with pytest.raises(ValueError, match=re.escape("selected_experts must be in [-1, 4)")):
        d.dispatch(torch.randn(2, 8), torch.tensor([[0, bad], [1, 2]]), torch.rand(2, 2))


# --- what the fast path issues -------------------------------------------------------------------
_SYNCING_OPS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::bincount",
                "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::item"}


class _RecordOps:
    """ATen ops run inside ``with``, by name (boolean-mask indexing marked: it syncs on CUDA)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name
                if name in ("aten::index", "aten::index_put_", "aten::index_put") and any(
                        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])):
                    name += "(bool mask)"
                seen.append(name)
                return func(*args, **(kwargs or {}))
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_uses_no_op_that_syncs_on_cuda(backend, monkeypatch):
    """Dispatch, combine and backward on CPU contain no ATen op that makes CUDA wait for the host
    (the GPU test runs them under set_sync_debug_mode("error")). The CPU-only id check (a host
    read, free on CPU, skipped on CUDA) is switched off here."""
    from moe_dispatch.dispatchers import all_to_all

    monkeypatch.setattr(all_to_all, "check_expert_ids_range", lambda *a: None)
    g = torch.Generator().manual_seed(0)
    se = _routing("with_drops", 10, 2, 4, g)
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.rand(10, 2, requires_grad=True)
    d = AllToAllTokenDispatcher(4, 4, 8, permute_backend=backend)
    with _RecordOps() as rec:
        out = d.dispatch(x, se, w)
        d.combine(out.expert_input * 2, out.handle).sum().backward()
    bad = {n for n in rec.seen if n in _SYNCING_OPS or "bool mask" in n}
    assert not bad, bad


@pytest.mark.skipif(not _TRITON_CPU, reason="triton backend unavailable on CPU")
def test_fast_path_triton_issues_the_permute_kernels_only(monkeypatch):
    """With the triton backend, dispatch is the permute's launches (count+scan, permute) and
    allocations, combine the unpermute's launch and its output: no other torch op at all
    (kernels stubbed: only what is issued is looked at)."""
    from moe_dispatch.dispatchers import all_to_all
    from moe_dispatch.kernels import permute as kp

    launched = []
    monkeypatch.setattr(kp, "launch", lambda kernel, *a, **kw: launched.append(kernel.__name__ if hasattr(
        kernel, "__name__") else kernel.fn.__name__))
    monkeypatch.setattr(all_to_all, "check_expert_ids_range", lambda *a: None)  # CPU only (see above)
    d = AllToAllTokenDispatcher(8, 8, 64, permute_backend="triton")
    x, w = torch.randn(128, 64), torch.rand(128, 2)
    se = torch.rand(128, 8).topk(2, -1).indices
    d.dispatch(x, se, w)  # backend resolved, plans cached
    launched.clear()
    with _RecordOps() as rec:
        out = d.dispatch(x, se, w)
    assert launched == ["_expert_count_scan_kernel", "_permute_kernel"]
    assert set(rec.seen) == {"aten::empty"} and len(rec.seen) == 4, rec.seen  # row_id_map, work, counts, rows
    launched.clear()
    with _RecordOps() as rec:
        d.combine(out.expert_input, out.handle)
    assert launched == ["_unpermute_kernel"] and rec.seen == ["aten::empty"], rec.seen


# --- permute_counted of every backend -----------------------------------------------------------
def _expected_counts(se, row_id_map, e):
    """Rows of each expert that are filled, read off the row map: slots of e that got a row."""
    kept = row_id_map >= 0
    return torch.stack([((se == i) & kept).sum() for i in range(e)]) if e else torch.zeros(0, dtype=torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, n, k, e", [("with_drops", 20, 2, 5), ("random", 17, 3, 7), ("one_expert", 9, 2, 4),
                                           ("empty_experts", 12, 3, 16), ("random", 0, 2, 3), ("topk_all", 6, 4, 4)])
@pytest.mark.parametrize("align, rows_mode", [(1, None), (1, "nk"), (1, "fewer"), (16, None), (16, "bound"),
                                              (16, "fewer"), (1, "zero")])
def test_permute_counted_counts_and_outputs(backend, kind, n, k, e, align, rows_mode):
    g = torch.Generator().manual_seed(n + k + e)
    se = _routing(kind, n, k, e, g)
    x, probs = torch.randn(n, 5, generator=g), torch.rand(n, k, generator=g)
    needed = reference.make_row_id_map(se, e, align, None)[1]
    rows = {None: None, "nk": n * k, "bound": n * k + e * (align - 1), "fewer": needed // 2, "zero": 0}[rows_mode]
    mod = backend_module(backend)
    permuted, permuted_probs, row_id_map, counts = mod.permute_counted(x, se, e, probs, align, rows)
    ref = reference.permute(x, se, e, probs, align, rows)
    for got, want in zip((permuted, permuted_probs, row_id_map), ref):
        assert torch.equal(got, want)
    assert counts.dtype == torch.int64 and counts.device == x.device
    assert torch.equal(counts, _expected_counts(se, row_id_map, e))
    assert torch.equal(counts, reference.permute_counted(x, se, e, probs, align, rows)[3])
    if rows is None or rows >= n * k + e * (align - 1):
        assert torch.equal(counts, reference.count_slots(se, e))


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_counted_gradients_equal_permute(backend):
    g = torch.Generator().manual_seed(5)
    se = _routing("with_drops", 11, 3, 5, g)
    x0, p0 = torch.randn(11, 4, generator=g), torch.rand(11, 3, generator=g)
    mod = backend_module(backend)
    grads = []
    for fn in (mod.permute, mod.permute_counted):
        x, p = x0.clone().requires_grad_(), p0.clone().requires_grad_()
        out = fn(x, se, 5, p, 4, 40)
        gp, gpp = torch.cos(torch.arange(out[0].numel(), dtype=x.dtype)).view_as(out[0]), torch.sin(torch.arange(40.0))
        (out[0] * gp).sum().add((out[1] * gpp).sum()).backward()
        assert not out[2].requires_grad and (len(out) == 3 or not out[3].requires_grad)
        grads.append((x.grad, p.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_drop_ids_outside_the_range(backend):
    """Backend functions (no checks) treat any id outside [0, E) like -1 -- never an out-of-range
    index, never an int64 id wrapped into range -- so a dispatcher may skip the (syncing) check."""
    E = 4
    se_bad = torch.tensor([[0, 4], [2**32 + 1, -1], [3, -9], [1, 2**40]])
    se_ok = torch.where((se_bad >= 0) & (se_bad < E), se_bad, -1)
    x = torch.randn(4, 3)
    mod = backend_module(backend)
    got, want = mod.permute_counted(x, se_bad, E, None, 1, 8), mod.permute_counted(x, se_ok, E, None, 1, 8)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    assert got[3].tolist() == [1, 1, 0, 1]
    assert torch.equal(reference.count_slots(se_bad, E), got[3])
