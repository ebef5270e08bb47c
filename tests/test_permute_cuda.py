"""The cuda permute backend (the C++/CUDA extension built from ``csrc/``) against the torch
reference: the triton backend's whole check (``tests/test_permute_triton.py::_check``: maps and
rows bit-identical, padding rows zero, unpermute within fp32 rounding, every gradient) on the
same awkward cases, plus what only this backend has: int32 ids, rows of any byte size and
alignment (the copy picks its vector width), the chunked sort at benchmark sizes, and the counts.

GPU tests skip when the extension is not built (``MOE_DISPATCH_BUILD_CUDA=1 pip install
--no-build-isolation -e .``); ``benchmarks/gpu_session.sh`` builds it. The rest run on CPU.
"""
import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from moe_dispatch.permute import BACKENDS, reference, resolve_backend

from .test_permute_triton import CASES, _cases, _check, _inputs, _num_out_rows, _routing

cb = importlib.import_module("moe_dispatch.permute.cuda")

_BUILT = torch.cuda.is_available() and cb.is_available(torch.device("cuda"))
gpu = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.is_available() and not _BUILT,
                                           reason="the CUDA extension is not built: " + cb.why_unavailable(torch.device("cuda")) if torch.cuda.is_available() else "-")]


def _mark(f):
    for m in gpu:
        f = m(f)
    return f


@_mark
@pytest.mark.parametrize("n, k, e, h, kind, align, rows_mode", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(n, k, e, h, kind, align, rows_mode, dtype):
    _check(n, k, e, h, kind, align, rows_mode, "cuda", seed=n * 1000 + k * 10 + e, dtype=dtype, backend=cb)


@_mark
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_random_routings(case):
    _check(device="cuda", backend=cb, **case)


@_mark
@pytest.mark.parametrize("n, k, e, h, kind, align", [
    (1000, 2, 8, 256, "topk", 1), (517, 8, 64, 129, "drops", 16), (300, 4, 256, 4096, "empty", 128),
    (64, 7, 7, 7168, "topk", 1), (2048, 8, 128, 2048, "topk", 1),
])
def test_bf16_real_sizes(n, k, e, h, kind, align):
    _check(n, k, e, h, kind, align, "more", "cuda", seed=n + e, dtype=torch.bfloat16, backend=cb)


@_mark
def test_large_sorts_match_reference():
    """Benchmark-sized routings: one chunk, several chunks, and more tokens than 256 chunks of
    1024 slots hold (chunks grow); E up to 1000; H = 8 keeps it quick."""
    for n, k, e in ((16384, 8, 256), (8192, 8, 64), (16384, 2, 8), (4096, 2, 8), (65536, 8, 256), (3000, 6, 1000),
                    (200000, 2, 8), (512, 2, 8), (1, 1, 1)):
        se = _routing(n, k, e, "drops", n + e, "cuda")
        x = torch.randn(n, 8, device="cuda")
        for align, rows in ((1, None), (128, n * k), (16, n * k // 3)):
            got = cb.permute_counted(x, se, e, None, align, rows)
            want = reference.permute(x, se, e, None, align, rows)
            assert torch.equal(got[2], want[2]) and torch.equal(got[0], want[0]), (n, k, e, align, rows)
            assert torch.equal(got[3], reference.permute_counted(x, se, e, None, align, rows)[3])


@_mark
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("h", [1, 3, 8, 33, 4096])
def test_rows_of_any_size_and_alignment(dtype, h):
    """Row sizes that are and are not multiples of 16 bytes, token rows with a padded stride and a
    misaligned start (a view at element offset 1), int32 and int64 ids, probs in bf16."""
    se, g, x, p = _inputs(37, 3, 6, h, "drops", h, "cuda", dtype)
    buf = torch.randn(37, h + 5, generator=g).to("cuda", dtype)
    views = {"contiguous": x, "strided": buf[:, :h], "offset": buf[:, 1:h + 1]}
    for name, tokens in views.items():
        for ids in (se, se.int()):
            got = cb.permute(tokens, ids, 6, p.bfloat16(), 1, None)
            want = reference.permute(tokens, se, 6, p.bfloat16(), 1, None)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), name
            out = cb.unpermute(got[0], got[2], p)
            torch.testing.assert_close(out, reference.unpermute(want[0], want[2], p))
            moved = cb.permute_by_map(tokens, got[2], got[0].shape[0] + 3)
            assert torch.equal(moved, reference.permute_by_map(tokens, got[2], got[0].shape[0] + 3))


@_mark
def test_counts_match_the_sort():
    """``permute_counted``'s tokens_per_expert equals the rows of each expert in the row_id_map,
    also when num_out_rows cuts groups off."""
    for seed, (n, k, e, kind, align, mode) in enumerate([(50, 2, 8, "topk", 1, None), (80, 4, 16, "drops", 16, "fewer"),
                                                          (33, 3, 40, "empty", 1, "more"), (0, 2, 4, "topk", 1, None)]):
        se = _routing(n, k, e, kind, seed, "cuda")
        rows = _num_out_rows(se, e, align, mode)
        x = torch.randn(n, 16, device="cuda")
        permuted, _, row_id_map, counts = cb.permute_counted(x, se, e, None, align, rows)
        kept = row_id_map >= 0
        want = torch.zeros(e, dtype=torch.int64, device="cuda").scatter_add_(0, se[kept].long(), torch.ones_like(se[kept]).long())
        assert counts.dtype == torch.int64 and torch.equal(counts, want)


@_mark
def test_public_api_and_dispatcher_take_it():
    from moe_dispatch import AllToAllTokenDispatcher, permute, unpermute

    se, _, x, p = _inputs(40, 2, 8, 64, "topk", 3, "cuda")
    assert resolve_backend("auto", torch.device("cuda")) == "cuda"
    permuted, row_id_map = permute(x, se, 8, backend="cuda")
    ref_permuted, ref_map = permute(x, se, 8, backend="torch")
    assert torch.equal(permuted, ref_permuted) and torch.equal(row_id_map, ref_map)
    torch.testing.assert_close(unpermute(permuted, row_id_map, p, backend="cuda"), unpermute(ref_permuted, ref_map, p, backend="torch"))
    d, ref = AllToAllTokenDispatcher(8, 8, 64, permute_backend="cuda"), AllToAllTokenDispatcher(8, 8, 64, permute_backend="torch")
    outs = [dd.dispatch(x, se, p) for dd in (d, ref)]
    assert torch.equal(outs[0].expert_input, outs[1].expert_input)
    assert torch.equal(outs[0].tokens_per_expert, outs[1].tokens_per_expert)
    torch.testing.assert_close(d.combine(outs[0].expert_input * 2, outs[0].handle), ref.combine(outs[1].expert_input * 2, outs[1].handle))


def test_listed_and_unavailable_off_cuda_says_why():
    assert "cuda" in BACKENDS
    assert "CUDA devices only" in cb.why_unavailable(torch.device("cpu"))
    with pytest.raises(ValueError, match="permute backend 'cuda' is not available on cpu"):
        resolve_backend("cuda", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_missing_extension_says_how_to_build(monkeypatch):
    import moe_dispatch._optional as opt

    monkeypatch.setattr(opt.importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError("No module named 'moe_dispatch._C'")))
    with pytest.raises(ImportError, match="MOE_DISPATCH_BUILD_CUDA=1 pip install"):
        opt.import_cuda_extension()
