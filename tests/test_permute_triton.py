"""The triton permute backend against the torch reference.

Forward: ``row_id_map`` and ``permuted`` / ``permuted_probs`` bit-identical (fp32), padding rows
zero, ``unpermute`` within fp32 rounding. Backward: every gradient equal to the reference's
autograd gradient. Awkward sizes (N=0, N=1, K=1, K=E, E=7/16/64/256, H odd, one expert for all,
empty experts, -1 slots, align_size 1/16/128, num_out_rows above and below what is needed), the
multi-chunk / multi-tile paths of the counting sort, int64 offsets, custom-op registration and
``torch.compile``.

On CPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
on machines without CUDA): sizes are kept small. On CUDA the same tests run on the GPU, plus bf16.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_dispatch import permute as api_permute
from moe_dispatch import permute_with_probs as api_permute_with_probs
from moe_dispatch import unpermute as api_unpermute
from moe_dispatch.permute import reference
from moe_dispatch.permute import triton as tb

_CPU_OK = tb.is_available(torch.device("cpu"))
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _CPU_OK, reason=tb.why_unavailable(torch.device("cpu")) or "-")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
KINDS = ("topk", "drops", "empty", "one_expert", "random")


def _routing(n, k, e, kind, seed, device):
    """``selected_experts [n, k]`` int64 on ``device``.

    topk: distinct experts per token (needs k <= e); drops: topk with ~30 % of slots -1;
    empty: topk among the first half of the experts only (the rest get no slot); one_expert:
    every slot picks the same expert; random: ids uniform in [-1, e), repeats within a token.
    """
    g = torch.Generator().manual_seed(seed)
    if kind in ("topk", "drops", "empty"):
        scores = torch.rand(n, e, generator=g)
        if kind == "empty":
            scores[:, (e + 1) // 2:] -= 2.0
        se = scores.topk(min(k, e), dim=-1).indices
        if kind == "drops":
            se = se.masked_fill(torch.rand(n, k, generator=g) < 0.3, -1)
    elif kind == "one_expert":
        se = torch.full((n, k), int(torch.randint(e, (1,), generator=g)), dtype=torch.long)
    else:
        se = torch.randint(-1, e, (n, k), generator=g)
    return se.to(device)


def _inputs(n, k, e, h, kind, seed, device, dtype=torch.float32):
    """``(selected_experts, generator, x [n, h], probs [n, k])``: :func:`_routing` from ``seed``, the
    tensors from the generator seeded ``seed + 1`` (returned, for more tensors from the same stream)."""
    se = _routing(n, k, e, kind, seed, device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, h, generator=g).to(device, dtype)
    probs = torch.rand(n, k, generator=g).to(device)
    return se, g, x, probs


def _num_out_rows(se, e, align, mode):
    needed = reference.make_row_id_map(se.cpu(), e, align, None)[1]
    return {None: None, "exact": needed, "more": needed + 37, "fewer": needed // 2, "zero": 0}[mode]


def _used_rows(row_id_map, num_rows):
    used = torch.zeros(num_rows, dtype=torch.bool, device=row_id_map.device)
    used[row_id_map[row_id_map >= 0]] = True
    return used


def _check(n, k, e, h, kind, align, rows_mode, device, seed=0, dtype=torch.float32, backend=tb):
    """Forward and backward of both ops of ``backend`` (a backend module, default triton) against
    the reference, with random inputs and grads."""
    se, g, x, probs = _inputs(n, k, e, h, kind, seed, device, dtype)
    w = torch.rand(n, k, generator=g).to(device)
    num_out_rows = _num_out_rows(se, e, align, rows_mode)
    # fp32: the reference in fp32, torch.testing's default fp32 tolerances. Other dtypes: the
    # reference in fp64 on the same (upcast, exact) values -- a reference that also rounds to
    # bf16 accumulates its own error (index_add over K rows) -- and this backend within a few
    # bf16 ulps of it (rel. norm error <= 1e-2 too, as in the device entry's METHOD.md).
    exact = dtype == torch.float32
    ref_dtype = torch.float32 if exact else torch.float64
    tol = {} if exact else dict(rtol=2e-2, atol=5e-2)

    def close(got, want):
        if exact:
            torch.testing.assert_close(got, want)
            return
        torch.testing.assert_close(got.to(ref_dtype), want, **tol)
        if want.numel():
            assert (got.to(ref_dtype) - want).norm() <= 1e-2 * want.norm() + 1e-6

    leaves, outs = {}, {}
    for name, mod in (("ref", reference), ("tri", backend)):
        cast = ref_dtype if name == "ref" else None
        xl, pl, wl = (t.to(cast or t.dtype).clone().requires_grad_() for t in (x, probs, w))
        permuted, permuted_probs, row_id_map = mod.permute(xl, se, e, pl, align, num_out_rows)
        y = torch.sin(permuted) * 2  # a row-wise "expert" that changes the rows
        z = permuted + 0  # z.grad / y.grad: the gradients of the two unpermutes alone
        y.retain_grad()
        z.retain_grad()
        out = mod.unpermute(y, row_id_map, wl)
        out_plain = mod.unpermute(z, row_id_map, None)
        leaves[name] = (xl, pl, wl, y, z)
        outs[name] = (permuted, permuted_probs, row_id_map, out, out_plain)

    p_ref, pp_ref, m_ref, out_ref, plain_ref = outs["ref"]
    p_tri, pp_tri, m_tri, out_tri, plain_tri = outs["tri"]
    assert m_tri.dtype == torch.int64 and torch.equal(m_tri, m_ref)
    assert p_tri.dtype == dtype and p_tri.shape == p_ref.shape
    assert torch.equal(p_tri.to(ref_dtype), p_ref)  # a copy: bit-identical
    assert pp_tri.dtype == probs.dtype and torch.equal(pp_tri.to(ref_dtype), pp_ref)
    unused = ~_used_rows(m_tri, p_tri.shape[0])
    assert (p_tri[unused] == 0).all() and (pp_tri[unused] == 0).all()
    close(out_tri, out_ref)
    close(plain_tri, plain_ref)

    # one backward through everything: permute -> expert -> unpermute, plus the direct outputs
    # (the same output gradients for both, rounded to this backend's dtypes)
    gg = torch.Generator().manual_seed(seed + 2)
    grads = [torch.randn(t.shape, generator=gg).to(device, t.dtype) for t in (p_tri, pp_tri, out_tri, plain_tri)]
    for name in ("ref", "tri"):
        permuted, permuted_probs, _, out, out_plain = outs[name]
        loss = sum((t * gr.to(t.dtype)).sum() for t, gr in zip((permuted, permuted_probs, out, out_plain), grads))
        loss.backward()
    for a, b in zip(leaves["tri"], leaves["ref"]):
        close(a.grad, b.grad)
    y_tri, z_tri = leaves["tri"][3:]
    assert (y_tri.grad[unused] == 0).all() and (z_tri.grad[unused] == 0).all()


CASES = [
    # n, k, e, h, kind, align, num_out_rows
    (0, 2, 4, 8, "topk", 1, None),
    (0, 2, 4, 8, "topk", 16, "more"),
    (1, 1, 1, 5, "topk", 1, None),
    (1, 3, 7, 129, "topk", 16, None),
    (13, 1, 7, 33, "topk", 1, None),
    (9, 7, 7, 16, "topk", 1, "exact"),
    (17, 16, 16, 8, "topk", 128, None),
    (24, 2, 16, 129, "drops", 1, "more"),
    (20, 2, 7, 10, "random", 16, "fewer"),
    (24, 4, 64, 24, "empty", 16, None),
    (30, 3, 64, 7, "one_expert", 1, "fewer"),
    (31, 8, 64, 5, "drops", 128, "more"),
    (40, 2, 8, 12, "one_expert", 128, "fewer"),
    (6, 64, 64, 3, "topk", 16, None),
    (5, 3, 256, 4, "empty", 1, "more"),
    (7, 2, 5, 6, "drops", 16, "zero"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, k, e, h, kind, align, rows_mode", CASES)
def test_matches_reference(n, k, e, h, kind, align, rows_mode, device):
    _check(n, k, e, h, kind, align, rows_mode, device, seed=n * 1000 + k * 10 + e)


@st.composite
def _cases(draw):
    e = draw(st.integers(1, 70))
    k = draw(st.integers(1, min(e, 4)))
    return dict(
        n=draw(st.integers(0, 20)), k=k, e=e, h=draw(st.integers(1, 33)),
        kind=draw(st.sampled_from(KINDS)), align=draw(st.sampled_from([1, 2, 16, 128])),
        rows_mode=draw(st.sampled_from([None, "exact", "more", "fewer"])), seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_random_routings(case, device):
    _check(device=device, **case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("e, chunk_tokens, scan_tile", [(7, 4, 4), (7, None, None), (100, 2, 2), (300, 8, 1), (64, 1, None)])
def test_counting_sort_many_chunks(e, chunk_tokens, scan_tile, device):
    """The sort at sizes that need many chunks (and several scan tiles), H=1 to keep the copy cheap."""
    from moe_dispatch.kernels.permute import permute

    for seed, (n, k, kind, align, rows_mode) in enumerate([(100, 2, "drops", 1, None), (50, 4, "random", 16, "fewer")]):
        se = _routing(n, k, e, kind, seed, device)
        num_out_rows = _num_out_rows(se, e, align, rows_mode)
        x = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed)).to(device)
        permuted, _, row_id_map = permute(x, se, e, None, align, num_out_rows, chunk_tokens=chunk_tokens, scan_tile=scan_tile)
        ref_permuted, _, ref_map = reference.permute(x, se, e, None, align, num_out_rows)
        assert torch.equal(row_id_map, ref_map) and torch.equal(permuted, ref_permuted)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, k, e", [(300, 1, 32), (100, 2, 9), (0, 2, 5), (1, 8, 8), (8, 8, 256)])
def test_fused_count_scan_loops_over_tiles(n, k, e, device):
    """The one-launch count + scan (default for small inputs) with more chunks than one step of
    its loop takes (300 tokens, K=1, E=32: 5 chunks, 4 per step), equal to the three-kernel path
    (forced by ``chunk_tokens``) and to the reference."""
    from moe_dispatch.kernels import permute as kp

    assert kp._permute_plan(n, k, e, 1, 4, 1, None, False, None, None)["fused"]
    for seed, (kind, align, rows_mode) in enumerate([("random", 1, None), ("drops", 16, "more"), ("one_expert", 1, "fewer")]):
        se = _routing(n, k, e, kind, seed, device) if kind != "one_expert" or n else torch.zeros(0, k, dtype=torch.long, device=device)
        num_out_rows = _num_out_rows(se, e, align, rows_mode)
        x = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed)).to(device)
        fused = kp.permute(x, se, e, None, align, num_out_rows)
        three = kp.permute(x, se, e, None, align, num_out_rows, chunk_tokens=kp._permute_plan(
            n, k, e, 1, 4, 1, None, False, None, None)["permute"]["T"])
        ref_permuted, _, ref_map = reference.permute(x, se, e, None, align, num_out_rows)
        for permuted, _, row_id_map in (fused, three):
            assert torch.equal(row_id_map, ref_map) and torch.equal(permuted, ref_permuted)


@pytest.mark.parametrize("device", DEVICES)
def test_int64_offsets_large_row_stride(device):
    """Row offsets past 2**31 elements: views with a row stride of ~2**30 over a 4 GiB buffer of
    which only the three used rows are touched."""
    h, stride = 64, 2**30 + 64
    buf = torch.empty(2 * stride + h, dtype=torch.float16, device=device)
    g = torch.Generator().manual_seed(5)
    view = buf.as_strided((3, h), (stride, 1))
    view.copy_(torch.randn(3, h, generator=g).half())
    se = torch.tensor([[1, 0], [0, -1], [1, 0]], device=device)
    w = torch.rand(3, 2, generator=g).to(device)
    permuted, _, row_id_map = tb.permute(view, se, 2, None, 1, None)
    ref_permuted, _, ref_map = reference.permute(view, se, 2, None, 1, None)
    assert torch.equal(row_id_map, ref_map) and torch.equal(permuted, ref_permuted)
    # unpermute reading rows at the same large offsets; its backward writes a contiguous tensor
    rows = buf.as_strided((3, h), (stride, 1))
    rid = torch.tensor([[2, 0], [1, -1], [0, 2]], device=device)
    torch.testing.assert_close(tb.unpermute(rows, rid, w), reference.unpermute(rows, rid, w))
    del buf, view, rows


@pytest.mark.parametrize("device", DEVICES)
def test_public_api_backend_triton(device):
    se, _, x, p = _inputs(21, 3, 9, 17, "drops", 11, device)
    for align, rows in ((1, None), (16, 200)):
        ref = api_permute_with_probs(x, p, se, 9, backend="torch", align_size=align, num_out_rows=rows)
        got = api_permute_with_probs(x, p, se, 9, backend="triton", align_size=align, num_out_rows=rows)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        permuted, row_id_map = api_permute(x, se, 9, backend="triton", align_size=align, num_out_rows=rows)
        assert torch.equal(permuted, ref[0]) and torch.equal(row_id_map, ref[2])
        torch.testing.assert_close(
            api_unpermute(permuted, row_id_map, p, backend="triton"), api_unpermute(ref[0], ref[2], p, backend="torch")
        )


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_opcheck(device):
    """Schemas, fake (meta) kernels and autograd registration of the custom ops."""
    from torch.library import opcheck

    se, g, x, p = _inputs(6, 2, 5, 8, "drops", 3, device)
    x, p = x.requires_grad_(), p.requires_grad_()
    ops = torch.ops.moe_dispatch
    opcheck(ops.triton_permute.default, (x, se, p, 5, 4, 30))
    quick = ("test_schema", "test_faketensor")
    opcheck(ops.triton_permute.default, (x, se, None, 5, 1, 40), test_utils=quick)
    row_id_map = ops.triton_permute(x, se, p, 5, 4, 30)[2]
    permuted = torch.randn(30, 8, generator=g).to(device).requires_grad_()
    opcheck(ops.triton_unpermute_rows.default, (permuted, row_id_map, p))
    opcheck(ops.triton_unpermute_rows_backward.default, (x.detach(), permuted.detach(), row_id_map, p.detach(), True), test_utils=quick)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    se, _, x, w = _inputs(10, 2, 6, 16, "topk", 8, device)

    def f(x, w):
        permuted, _, row_id_map = tb.permute(x, se, 6, None, 16, 128)
        return permuted, tb.unpermute(permuted * 3, row_id_map, w)

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    want = f(x, w)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("n, k, e, h, kind, align", [
    (1000, 2, 8, 256, "topk", 1), (517, 8, 64, 129, "drops", 16), (300, 4, 256, 4096, "empty", 128), (64, 7, 7, 7168, "topk", 1),
])
def test_bf16_cuda(n, k, e, h, kind, align):
    _check(n, k, e, h, kind, align, "more", "cuda", seed=n + e, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_cuda_large_sort_matches_reference():
    """Benchmark-sized routings (up to N*K = 65536*8, E = 256): exact maps, H = 8 to keep it quick."""
    for n, k, e in ((16384, 8, 256), (8192, 8, 64), (16384, 2, 8), (4096, 2, 8), (65536, 8, 256), (3000, 6, 1000)):
        se = _routing(n, k, e, "drops", n + e, "cuda")
        x = torch.randn(n, 8, device="cuda")
        for align, rows in ((1, None), (128, n * k)):
            got = tb.permute(x, se, e, None, align, rows)
            want = reference.permute(x, se, e, None, align, rows)
            assert torch.equal(got[2], want[2]) and torch.equal(got[0], want[0])


def test_availability_reasons(monkeypatch):
    assert not tb.is_available(torch.device("meta"))
    assert "CUDA" in tb.why_unavailable(torch.device("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tb.is_available(torch.device("cpu"))
    assert "TRITON_INTERPRET=1" in tb.why_unavailable(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.is_available(torch.device("cpu")) == (tb.why_unavailable(torch.device("cpu")) == "")
    if torch.cuda.is_available():
        assert tb.is_available(torch.device("cuda"))


def test_importing_the_backend_does_not_import_triton():
    """The backend module registers its custom ops without importing triton or the kernels."""
    import subprocess
    import sys

    code = (
        "import sys, torch, moe_dispatch; before = 'triton' in sys.modules; "
        "import moe_dispatch.permute.triton; "
        "assert 'moe_dispatch.kernels.permute' not in sys.modules, 'kernels imported'; "
        "assert before or 'triton' not in sys.modules, 'triton imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
