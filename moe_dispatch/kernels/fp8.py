"""FP8 (``float8_e4m3fn``) quantization of the fused experts' GEMM operands, fp32 power-of-two scales.

Imports torch and triton only (nothing else of ours); import lazily (see ``grouped_gemm``).

Recipes (``recipe``):

- ``"tensor"``: one scale per activation tensor (over its valid rows), one per expert weight
  ``w[e]`` (gate and up together: one ``[2I, H]`` matrix).
- ``"block"``: activations ``1 x 128`` (one scale per row and 128 consecutive elements along K,
  the GEMM's reduction dimension); weights ``128 x 128`` blocks (DeepSeek-V3's layout: a weight
  block's scale is shared by 128 output columns of one K block, so the GEMM applies an outer
  product of a row and a column scale vector per K step, and the transposed weight needs no
  second quantization).

Scale of a group with largest magnitude ``amax``: ``s = 2**k``, the smallest power of two with
``amax / s <= 448`` (e4m3's largest finite value); ``s = 1`` where ``amax = 0``. Values:
``q = e4m3(v * 2**-k)`` (round to nearest even; in range by construction, no saturation;
the kernels round to e4m3's grid themselves, see ``_e4m3_grid``), ``v ~ q * s``.

Why powers of two (as MXFP8's E8M0 exponents, DeepSeek-V3's later recipes, TE's
``power_2_scale`` option): scaling and de-scaling are exact, so the bits of ``q`` and ``s`` are
the same on every device and in a plain-torch reference, and ``acc * s_a * s_b`` in a GEMM
epilogue adds no rounding. e4m3 is a floating-point format: its relative precision does not
depend on the scale, which only places the group's values in e4m3's range (2**-9 .. 448, normal
from 2**-6). A power of two gives up at most one binade of that range; and the two recipes give
the same relative error on data whose dynamic range fits e4m3's (Gaussian data), and differ where
it does not: a large outlier token pushes a whole tensor's other values into the subnormals
under ``"tensor"``, while ``"block"`` scales each row's 128-element groups on their own
(DeepSeek-V3's reason for fine-grained scales; ``tests/test_fused_fp8.py`` shows both).

Rows past ``sum(counts)`` (padding, when ``counts`` is given) count as zeros: they neither set a
scale nor hold anything but zeros in ``q``.

Shape legend: M rows, K reduction size, KB = ceil(K / 128), L experts, O weight rows (outputs),
OB = ceil(O / 128).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["FP8_DTYPE", "FP8_MAX", "QBLOCK", "RECIPES", "quantize_rows", "quantize_weight", "pow2_scale"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
QBLOCK = 128
RECIPES = ("tensor", "block")
_BLOCK_L_MAX = 4096


@triton.jit
def _pow2_scale(amax):
    """``(s, 1 / s)`` for ``amax >= 0`` (fp32): ``s = 2**k``, smallest with ``amax / s <= 448``,
    from amax's bits (exact; ``k`` clamped to [-126, 126]; ``s = 1`` for ``amax = 0``)."""
    bits = amax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    # amax = m * 2**e with m in [1, 2); 448 = 1.75 * 2**8: m <= 1.75 -> k = e - 8, else e - 7
    k = tl.where((bits & 0x7FFFFF) > 0x600000, e - 7, e - 8)
    k = tl.minimum(tl.maximum(k, -126), 126)
    k = tl.where(amax > 0.0, k, 0)
    s = ((k + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return s, inv


@triton.jit
def _e4m3_grid(v):
    """``v`` (fp32, ``|v| <= 448``) rounded to the nearest e4m3 value, ties to even, still fp32: the
    cast to float8e4nv after it is exact. Normal range: round the fp32 bits to 3 mantissa bits
    (an integer carry moves into the exponent exactly); below 2**-6 (e4m3 subnormals, multiples
    of 2**-9): the 1.5 * 2**23 rounding trick on ``v * 2**9``. Same result as a correct
    round-to-nearest-even cast (the GPU's cvt.rn); Triton's interpreter mis-rounds values whose
    rounding carries into the next binade (e.g. 31.53 -> 16 instead of 32), so the kernels never
    leave the rounding to the cast."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    av = tl.abs(v)
    sub = ((av * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # on |v|, then v's sign bit (-0 stays -0)
    sub = (sub.to(tl.int32, bitcast=True) | (bits & -0x80000000)).to(tl.float32, bitcast=True)
    return tl.where(av < 0.015625, sub, normal)


@triton.jit
def _row_limit(counts_ptr, L, M, HAS_LIMIT: tl.constexpr, BLOCK_L: tl.constexpr):
    if HAS_LIMIT:
        ev = tl.arange(0, BLOCK_L)
        limit = tl.sum(tl.load(counts_ptr + ev, mask=ev < L, other=0).to(tl.int32), 0)
    else:
        limit = M
    return limit


@triton.jit
def _quant_block_kernel(
    x_ptr, q_ptr, s_ptr, counts_ptr, M, K, L, stride_xb, stride_xm, stride_qb, stride_qm, stride_sb, stride_sm,
    HAS_LIMIT: tl.constexpr, ROW_GROUP: tl.constexpr, BM: tl.constexpr, QB: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One ``[BM, QB]`` tile of batch ``program_id(2)``: scales per row (ROW_GROUP 1: ``s[b, m, kb]``)
    or one per tile (ROW_GROUP = BM: ``s[b, m // BM, kb]``), and the quantized tile."""
    pid_m, kb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    limit = _row_limit(counts_ptr, L, M, HAS_LIMIT, BLOCK_L)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = kb * QB + tl.arange(0, QB)
    rm64 = rm.to(tl.int64)
    b64 = b.to(tl.int64)
    mask_k = rk[None, :] < K
    v = tl.load(x_ptr + b64 * stride_xb + rm64[:, None] * stride_xm + rk[None, :],
                mask=(rm[:, None] < limit) & mask_k, other=0.0).to(tl.float32)
    if ROW_GROUP == 1:
        s, inv = _pow2_scale(tl.max(tl.abs(v), 1))
        q = _e4m3_grid(v * inv[:, None])
        tl.store(s_ptr + b64 * stride_sb + rm64 * stride_sm + kb, s, mask=rm < M)
    else:
        s, inv = _pow2_scale(tl.max(tl.max(tl.abs(v), 1), 0))
        q = _e4m3_grid(v * inv)
        tl.store(s_ptr + b64 * stride_sb + pid_m * stride_sm + kb, s)
    tl.store(q_ptr + b64 * stride_qb + rm64[:, None] * stride_qm + rk[None, :], q.to(q_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & mask_k)


@triton.jit
def _load_tile(x_ptr, counts_ptr, M, K, L, stride_xb, stride_xm, pid, b,
               HAS_LIMIT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BLOCK_L: tl.constexpr):
    """Tile ``pid`` (row-major over ``[BM, BK]`` tiles) of ``x[b]`` in fp32, rows past the
    limit read as 0; returns ``(tile, rows, cols)``."""
    num_k = tl.cdiv(K, BK)
    limit = _row_limit(counts_ptr, L, M, HAS_LIMIT, BLOCK_L)
    rm = (pid // num_k) * BM + tl.arange(0, BM)
    rk = (pid % num_k) * BK + tl.arange(0, BK)
    v = tl.load(x_ptr + b.to(tl.int64) * stride_xb + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :],
                mask=(rm[:, None] < limit) & (rk[None, :] < K), other=0.0).to(tl.float32)
    return v, rm, rk


@triton.jit
def _amax_kernel(
    x_ptr, part_ptr, counts_ptr, M, K, L, stride_xb, stride_xm, num_parts,
    HAS_LIMIT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """``part[b, pid] = max |x[b]|`` over one ``[BM, BK]`` tile (valid rows only)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    v, rm, rk = _load_tile(x_ptr, counts_ptr, M, K, L, stride_xb, stride_xm, pid, b, HAS_LIMIT, BM, BK, BLOCK_L)
    tl.store(part_ptr + b.to(tl.int64) * num_parts + pid, tl.max(tl.max(tl.abs(v), 1), 0))


@triton.jit
def _quant_tensor_kernel(
    x_ptr, q_ptr, inv_ptr, counts_ptr, M, K, L, stride_xb, stride_xm, stride_qb, stride_qm,
    HAS_LIMIT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """``q[b] = e4m3(x[b] * inv[b])`` over one ``[BM, BK]`` tile (rows past the limit: zeros)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    v, rm, rk = _load_tile(x_ptr, counts_ptr, M, K, L, stride_xb, stride_xm, pid, b, HAS_LIMIT, BM, BK, BLOCK_L)
    q = _e4m3_grid(v * tl.load(inv_ptr + b))
    tl.store(q_ptr + b.to(tl.int64) * stride_qb + rm.to(tl.int64)[:, None] * stride_qm + rk[None, :],
             q.to(q_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


def pow2_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, 1 / s)`` of :func:`_pow2_scale` in torch (same bits), for fp32 ``amax >= 0``."""
    bits = amax.float().contiguous().view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    k = torch.where((bits & 0x7FFFFF) > 0x600000, e - 7, e - 8).clamp(-126, 126)
    k = torch.where(amax > 0, k, torch.zeros_like(k))
    return ((k + 127) << 23).view(torch.float32), ((127 - k) << 23).view(torch.float32)


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe must be one of {RECIPES}, got {recipe!r}")


def _block_l(counts: torch.Tensor | None) -> int:
    n = 1 if counts is None else counts.shape[0]
    if n > _BLOCK_L_MAX:
        raise ValueError(f"at most {_BLOCK_L_MAX} experts are supported, got {n}")
    return max(16, triton.next_power_of_2(n))


def _quantize(x3: torch.Tensor, recipe: str, row_group: int, counts: torch.Tensor | None):
    """x3 ``[B, M, K]`` (rows contiguous) -> (q ``[B, M, K]`` e4m3, scales)."""
    B, M, K = x3.shape
    q = torch.empty(B, M, K, device=x3.device, dtype=FP8_DTYPE)
    L = 0 if counts is None else counts.shape[0]
    cptr = counts if counts is not None else q
    common = dict(HAS_LIMIT=counts is not None, BLOCK_L=_block_l(counts))
    if M == 0 or K == 0:
        scales = (torch.ones(B, device=x3.device, dtype=torch.float32) if recipe == "tensor" else
                  torch.ones(B, triton.cdiv(M, row_group), triton.cdiv(K, QBLOCK), device=x3.device,
                             dtype=torch.float32))
        return q, scales
    if recipe == "block":
        bm = QBLOCK if row_group == QBLOCK else 16
        mb = triton.cdiv(M, row_group)
        kb = triton.cdiv(K, QBLOCK)
        s = torch.empty(B, mb, kb, device=x3.device, dtype=torch.float32)
        _quant_block_kernel[(triton.cdiv(M, bm), kb, B)](
            x3, q, s, cptr, M, K, L, x3.stride(0), x3.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
            ROW_GROUP=row_group, BM=bm, QB=QBLOCK, num_warps=4, **common)
        return q, s
    bm, bk = 32, 128
    parts = triton.cdiv(M, bm) * triton.cdiv(K, bk)
    part = torch.empty(B, parts, device=x3.device, dtype=torch.float32)
    _amax_kernel[(parts, B)](x3, part, cptr, M, K, L, x3.stride(0), x3.stride(1), parts, BM=bm, BK=bk, num_warps=4,
                             **common)
    s, inv = pow2_scale(part.amax(1))
    _quant_tensor_kernel[(parts, B)](x3, q, inv, cptr, M, K, L, x3.stride(0), x3.stride(1), q.stride(0), q.stride(1),
                                     BM=bm, BK=bk, num_warps=4, **common)
    return q, s


def quantize_rows(x: torch.Tensor, recipe: str, counts: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """An activation (GEMM A operand) to e4m3.

    Args:
        x: ``[M, K]`` bf16 / fp16 / fp32, rows contiguous.
        recipe: ``"tensor"`` or ``"block"`` (1 x 128).
        counts: integer ``[L]`` rows per expert: rows past ``sum(counts)`` are padding (zeros in q,
            left out of the scales); None: every row counts.

    Returns:
        ``(q [M, K] float8_e4m3fn, s)``: ``s`` fp32 ``[1]`` ("tensor") or ``[M, KB]`` ("block").
    """
    _check_recipe(recipe)
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be a 2-D tensor with contiguous rows, got shape {tuple(x.shape)}")
    q, s = _quantize(x.unsqueeze(0), recipe, 1, counts)
    return q[0], s[0] if recipe == "block" else s


def quantize_weight(w: torch.Tensor, recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert weights (GEMM B operands, ``w[e]`` is ``[O, K]`` with K contiguous) to e4m3.

    Returns:
        ``(q [L, O, K] float8_e4m3fn, s)``: ``s`` fp32 ``[L]`` ("tensor": one per expert) or
        ``[L, OB, KB]`` ("block": 128 x 128).
    """
    _check_recipe(recipe)
    if w.dim() != 3 or not w.is_contiguous():
        raise ValueError(f"w must be a contiguous [L, O, K] tensor, got shape {tuple(w.shape)}")
    return _quantize(w, recipe, QBLOCK, None)
