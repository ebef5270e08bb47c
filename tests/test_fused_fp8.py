"""FP8 forward of the fused experts (``fp8="tensor" | "block"``), against references written here.

CPU: Triton's interpreter runs the e4m3 dots (``tl.dot`` on float8e4nv tiles: exact products,
fp32 sums), so the real kernels are tested here, not an emulation. It mis-rounds the fp32 -> e4m3
cast where rounding carries into the next binade; the quantize kernels round to e4m3's grid
with integer ops first (``moe_dispatch.kernels.fp8._e4m3_grid``) and the tests below check the
bits against torch's own cast.

What each test proves:

- the quantizers (both recipes, activations with padding rows, weights with sizes that are no
  multiple of 128) give the bits of a plain-torch reference (float64 log2 for the scale, torch's
  round-to-nearest-even cast), and the scales are powers of two with amax / s in (224, 448];
- the fp8 GEMMs compute the reference's dequantized fp32 products: the kept g | u (no fp8
  rounding after the quantized inputs, so any mismatch is a kernel bug) and the output, which also
  goes through the quantization of h, for rows, gather / scatter, several activations;
- against the unquantized fp32 result the error is that of four e4m3 operands (justified bound);
  blockwise scales keep tokens next to an outlier token (per-tensor scaling pushes them into e4m3's
  subnormals) and per-tensor does not;
- the backward is the high-precision backward at the fp8 forward's g | u (fp32, tight);
- pre-quantized weights give the same bits; bad arguments raise; the op passes opcheck.

GPU (marked): the quantizers' bits against torch's CUDA cast; the same GEMM kernels compiled
(autotuned tiles, tensor descriptors) at a large shape, g | u against the dequantized reference,
the output and grads against the bf16 fused experts (loose).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_dispatch.experts import ACTIVATIONS, SwiGLUExperts
from moe_dispatch.experts_fused import (FP8ExpertWeights, fused_moe_experts, fused_swiglu_experts,
                                        quantize_expert_weights, routing_rows)

E4M3 = torch.float8_e4m3fn
TIGHT = 1e-5  # fp32 sums of the same exact products in another order
# e4m3 keeps 3 mantissa bits: round-to-nearest error <= 2**-4 relative, ~2.6% rms on Gaussian
# data (measured on these inputs). x, w_gate_up, h and w_down are each quantized once: ~5-7% in
# quadrature through the two GEMMs; twice that as the bound.
FP8_VS_EXACT = 0.12


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


# --- reference quantization (plain torch, independent of the kernels' bit tricks) -----------------
def ref_scale(amax: torch.Tensor) -> torch.Tensor:
    """2**k, the smallest power of two with amax / 2**k <= 448 (1 where amax is 0)."""
    k = torch.ceil(torch.log2(amax.double().clamp_min(1e-300) / 448.0)).clamp(-126, 126)
    return torch.where(amax > 0, torch.exp2(k), torch.ones_like(k)).float()


def ref_cast(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (v.float() / s).to(E4M3)


def ref_quant_rows(x: torch.Tensor, recipe: str, limit: int | None = None):
    x = x.float().clone()
    if limit is not None:
        x[limit:] = 0
    M, K = x.shape
    if recipe == "tensor":
        s = ref_scale(x.abs().amax().reshape(1))
        return ref_cast(x, s), s
    KB = math.ceil(K / 128)
    xp = F.pad(x, (0, KB * 128 - K)).view(M, KB, 128)
    s = ref_scale(xp.abs().amax(-1))
    return ref_cast(xp, s[..., None]).view(M, KB * 128)[:, :K], s


def ref_quant_weight(w: torch.Tensor, recipe: str):
    w = w.float()
    L, O, K = w.shape
    if recipe == "tensor":
        s = ref_scale(w.abs().amax((1, 2)))
        return ref_cast(w, s[:, None, None]), s
    OB, KB = math.ceil(O / 128), math.ceil(K / 128)
    wp = F.pad(w, (0, KB * 128 - K, 0, OB * 128 - O)).view(L, OB, 128, KB, 128)
    s = ref_scale(wp.abs().amax((2, 4)))
    q = ref_cast(wp, s[:, :, None, :, None]).view(L, OB * 128, KB * 128)[:, :O, :K]
    return q, s


def dequant_rows(q, s, recipe):
    if recipe == "tensor":
        return q.float() * s
    return q.float() * s.repeat_interleave(128, 1)[:, :q.shape[1]]


def dequant_weight(q, s, recipe):
    if recipe == "tensor":
        return q.float() * s[:, None, None]
    return q.float() * s.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :q.shape[1], :q.shape[2]]


def ref_fp8_rows(x, counts, wgu, wd, recipe, act=F.silu, token_rows=None):
    """The fp8 forward in fp32: (gu [R, 2I], out [R, H]) of rows (``token_rows``: rows of the
    quantized tokens x, the gather path) quantized like the kernels."""
    xq, xs = ref_quant_rows(x, recipe, None if token_rows is not None else sum(counts))
    xd = dequant_rows(xq, xs, recipe)
    if token_rows is not None:
        xd = xd[token_rows]
    wgud = dequant_weight(*ref_quant_weight(wgu, recipe), recipe)
    wdd = dequant_weight(*ref_quant_weight(wd, recipe), recipe)
    R, I, H = xd.shape[0], wd.shape[2], wd.shape[1]
    gu, start = torch.zeros(R, 2 * I), 0
    for e, c in enumerate(counts):
        gu[start:start + c] = xd[start:start + c] @ wgud[e].T
        start += c
    g, u = gu.chunk(2, dim=-1)
    h = act(g) * u
    h[start:] = 0
    hd = dequant_rows(*ref_quant_rows(h, recipe, start), recipe)
    out, start = torch.zeros(R, H), 0
    for e, c in enumerate(counts):
        out[start:start + c] = hd[start:start + c] @ wdd[e].T
        start += c
    return gu, out


def _weights(L, H, I, gen, scale=0.1):
    return ((torch.randn(L, 2 * I, H, generator=gen) * scale).requires_grad_(),
            (torch.randn(L, H, I, generator=gen) * scale).requires_grad_())


def _capture_gu(fn, R, I):
    """``fn()`` and the g | u tensor its forward kept for the backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    (gu,) = [t for t in saved if tuple(t.shape) == (R, 2 * I)]
    return out, gu


# --- quantizers --------------------------------------------------------------------------------
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["tensor", "block"])
def test_quantize_rows_bits_match_reference(recipe, device):
    """(cuda: the compiled kernels' rounding and bit tricks against torch's CUDA cast.)"""
    from moe_dispatch.kernels import fp8

    gen = torch.Generator().manual_seed(0)
    M, K, limit = 37, 300, 30
    x = torch.randn(M, K, generator=gen) * torch.rand(M, 1, generator=gen) ** 4 * 10
    x[0, :16] = torch.tensor([0.0, -0.0, 1e-30, -1e-9, 447.0, -448.0, 2**-10, 3 * 2**-10, 2**-6, 2**-6 - 2**-12,
                              31.53, 31.99, 15.5, 5 * 2**-11, 7 * 2**-11, -0.001])
    x[limit:] = float("nan")  # padding rows: garbage never reaches a scale
    q, s = fp8.quantize_rows(x.to(device), recipe, torch.tensor([10, 0, 20], device=device))
    q, s = q.cpu(), s.cpu()
    rq, rs = ref_quant_rows(torch.where(torch.arange(M)[:, None] < limit, x, 0.0), recipe, limit)
    assert q.dtype == E4M3 and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(s, rs)
    assert torch.equal(q[limit:].float(), torch.zeros(M - limit, K))
    mant, _ = torch.frexp(s)
    assert torch.all(mant == 0.5)  # powers of two
    if recipe == "block":
        amax = F.pad(x[:limit].abs(), (0, 84)).view(limit, 3, 128).amax(-1)
        ratio = amax / s[:limit]
        assert torch.all((ratio > 224) & (ratio <= 448) | (amax == 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["tensor", "block"])
def test_quantize_weight_bits_match_reference(recipe, device):
    from moe_dispatch.kernels import fp8

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 200, 300, generator=gen) * 0.05
    w[1, 130:, 140:] *= 1000  # one 128 x 128 block (and its neighbours) much larger
    w[2] = 0  # an all-zero expert: scale 1
    q, s = (t.cpu() for t in fp8.quantize_weight(w.to(device), recipe))
    rq, rs = ref_quant_weight(w, recipe)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    assert torch.all(s[2] == 1)


# --- forward against the reference that quantizes the same way --------------------------------
CASES = [  # (counts, padding rows, H, I): K not a multiple of 128, experts with no rows
    ([20, 0, 37], 5, 160, 144),
    ([9, 30], 0, 272, 64),
    ([0, 0, 0], 3, 144, 96),
]


@pytest.mark.parametrize("recipe", ["tensor", "block"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp8_rows_vs_quantized_reference(recipe, case):
    counts, pad, H, I = CASES[case]
    gen = torch.Generator().manual_seed(10 + case)
    L, R = len(counts), sum(counts) + pad
    x = torch.randn(R, H, generator=gen).requires_grad_()
    wgu, wd = _weights(L, H, I, gen)
    out, gu = _capture_gu(lambda: fused_swiglu_experts(x, torch.tensor(counts), wgu, wd, fp8=recipe), R, I)
    ref_gu, ref_out = ref_fp8_rows(x.detach(), counts, wgu.detach(), wd.detach(), recipe)
    n = sum(counts)
    assert rel_err(gu[:n], ref_gu[:n]) < TIGHT
    assert rel_err(out, ref_out) < TIGHT
    assert torch.equal(out[n:], torch.zeros(pad, H))
    exact = fused_swiglu_experts(x, torch.tensor(counts), wgu, wd)  # fp32, no quantization
    assert rel_err(out, exact) < FP8_VS_EXACT


@pytest.mark.parametrize("activation", ["gelu", "relu2", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("recipe", ["tensor", "block"])
def test_fp8_tokens_gather_scatter_vs_quantized_reference(recipe, activation):
    gen = torch.Generator().manual_seed(20)
    N, K, L, H, I = 23, 2, 4, 144, 80
    x = torch.randn(N, H, generator=gen).requires_grad_()
    wgu, wd = _weights(L, H, I, gen)
    sel = torch.randint(-1, L - 1, (N, K), generator=gen)  # drops, the last expert empty
    rw = torch.rand(N, K, generator=gen).requires_grad_()
    counts, row_token, row_weight = routing_rows(sel, rw, L)
    counts_l = counts.tolist()
    act = ACTIVATIONS[activation]
    _, ref_y = ref_fp8_rows(x.detach(), counts_l, wgu.detach(), wd.detach(), recipe, act, row_token.long())
    ref = torch.zeros(N, H).index_add(0, row_token.long(), ref_y * row_weight.detach()[:, None])
    for gather, scatter in ((True, True), (False, False)):
        out = fused_moe_experts(x, sel, rw, wgu, wd, gather=gather, scatter=scatter, activation=activation,
                                fp8=recipe)
        assert rel_err(out, ref) < TIGHT, (gather, scatter)
    exact = fused_moe_experts(x, sel, rw, wgu, wd, activation=activation)
    assert rel_err(out, exact) < FP8_VS_EXACT


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # sigmoid of the outlier's pre-activations
def test_block_scales_keep_the_tokens_next_to_an_outlier():
    """One token 2**14 times larger than the rest: per-tensor scaling pushes every other token
    into e4m3's subnormals (or to zero), blockwise 1 x 128 scales keep each token's own range."""
    gen = torch.Generator().manual_seed(30)
    N, L, H, I = 16, 2, 256, 128
    x = torch.randn(N, H, generator=gen)
    x[3] *= 2.0 ** 14
    wgu, wd = _weights(L, H, I, gen)
    sel = torch.randint(0, L, (N, 1), generator=gen)
    rw = torch.ones(N, 1)
    exact = fused_moe_experts(x, sel, rw, wgu, wd)
    keep = torch.arange(N) != 3
    errs = {r: rel_err(fused_moe_experts(x, sel, rw, wgu, wd, fp8=r)[keep], exact[keep]) for r in ("tensor", "block")}
    assert errs["block"] < FP8_VS_EXACT, errs
    assert errs["tensor"] > 3 * errs["block"], errs


def test_fp8_bf16_input_and_module():
    """bf16 inputs: the fp8 result is within the fp8 bound of the fp32 result on the same (bf16)
    values; the module's ``fp8=`` runs the same path. (The CPU interpreter's bf16 ``tl.dot`` is
    wrong, so the unquantized bf16 kernels are checked on the GPU only; the fp8 path loads bf16
    and converts, which the interpreter does right.)"""
    gen = torch.Generator().manual_seed(40)
    counts, H, I = [12, 7, 0, 20], 128, 96
    R = sum(counts)
    module = SwiGLUExperts(4, H, I, backend="fused", fp8="block", dtype=torch.bfloat16)
    module.reset_parameters(0.1)
    x = torch.randn(R, H, generator=gen).bfloat16()
    tpe = torch.tensor(counts)
    out = module(x, tpe)
    assert out.dtype == torch.bfloat16
    wgu, wd = module.experts_gate_up_weight, module.experts_down_weight
    assert torch.equal(out, fused_swiglu_experts(x, tpe, wgu, wd, fp8="block"))
    assert rel_err(out, fused_swiglu_experts(x.float(), tpe, wgu.float(), wd.float())) < FP8_VS_EXACT
    assert "fp8='block'" in repr(module)


# --- backward: high precision at the fp8 forward's activations -----------------------------------
@pytest.mark.parametrize("recipe", ["tensor", "block"])
def test_fp8_backward_is_the_high_precision_backward_at_the_kept_gate_up(recipe):
    gen = torch.Generator().manual_seed(50)
    N, K, L, H, I = 19, 2, 3, 144, 64
    x = torch.randn(N, H, generator=gen).requires_grad_()
    wgu, wd = _weights(L, H, I, gen)
    sel = torch.randint(-1, L, (N, K), generator=gen)
    rw = torch.rand(N, K, generator=gen).requires_grad_()
    S = N * K
    out, gu = _capture_gu(lambda: fused_moe_experts(x, sel, rw, wgu, wd, fp8=recipe), S, I)
    grad_out = torch.randn(N, H, generator=gen)
    got = torch.autograd.grad(out, (x, wgu, wd, rw), grad_out)
    # reference: the fp32 experts' backward with g | u replaced by the kept (fp8 forward's) values
    counts, row_token, row_weight = routing_rows(sel, rw, L)
    g, u = gu.detach().chunk(2, dim=-1)
    wgu_r, wd_r, x_r, rw_r = (t.detach().clone().requires_grad_() for t in (wgu, wd, x, rw))
    rows = x_r[row_token.long()]
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        sl = slice(start, start + c)
        gu_e = F.linear(rows[sl], wgu_r[e])  # the pre-activations as a function of x and w ...
        g_e, u_e = gu_e.chunk(2, dim=-1)
        # ... evaluated at the kept values: g_e + (kept - g_e).detach() has the kept value and g_e's grad
        g_e = g_e + (g[sl] - g_e).detach()
        u_e = u_e + (u[sl] - u_e).detach()
        outs.append(F.linear(F.silu(g_e) * u_e, wd_r[e]))
        start += c
    y = torch.cat(outs + [torch.zeros(S - start, H)])
    _, _, rwv = routing_rows(sel, rw_r, L)
    ref = torch.zeros(N, H).index_add(0, row_token.long(), y * rwv[:, None])
    want = torch.autograd.grad(ref, (x_r, wgu_r, wd_r, rw_r), grad_out)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "routing_weights"), got, want):
        assert rel_err(a, b) < TIGHT, name


# --- pre-quantized weights, errors, op registration ----------------------------------------------
def test_prequantized_weights_same_bits_and_errors():
    gen = torch.Generator().manual_seed(60)
    counts, H, I = [5, 9], 128, 64
    x = torch.randn(sum(counts), H, generator=gen)
    wgu, wd = _weights(2, H, I, gen)
    tpe = torch.tensor(counts)
    qw = quantize_expert_weights(wgu, wd, "tensor")
    assert isinstance(qw, FP8ExpertWeights) and qw.gate_up.dtype == E4M3 and qw.gate_up_scale.shape == (2,)
    assert torch.equal(fused_swiglu_experts(x, tpe, wgu, wd, fp8_weights=qw),
                       fused_swiglu_experts(x, tpe, wgu, wd, fp8="tensor"))
    with pytest.raises(ValueError, match="fp8"):
        fused_swiglu_experts(x, tpe, wgu, wd, fp8="mxfp8")
    with pytest.raises(ValueError, match="fp8"):
        fused_swiglu_experts(x, tpe, wgu, wd, fp8="block", fp8_weights=qw)
    with pytest.raises(ValueError, match="fp8_weights"):
        fused_swiglu_experts(x, tpe, wgu[:1], wd[:1], fp8_weights=qw)
    with pytest.raises(TypeError, match="fp8_weights"):
        fused_swiglu_experts(x, tpe, wgu, wd, fp8_weights=(qw.gate_up, qw.gate_up_scale))
    with pytest.raises(ValueError, match="recipe"):
        quantize_expert_weights(wgu, wd, "e5m2")
    with pytest.raises(ValueError, match="fp8"):
        SwiGLUExperts(2, H, I, backend="loop", fp8="tensor")
    with pytest.raises(ValueError, match="fp8"):
        SwiGLUExperts(2, H, I, backend="fused", fp8="per-tensor")


def test_fp8_opcheck_and_compile():
    gen = torch.Generator().manual_seed(70)
    L, H, I = 2, 128, 64
    wgu, wd = _weights(L, H, I, gen)
    counts = torch.tensor([3, 2])
    x = torch.randn(6, H, generator=gen).requires_grad_()
    op = torch.ops.moe_dispatch.fused_experts_fwd.default
    qw = quantize_expert_weights(wgu, wd, "block")
    args = (x, counts, wgu, wd, None, None, 6, 6, False, False, True, "silu", "tensor", None, None, None, None)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # e4m3 inputs: test_schema compares inputs with CPU kernels torch lacks for float8 (mul)
    args = args[:11] + ("gelu", "block", qw.gate_up, qw.gate_up_scale, qw.down, qw.down_scale)
    torch.library.opcheck(op, args, test_utils=("test_faketensor", "test_autograd_registration"))
    sel = torch.tensor([[0, 1], [1, 1], [0, -1]])
    rw = torch.rand(3, 2, generator=gen).requires_grad_()
    xt = torch.randn(3, H, generator=gen).requires_grad_()

    def fn(x, sel, rw):
        return fused_moe_experts(x, sel, rw, wgu, wd, fp8="block")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, ref = compiled(xt, sel, rw), fn(xt, sel, rw)
    assert rel_err(out, ref) < TIGHT
    grad_out = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (xt, rw, wgu), grad_out),
                    torch.autograd.grad(ref, (xt, rw, wgu), grad_out)):
        assert rel_err(g, w) < TIGHT


def test_fp8_tensor_descriptor_path(monkeypatch):
    """e4m3 tiles through tensor descriptors (TMA on Hopper): the same results as pointer loads."""
    from moe_dispatch.kernels import grouped_gemm as gg

    gen = torch.Generator().manual_seed(80)
    counts, H, I = [7, 0, 12], 160, 96
    x = torch.randn(sum(counts) + 2, H, generator=gen)
    wgu, wd = _weights(3, H, I, gen)
    tpe = torch.tensor(counts)
    want = {r: fused_swiglu_experts(x, tpe, wgu, wd, fp8=r) for r in ("tensor", "block")}
    tma = gg.TileConfig(16, 16, 32, 2, 1, 1, tma=True)
    monkeypatch.setattr(gg, "_INTERPRET_CONFIG", {k: tma for k in gg._INTERPRET_CONFIG})
    used = []
    real = gg._descriptor
    monkeypatch.setattr(gg, "_descriptor", lambda t, block: used.append(t.dtype) or real(t, block))
    for r in ("tensor", "block"):
        assert rel_err(fused_swiglu_experts(x, tpe, wgu, wd, fp8=r), want[r]) < TIGHT
    assert E4M3 in used


# --- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensor", "block"])
@pytest.mark.parametrize("path", ["rows", "gather_scatter"])
def test_gpu_fp8_vs_quantized_reference_and_fp32(recipe, path):
    """Compiled e4m3 kernels (autotuned tiles, TMA where it applies), bf16 inputs, T 2048, H 2048,
    I 1408 (not a multiple of 128), 8 experts, top-2: the kept g | u against the dequantized fp32
    reference of the same quantized inputs (tight: the only difference is the fp32 summation
    order and, on sm90 per-tensor, the tensor cores' fp8 accumulation), the output against the
    fp32 unquantized loop (loose: e4m3), and the grads against the bf16 fused backward."""
    T, H, I, L, K = 2048, 2048, 1408, 8, 2
    gen = torch.Generator(device="cuda").manual_seed(90)
    x = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
    wgu = (torch.randn(L, 2 * I, H, device="cuda", generator=gen) * 0.02).bfloat16().requires_grad_()
    wd = (torch.randn(L, H, I, device="cuda", generator=gen) * 0.02).bfloat16().requires_grad_()
    sel = torch.rand(T, L, device="cuda", generator=gen).topk(K, dim=-1).indices
    rw = torch.rand(T, K, device="cuda", generator=gen)
    counts, row_token, row_weight = routing_rows(sel, rw, L)
    S = T * K
    xs = x.requires_grad_()
    if path == "rows":
        rows = x[row_token.long()].detach().requires_grad_()
        fn = lambda fp8: fused_swiglu_experts(rows, counts, wgu, wd, fp8=fp8)  # noqa: E731
        inputs = (rows, wgu, wd)
    else:
        fn = lambda fp8: fused_moe_experts(xs, sel, rw, wgu, wd, fp8=fp8)  # noqa: E731
        inputs = (xs, wgu, wd)
    out, gu = _capture_gu(lambda: fn(recipe), S, I)
    # reference g | u from the same quantized operands, fp32
    from moe_dispatch.kernels import fp8 as q8

    xq, xsc = q8.quantize_rows(x.detach() if path != "rows" else rows.detach(), recipe,
                               counts if path == "rows" else None)
    wq, wsc = q8.quantize_weight(wgu.detach(), recipe)
    xd = dequant_rows(xq, xsc, recipe)
    if path != "rows":
        xd = xd[row_token.long()]
    wdq = dequant_weight(wq, wsc, recipe)
    ref_gu, start = torch.zeros(S, 2 * I, device="cuda"), 0
    for e, c in enumerate(counts.tolist()):
        ref_gu[start:start + c] = xd[start:start + c] @ wdq[e].T
        start += c
    n = int(counts.sum())
    err_gu = rel_err(gu[:n].float(), ref_gu[:n].bfloat16().float())
    print(f"{path} {recipe}: g|u vs dequantized reference (rounded to bf16 as g|u) {err_gu:.2e}")
    # same exact products, other fp32 order (and sm90's fp8 accumulation, per-tensor), then one
    # bf16 rounding each: a few last-bit flips of bf16 (2**-8) among 2048 * 2 * 2816 values
    assert err_gu < 3e-3
    exact = fn(None)
    err = rel_err(out.float(), exact.float())
    print(f"{path} {recipe}: out vs bf16 fused {err:.2e}")
    assert err < FP8_VS_EXACT
    grad_out = torch.randn_like(out)
    for name, a, b in zip(("x", "w_gate_up", "w_down"), torch.autograd.grad(out, inputs, grad_out),
                          torch.autograd.grad(exact, inputs, grad_out)):
        e = rel_err(a.float(), b.float())
        print(f"{path} {recipe}: grad {name} vs bf16 {e:.2e}")
        assert e < FP8_VS_EXACT, name
