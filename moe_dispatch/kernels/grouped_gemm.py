"""Grouped GEMM kernels for gated experts (SwiGLU and its kin, ``h = act(g) * u`` with ``act`` a
constexpr of the kernels, :data:`ACT_CODES`): gate+up with the activation in the epilogue, the
down projection (optionally scattering into token rows with the routing weight applied), and
their backward (dX, dW per expert, the gated backward fused into the dH GEMM's epilogue).

Imports torch and triton only (nothing else of ours). Import lazily: under ``TRITON_INTERPRET=1``
Triton decides how to run the kernels when they are defined, i.e. when this module is imported.

Shape legend: R rows (grouped by expert, expert 0 first), L experts, H hidden, I expert FFN size,
N tokens (gather / scatter side), BM x BN x BK a tile.

Rows of expert ``e`` are ``[off_e, off_e + counts[e])`` with ``off_e = sum(counts[:e])``; rows past
``sum(counts)`` are padding. No host sync: each program finds its expert from ``counts`` itself.
The row blocks are laid out expert after expert, each expert's rows cut into ``ceil(c_e / BM)``
blocks; an upper bound of ``ceil(R / BM) + L + 1`` blocks is launched and blocks past the last
expert's cover the padding rows (zeroed where the output is row-aligned) or do nothing.

Worked example, counts = [3, 0, 5], BM = 4, R = 10 (2 padding rows)::

    tiles per expert = [1, 0, 2]   cumulative = [1, 1, 3]
    block 0 -> expert 0, rows [0, 3)     block 1 -> expert 2, rows [3, 7)
    block 2 -> expert 2, rows [7, 8)     block 3 -> padding rows [8, 10)   blocks 4.. -> nothing

Gather / scatter: ``row_token[r]`` (int32/int64 ``[R]``) is the token row of ``x [N, H]`` that row r
reads (gather in the A-operand load), or the row of ``out [N, H]`` (fp32) it adds into, scaled by
``row_weight[r]`` (fp32, scatter in the epilogue, atomics: top-k rows of one token meet there).

Tile configs come from a cached autotune (:func:`tile_config`): keyed on the kernel, its N and K
sizes, the dtype and a power-of-two bucket of rows per expert; tuned once per process per key
on the real arguments, never per step. ``tuning_log()`` returns what was measured.
"""
from __future__ import annotations

import ast
import json
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

__all__ = [
    "TileConfig", "gate_up_swiglu", "rows_gemm", "expert_weight_grad", "tile_config", "tuning_log",
    "clear_tuning_cache", "EPI_STORE", "EPI_SCATTER", "EPI_SWIGLU_BWD", "ACT_CODES", "FP8Scales",
]

EPI_STORE, EPI_SCATTER, EPI_SWIGLU_BWD = 0, 1, 2
#: Gate activations of the gated epilogues (``h = act(g) * u``): kernel name -> ACT constexpr.
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3, "relu": 4, "relu2": 5, "tanh": 6, "sigmoid": 7}
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_EXPERTS = 4096


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _expert_of_block(counts_ptr, L, b, BM: tl.constexpr, BLOCK_L: tl.constexpr):
    """(expert, first row, end row of the expert, total rows) of row block ``b``.

    Past the last expert's blocks: expert = L, first row = total + (b - total blocks) * BM,
    end row = total (the padding rows start at ``total``)."""
    ev = tl.arange(0, BLOCK_L)
    c = tl.load(counts_ptr + ev, mask=ev < L, other=0).to(tl.int32)
    tiles = (c + BM - 1) // BM
    e = tl.sum((tl.cumsum(tiles, 0) <= b).to(tl.int32), 0)
    before = ev < e
    row_start = tl.sum(tl.where(before, c, 0), 0)
    tile_start = tl.sum(tl.where(before, tiles, 0), 0)
    row_end = row_start + tl.sum(tl.where(ev == e, c, 0), 0)
    return e, row_start + (b - tile_start) * BM, row_end, tl.sum(c, 0)


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row blocks share each column tile while it is in L2."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _load_a(desc, ptrs, mask_m, rk, m0, k0, K, A_TMA: tl.constexpr, EVEN_K: tl.constexpr):
    """An A tile ``[BM, BK]`` at rows m0.., columns k0..: through ``desc`` (A_TMA), else by
    pointers (rows masked, columns masked unless EVEN_K)."""
    if A_TMA:
        tile = desc.load([m0, k0])
    elif EVEN_K:
        tile = tl.load(ptrs, mask=mask_m[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=mask_m[:, None] & (rk[None, :] < K - k0), other=0.0)
    return tile


@triton.jit
def _load_b(ptrs, mask_n, rk, k0, K, EVEN_K: tl.constexpr):
    """A B tile ``[BK, BN]`` (columns masked, rows from k0 masked unless EVEN_K)."""
    if EVEN_K:
        tile = tl.load(ptrs, mask=mask_n[None, :], other=0.0)
    else:
        tile = tl.load(ptrs, mask=(rk[:, None] < K - k0) & mask_n[None, :], other=0.0)
    return tile


@triton.jit
def _tanh(z):
    """tanh from the sigmoid (Triton has no portable tanh across 3.x): absolute error ~1e-7."""
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _act(g, ACT: tl.constexpr):
    """The gate activation of ``g`` (fp32), by ACT (see ``ACT_CODES``); HF's formulas."""
    if ACT == 0:  # silu / swish
        a = g * tl.sigmoid(g)
    elif ACT == 1:  # gelu (erf)
        a = g * (0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476)))
    elif ACT == 2:  # gelu, tanh approximation (gelu_pytorch_tanh, gelu_new, gelu_fast)
        a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    elif ACT == 3:  # quick_gelu
        a = g * tl.sigmoid(1.702 * g)
    elif ACT == 4:  # relu
        a = tl.maximum(g, 0.0)
    elif ACT == 5:  # relu2
        r = tl.maximum(g, 0.0)
        a = r * r
    elif ACT == 6:  # tanh
        a = _tanh(g)
    else:  # sigmoid
        a = tl.sigmoid(g)
    return a


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """``(act(g), act'(g))`` of ``g`` (fp32); ``act(g)`` is bit for bit :func:`_act`'s."""
    if ACT == 0:
        sig = tl.sigmoid(g)
        a = g * sig
        da = sig + a * (1.0 - sig)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * (0.3989422804014327 * tl.exp(-0.5 * g * g))
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    elif ACT == 3:
        sig = tl.sigmoid(1.702 * g)
        a = g * sig
        da = sig + 1.702 * g * sig * (1.0 - sig)
    elif ACT == 4:
        a = tl.maximum(g, 0.0)
        da = tl.where(g > 0.0, 1.0, 0.0)
    elif ACT == 5:
        r = tl.maximum(g, 0.0)
        a = r * r
        da = 2.0 * r
    elif ACT == 6:
        a = _tanh(g)
        da = 1.0 - a * a
    else:
        a = tl.sigmoid(g)
        da = a * (1.0 - a)
    return a, da


@triton.jit
def _swiglu_bwd(acc, gu, dgu, h, N, mask, w, dwp, mask_rows, HAS_WEIGHT: tl.constexpr, STORE_H: tl.constexpr,
                ACT: tl.constexpr):
    """Gated-activation backward of one tile (``h = act(g) * u``). ``acc`` fp32 ``[BM, BN]``:
    dout . Wd (unweighted); ``gu`` / ``dgu``: pointer tiles of the gate columns (the up columns at
    + N); ``w`` ``[BM]`` routing weights and ``dwp`` ``[BM]`` pointers of the partial
    routing-weight grads (HAS_WEIGHT); ``h`` (STORE_H): pointer tile where ``h`` is recomputed for
    the down weight's grad (the forward does not keep h: fp32 gives the forward's h bit for bit)."""
    g = tl.load(gu, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu + N, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    if STORE_H:
        tl.store(h, (a * u).to(h.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(dwp, tl.sum(acc * a * u, 1), mask=mask_rows)
        acc = acc * w[:, None]
    tl.store(dgu, (acc * u * da).to(dgu.dtype.element_ty), mask=mask)
    tl.store(dgu + N, (acc * a).to(dgu.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dh_ptr, gu_ptr, counts_ptr, row_weight_ptr, dgu_ptr, dwp_ptr, h_ptr, R, N, L, stride_dh, stride_gu, stride_dgu,
    stride_h, HAS_WEIGHT: tl.constexpr, STORE_H: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """The SwiGLU backward alone, after a dH GEMM done elsewhere (``dh [R, N]``, rows past
    ``sum(counts)`` ignored): writes ``dgu [R, 2N]`` (valid rows), ``dwp [cdiv(N, BN), R]`` and
    (STORE_H) the recomputed ``h [R, N]`` (valid rows)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    ev = tl.arange(0, BLOCK_L)
    total = tl.sum(tl.load(counts_ptr + ev, mask=ev < L, other=0).to(tl.int32), 0)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rm64 = rm.to(tl.int64)
    valid = rm < total
    mask = valid[:, None] & (rn[None, :] < N)
    acc = tl.load(dh_ptr + rm64[:, None] * stride_dh + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(row_weight_ptr + rm, mask=valid, other=0.0).to(tl.float32)
    else:
        w = tl.full((BM,), 1.0, dtype=tl.float32)  # unused
    _swiglu_bwd(acc, gu_ptr + rm64[:, None] * stride_gu + rn[None, :], dgu_ptr + rm64[:, None] * stride_dgu + rn[None, :],
                h_ptr + rm64[:, None] * stride_h + rn[None, :], N, mask, w, dwp_ptr + pid_n.to(tl.int64) * R + rm64,
                rm < R, HAS_WEIGHT, STORE_H, ACT)


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, row_token_ptr, w_ptr, counts_ptr, h_ptr, gu_ptr, x_desc, w_desc, a_scale_ptr, b_scale_ptr,
    R, H, I, L, num_pid_m,
    stride_xm, stride_we, stride_wn, stride_hm, stride_gum, stride_as, stride_bse, stride_bso,
    GATHER: tl.constexpr, SAVE_GU: tl.constexpr, ZERO_PAD: tl.constexpr, EVEN_K: tl.constexpr, ACT: tl.constexpr,
    SCALE: tl.constexpr,
    A_TMA: tl.constexpr, B_TMA: tl.constexpr,
    DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """``h[r, n] = act(g) * u``, ``g = x[src(r)] . w[e, n]``, ``u = x[src(r)] . w[e, I + n]``
    (``act`` by ACT, :data:`ACT_CODES`; SiLU: SwiGLU).

    x: ``[*, H]``; w: ``[L, 2I, H]`` (gate rows, then up rows); h: ``[R, I]``; gu (SAVE_GU):
    ``[R, 2I]`` the pre-activations g | u for the backward. Each program loads the gate and the up
    tile of the same output columns, so the SwiGLU needs no strided split.

    A_TMA / B_TMA: x / w tiles through tensor descriptors (``x_desc`` over ``[R, H]`` with block
    ``[BM, BK]``; ``w_desc`` over ``[L * 2I, H]`` with block ``[BN, BK]``). Rows a tile takes past
    its expert (the next expert's rows) only reach output rows / columns that are masked off; the
    reduction dimension H is the descriptors' last, zero-filled past its end.

    SCALE (x and w in float8_e4m3fn, :mod:`moe_dispatch.kernels.fp8`): SCALE_TENSOR: ``acc *=
    s_x * s_w[e]`` in the epilogue (``a_scale [1]``, ``b_scale [L]``); SCALE_BLOCK: each K step
    (inside one 128-block: ``128 % BK == 0``) adds ``dot(a, b) * s_x[src(r), kb] * s_w[e, o // 128, kb]``
    (``a_scale [*, KB]`` row stride ``stride_as``, ``b_scale [L, OB, KB]`` strides ``stride_bse``,
    ``stride_bso``): the partial sums are promoted to fp32 every 128 elements at most."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(I, BN), GROUP_M)
    e, m0, row_end, total = _expert_of_block(counts_ptr, L, pid_m, BM, BLOCK_L)
    rm = m0 + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mask_n = rn < I
    if e < L:
        mask_m = rm < row_end
        if GATHER:
            src = tl.load(row_token_ptr + rm, mask=mask_m, other=0).to(tl.int64)
        else:
            src = rm.to(tl.int64)
        rk = tl.arange(0, BK)
        a_ptrs = x_ptr + src[:, None] * stride_xm + rk[None, :]
        g_ptrs = w_ptr + e.to(tl.int64) * stride_we + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
        u_ptrs = g_ptrs + I * stride_wn
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        w_row = e * (2 * I) + pid_n * BN
        if SCALE == 2:
            sa_ptrs = a_scale_ptr + src * stride_as
            sg_ptrs = b_scale_ptr + e.to(tl.int64) * stride_bse + (rn // 128).to(tl.int64) * stride_bso
            su_ptrs = b_scale_ptr + e.to(tl.int64) * stride_bse + ((I + rn) // 128).to(tl.int64) * stride_bso
        for k0 in range(0, H, BK):
            a = _load_a(x_desc, a_ptrs, mask_m, rk, m0, k0, H, A_TMA, EVEN_K)
            if B_TMA:
                bg = w_desc.load([w_row, k0]).T
                bu = w_desc.load([w_row + I, k0]).T
            else:
                bg = _load_b(g_ptrs, mask_n, rk, k0, H, EVEN_K)
                bu = _load_b(u_ptrs, mask_n, rk, k0, H, EVEN_K)
            if SCALE == 2:
                kb = k0 // 128
                sa = tl.load(sa_ptrs + kb, mask=mask_m, other=0.0)
                sg = tl.load(sg_ptrs + kb, mask=mask_n, other=0.0)
                su = tl.load(su_ptrs + kb, mask=mask_n, other=0.0)
                acc_g += tl.dot(a, bg, input_precision=DOT_PREC) * (sa[:, None] * sg[None, :])
                acc_u += tl.dot(a, bu, input_precision=DOT_PREC) * (sa[:, None] * su[None, :])
            else:
                acc_g = tl.dot(a, bg, acc_g, input_precision=DOT_PREC)
                acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PREC)
            a_ptrs += BK
            g_ptrs += BK
            u_ptrs += BK
        if SCALE == 1:
            sc = tl.load(a_scale_ptr) * tl.load(b_scale_ptr + e)
            acc_g = acc_g * sc
            acc_u = acc_u * sc
        h = _act(acc_g, ACT) * acc_u
        out_mask = mask_m[:, None] & mask_n[None, :]
        rm64 = rm.to(tl.int64)
        tl.store(h_ptr + rm64[:, None] * stride_hm + rn[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)
        if SAVE_GU:
            gu = gu_ptr + rm64[:, None] * stride_gum + rn[None, :]
            tl.store(gu, acc_g.to(gu_ptr.dtype.element_ty), mask=out_mask)
            tl.store(gu + I, acc_u.to(gu_ptr.dtype.element_ty), mask=out_mask)
    elif ZERO_PAD:
        pad_mask = (rm[:, None] < R) & mask_n[None, :]
        rm64 = rm.to(tl.int64)
        tl.store(h_ptr + rm64[:, None] * stride_hm + rn[None, :],
                 tl.zeros((BM, BN), dtype=h_ptr.dtype.element_ty), mask=pad_mask)


@triton.jit
def _rows_gemm_kernel(
    a_ptr, row_token_ptr, b_ptr, counts_ptr, out_ptr, row_weight_ptr, gu_ptr, dwp_ptr, h_ptr, a_desc, b_desc,
    a_scale_ptr, b_scale_ptr,
    R, N, K, L, num_pid_m, b_rows_per_expert,
    stride_am, stride_be, stride_bk, stride_bn, stride_om, stride_gum, stride_hm,
    stride_as, stride_bse, stride_bsk, stride_bsn, SCALE: tl.constexpr,
    A_GATHER: tl.constexpr, EPILOGUE: tl.constexpr, HAS_WEIGHT: tl.constexpr, STORE_H: tl.constexpr,
    ACT: tl.constexpr,
    ZERO_PAD: tl.constexpr,
    EVEN_K: tl.constexpr, A_TMA: tl.constexpr, B_TMA: tl.constexpr, B_K_MAJOR: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """``acc[r, n] = sum_k a[src(r), k] * b[e, k, n]`` (b through its strides), then by EPILOGUE:

    - EPI_STORE: ``out[r, n] = acc`` (``[R, N]``; padding rows zeroed when ZERO_PAD);
    - EPI_SCATTER: ``out[row_token[r], n] += w[r] * acc`` (fp32 ``[N_tok, N]``, atomics; w = 1
      without HAS_WEIGHT);
    - EPI_SWIGLU_BWD (N = I): ``dh = w[r] * acc`` (w = 1 without HAS_WEIGHT), the gated (ACT) backward
      from the saved pre-activations ``gu [R, 2I]`` into ``out = dgu [R, 2I]``, and with
      HAS_WEIGHT the partial routing-weight grads ``dwp[pid_n, r] = sum_n acc * h`` (fp32), and
      with STORE_H ``h [R, N]`` recomputed from ``gu`` (valid rows).

    A_GATHER: row r of a is ``row_token[r]``.

    A_TMA: a tiles through ``a_desc`` (``[R, K]``, block ``[BM, BK]``). B_TMA: b tiles through
    ``b_desc`` over b's 2-D view ``[L * b_rows_per_expert, cols]``: with B_K_MAJOR (k contiguous:
    rows are n, block ``[BN, BK]``, loaded transposed) the reduction runs along the zero-filled
    last dimension; otherwise (rows are k, block ``[BK, BN]``) the launcher guarantees
    ``K % BK == 0`` so no tile reduces over the next expert's rows.

    SCALE (a and b in float8_e4m3fn): SCALE_TENSOR ``acc *= s_a * s_b[e]`` before the epilogue;
    SCALE_BLOCK: each K step adds ``dot * s_a[src(r), kb] * s_b[e, kb, n // 128]`` (b's scale
    element ``(e, k block, n block)`` at ``e * stride_bse + kb * stride_bsk + nb * stride_bsn``)."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(N, BN), GROUP_M)
    e, m0, row_end, total = _expert_of_block(counts_ptr, L, pid_m, BM, BLOCK_L)
    rm = m0 + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    if e < L:
        mask_m = rm < row_end
        if A_GATHER or EPILOGUE == 1:
            tok = tl.load(row_token_ptr + rm, mask=mask_m, other=0).to(tl.int64)
        else:
            tok = rm64
        if A_GATHER:
            src = tok
        else:
            src = rm64
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + src[:, None] * stride_am + rk[None, :]
        b_ptrs = b_ptr + e.to(tl.int64) * stride_be + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        b_row = e * b_rows_per_expert
        if SCALE == 2:
            sa_ptrs = a_scale_ptr + src * stride_as
            sb_ptrs = b_scale_ptr + e.to(tl.int64) * stride_bse + (rn // 128).to(tl.int64) * stride_bsn
        for k0 in range(0, K, BK):
            a = _load_a(a_desc, a_ptrs, mask_m, rk, m0, k0, K, A_TMA, EVEN_K)
            if B_TMA:
                if B_K_MAJOR:
                    b = b_desc.load([b_row + pid_n * BN, k0]).T
                else:
                    b = b_desc.load([b_row + k0, pid_n * BN])
            else:
                b = _load_b(b_ptrs, mask_n, rk, k0, K, EVEN_K)
            if SCALE == 2:
                kb = k0 // 128
                sa = tl.load(sa_ptrs + kb, mask=mask_m, other=0.0)
                sb = tl.load(sb_ptrs + kb * stride_bsk, mask=mask_n, other=0.0)
                acc += tl.dot(a, b, input_precision=DOT_PREC) * (sa[:, None] * sb[None, :])
            else:
                acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            a_ptrs += BK
            b_ptrs += BK * stride_bk
        if SCALE == 1:
            acc = acc * (tl.load(a_scale_ptr) * tl.load(b_scale_ptr + e))
        out_mask = mask_m[:, None] & mask_n[None, :]
        if HAS_WEIGHT:
            w = tl.load(row_weight_ptr + rm, mask=mask_m, other=0.0).to(tl.float32)
        else:
            w = tl.full((BM,), 1.0, dtype=tl.float32)  # unused
        if EPILOGUE == 0:
            tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        elif EPILOGUE == 1:
            if HAS_WEIGHT:
                acc = acc * w[:, None]
            tl.atomic_add(out_ptr + tok[:, None] * stride_om + rn[None, :], acc, mask=out_mask, sem="relaxed")
        else:
            _swiglu_bwd(acc, gu_ptr + rm64[:, None] * stride_gum + rn[None, :],
                        out_ptr + rm64[:, None] * stride_om + rn[None, :], h_ptr + rm64[:, None] * stride_hm + rn[None, :],
                        N, out_mask, w, dwp_ptr + pid_n.to(tl.int64) * R + rm64, mask_m, HAS_WEIGHT, STORE_H, ACT)
    else:
        if ZERO_PAD:  # EPI_STORE only: out is row-aligned with a
            tl.store(out_ptr + rm64[:, None] * stride_om + rn[None, :],
                     tl.zeros((BM, BN), dtype=out_ptr.dtype.element_ty), mask=(rm[:, None] < R) & mask_n[None, :])
        if EPILOGUE == 2 and HAS_WEIGHT:  # padding rows: no routing weight there, zero grad
            tl.store(dwp_ptr + pid_n.to(tl.int64) * R + rm64, tl.zeros((BM,), dtype=tl.float32), mask=rm < R)


@triton.jit
def _expert_wgrad_kernel(
    a_ptr, a_token_ptr, a_weight_ptr, b_ptr, b_token_ptr, counts_ptr, out_ptr,
    P, Q, L, stride_am, stride_bm, stride_oe, stride_op,
    A_GATHER: tl.constexpr, A_SCALE: tl.constexpr, B_GATHER: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """``out[e, p, q] = sum_{r of expert e} (w[r] *) a[ra(r), p] * b[rb(r), q]`` (``[L, P, Q]``).

    a: ``[*, P]``, b: ``[*, Q]`` row-major; ra / rb = ``a_token`` / ``b_token`` when gathered, else
    r; w = ``a_weight`` (fp32) with A_SCALE. Experts with no rows get zeros. Grid: L * tiles."""
    num_p, num_q = tl.cdiv(P, BM), tl.cdiv(Q, BN)
    pid = tl.program_id(0)
    e = pid // (num_p * num_q)
    pid_p, pid_q = _swizzle(pid % (num_p * num_q), num_p, num_q, GROUP_M)
    ev = tl.arange(0, BLOCK_L)
    c = tl.load(counts_ptr + ev, mask=ev < L, other=0).to(tl.int32)
    row_start = tl.sum(tl.where(ev < e, c, 0), 0)
    row_end = row_start + tl.sum(tl.where(ev == e, c, 0), 0)
    rp = pid_p * BM + tl.arange(0, BM)
    rq = pid_q * BN + tl.arange(0, BN)
    mask_p, mask_q = rp < P, rq < Q
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(row_start, row_end, BK):
        rows = r0 + rk
        mask_k = rows < row_end
        if A_GATHER:
            ra = tl.load(a_token_ptr + rows, mask=mask_k, other=0).to(tl.int64)
        else:
            ra = rows.to(tl.int64)
        if B_GATHER:
            rb = tl.load(b_token_ptr + rows, mask=mask_k, other=0).to(tl.int64)
        else:
            rb = rows.to(tl.int64)
        a = tl.load(a_ptr + ra[None, :] * stride_am + rp[:, None], mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        if A_SCALE:
            w = tl.load(a_weight_ptr + rows, mask=mask_k, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * w[None, :]).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + rb[:, None] * stride_bm + rq[None, :], mask=mask_k[:, None] & mask_q[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    out = out_ptr + e.to(tl.int64) * stride_oe + rp[:, None].to(tl.int64) * stride_op + rq[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])


# --------------------------------------------------------------------------------------------
# Tile configs and the cached autotune
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    """Block sizes (BM rows x BN columns x BK reduction), GROUP_M, warps and pipeline stages."""

    BM: int
    BN: int
    BK: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # tiles through tensor descriptors (TMA on Hopper) where the layout allows
    impl: str = "triton"  # or "grouped_mm": torch._grouped_mm (block fields unused)

    def __str__(self) -> str:
        if self.impl != "triton":
            return f"torch._{self.impl}"
        tma = " tma" if self.tma else ""
        return f"{self.BM}x{self.BN}x{self.BK} g{self.GROUP_M} w{self.num_warps} s{self.num_stages}{tma}"


_C = TileConfig
# Candidates per kernel kind: "small" for few rows per expert (weight streaming, memory-bound),
# "large" for many (tensor-core bound). gate_up's BN is per half: its tile covers 2 * BN columns.
# Ordered best first on the H200 at the Mixtral shape (benchmarks/sweep_fused_tiles.py, 2026-12-04):
# gate_up 128x128x64 tma 631 TFLOP/s, rows 128x256x64 tma ~700, wgrad 128x256x64 ~490.
_CANDIDATES: dict[str, dict[str, list[TileConfig]]] = {
    "gate_up": {
        "large": [_C(128, 128, 64, 8, 8, 3, True), _C(128, 128, 64, 8, 8, 4, True), _C(128, 128, 64, 8, 8, 3)],
        "small": [_C(64, 64, 128, 8, 4, 4, True), _C(64, 128, 64, 8, 4, 3, True), _C(32, 64, 128, 8, 4, 4)],
    },
    "rows": {
        "large": [_C(128, 256, 64, 8, 8, 3, True), _C(128, 128, 64, 8, 8, 4), _C(128, 128, 64, 8, 8, 4, True)],
        "small": [_C(64, 128, 64, 8, 4, 4, True), _C(64, 256, 64, 8, 8, 3, True), _C(32, 128, 128, 8, 4, 4)],
    },
    "wgrad": {
        "large": [_C(128, 256, 64, 8, 8, 3), _C(256, 128, 64, 8, 8, 3)],
        "small": [_C(128, 128, 32, 8, 4, 3), _C(128, 256, 32, 8, 8, 3)],
    },
}
# fp8 operands (predicted, not yet measured): K blocks of 128 (128-byte rows, one blockwise scale
# per step), the bf16 lists' shapes otherwise.
_FP8_CANDIDATES: dict[str, tuple[TileConfig, ...]] = {
    "gate_up": (_C(128, 128, 128, 8, 8, 3, True), _C(128, 128, 128, 8, 8, 4, True),
                _C(64, 128, 128, 8, 4, 4, True)),
    "rows": (_C(128, 256, 128, 8, 8, 3, True), _C(128, 128, 128, 8, 8, 4, True), _C(64, 128, 128, 8, 4, 4, True)),
}
# Under the interpreter: small tiles, one config (tests may override it via _INTERPRET_CONFIG).
_INTERPRET_CONFIG: dict[str, TileConfig] = {k: _C(16, 16, 16, 2, 1, 1) for k in _CANDIDATES}
_SMALL_ROWS = 256  # rows per expert at or under which the "small" list is tried

_CACHE: dict[tuple, TileConfig] = {}
_LOG: list[dict] = []


def _rows_bucket(rows: int, experts: int) -> int:
    """Power-of-two bucket of the mean rows per expert (the autotune key's M part)."""
    mean = max(1, rows // max(1, experts))
    return min(1 << (mean - 1).bit_length(), 1 << 16)


def tile_config(kind: str, key: tuple, bucket: int, launch: Callable[[TileConfig], None], flops: float = 0.0,
                extra: tuple[TileConfig, ...] = (), keep: Callable[[TileConfig], bool] | None = None) -> TileConfig:
    """The cached best config of kernel ``kind`` for ``key`` (sizes, dtype, flags) and rows bucket.

    On a miss, times every candidate (``launch(cfg)`` must run the kernel on scratch outputs)
    and keeps the fastest (``flops`` of one launch goes into the log); configs that fail to
    compile (too much shared memory) are skipped. ``extra``: more candidates (e.g. the
    ``torch._grouped_mm`` implementation where it can run); ``keep``: which candidates the
    arguments allow (e.g. blockwise fp8 scales: K blocks dividing 128).
    Env: ``MOE_FUSED_TILE`` = ``BMxBNxBK`` forces a config (with GROUP_M 8, 8 warps, 3 stages);
    ``MOE_FUSED_TUNE=0`` takes the bucket's first candidate untimed; ``MOE_FUSED_TUNE_CACHE`` =
    a JSON file the tuned configs are read from and written to (shared across processes)."""
    if _INTERPRET:
        return _INTERPRET_CONFIG[kind]
    forced = os.environ.get("MOE_FUSED_TILE")
    if forced:
        bm, bn, bk = (int(v) for v in forced.split("x"))
        return _C(bm, bn, bk, 8, 8, 3)
    full_key = (kind, bucket) + key
    _load_disk_cache()
    cfg = _CACHE.get(full_key)
    if cfg is not None:
        return cfg
    lists = _CANDIDATES[kind]
    candidates = [c for c in lists["small" if bucket <= _SMALL_ROWS else "large"] + list(extra)
                  if keep is None or keep(c)]
    if os.environ.get("MOE_FUSED_TUNE", "1") == "0":  # no timing: the first (default) candidate
        return candidates[0]
    timings = {}
    for cand in candidates:
        try:
            timings[cand] = triton.testing.do_bench(lambda: launch(cand), warmup=5, rep=20, return_mode="median")
        except Exception as err:  # noqa: BLE001 - out of shared memory / registers: not a candidate
            resources = "OutOfResources" in type(err).__name__ or "out of resource" in str(err).lower()
            if not resources and cand.impl == "triton":
                raise
            _LOG.append({"kind": kind, "bucket": bucket, "key": key, "skipped": str(cand), "error": str(err)[:200]})
    if not timings:
        raise RuntimeError(f"no tile config compiled for {kind} {key}")
    cfg = min(timings, key=timings.get)
    _CACHE[full_key] = cfg
    _save_disk_cache()
    _LOG.append({"kind": kind, "bucket": bucket, "key": key, "best": str(cfg),
                 "flops": flops, "ms": {str(c): t for c, t in timings.items()}})
    return cfg


def _disk_cache_path() -> str | None:
    return os.environ.get("MOE_FUSED_TUNE_CACHE") or None


_DISK_LOADED = [False]


def _load_disk_cache() -> None:
    """Merge the JSON cache at ``$MOE_FUSED_TUNE_CACHE`` (if set and present) into the process cache, once."""
    path = _disk_cache_path()
    if _DISK_LOADED[0] or path is None:
        return
    _DISK_LOADED[0] = True
    if os.path.exists(path):
        with open(path) as f:
            for key, fields in json.load(f).items():
                _CACHE.setdefault(ast.literal_eval(key), TileConfig(**fields))


def _save_disk_cache() -> None:
    path = _disk_cache_path()
    if path is None:
        return
    with open(path, "w") as f:
        json.dump({repr(k): asdict(v) for k, v in _CACHE.items()}, f, indent=1)


def tuning_log() -> list[dict]:
    """Every autotune done in this process: kind, key, rows bucket, best config, ms per candidate."""
    return list(_LOG)


def clear_tuning_cache() -> None:
    _CACHE.clear()
    _LOG.clear()


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_l(num_experts: int) -> int:
    """Width of the per-program expert scan: few distinct values, so few compiled variants."""
    if num_experts > _MAX_EXPERTS:
        raise ValueError(f"at most {_MAX_EXPERTS} local experts are supported, got {num_experts}")
    return 16 if num_experts <= 16 else max(256, triton.next_power_of_2(num_experts))


def _act_code(activation: str) -> int:
    if activation not in ACT_CODES:
        raise ValueError(f"activation must be one of {sorted(ACT_CODES)}, got {activation!r}")
    return ACT_CODES[activation]


def _num_row_blocks(rows: int, experts: int, bm: int) -> int:
    return triton.cdiv(rows, bm) + experts + 1


_GROUPED_MM = TileConfig(128, 128, 64, 8, 8, 3, impl="grouped_mm")


def _once(make: Callable[[], object]) -> Callable[[], object]:
    """``make()`` on the first call, the same object after: scratch outputs exist only on a miss."""
    box: list = []

    def get():
        if not box:
            box.append(make())
        return box[0]
    return get


def _grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can take these row-major operands (CUDA: bf16 on sm90+; the
    CPU implementation is used by the tests); rows must be 16-byte multiples."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    t0 = tensors[0]
    if t0.device.type == "cuda" and (t0.dtype != torch.bfloat16 or torch.cuda.get_device_capability(t0.device) < (9, 0)):
        return False
    return all(t.dtype == t0.dtype and (t.shape[-1] * t.element_size()) % 16 == 0 and t.stride(-1) == 1
               for t in tensors)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0, dtype=torch.int32)  # end row of each expert, no sync


def _tma_ok(t: torch.Tensor) -> bool:
    """Whether a tensor descriptor can cover ``t`` as a row-major 2-D view (16-byte aligned base
    and rows) and this Triton has host-side descriptors."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (Triton >= 3.4)
    except ImportError:
        return False
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0


def _descriptor(t2d: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t2d, block)


SCALE_NONE, SCALE_TENSOR, SCALE_BLOCK = 0, 1, 2
_FP8_QBLOCK = 128  # the block of moe_dispatch.kernels.fp8 (scales per 128 elements along K)


@dataclass(frozen=True)
class FP8Scales:
    """Scales of float8_e4m3fn GEMM operands (:mod:`moe_dispatch.kernels.fp8`), fp32.

    recipe ``"tensor"``: ``a [1]`` and ``b [L]`` (one per expert). ``"block"``: ``a [rows, KB]``
    (1 x 128 along K; rows as a's, read through the gather index when a is gathered) and b per
    128 x 128 block; ``b_strides`` = strides of b's scale element ``(e, k block, n block)``
    (rows_gemm only; gate_up_swiglu reads ``b [L, 2I / 128, KB]`` directly)."""

    recipe: str
    a: torch.Tensor
    b: torch.Tensor
    b_strides: tuple[int, int, int] = (0, 0, 0)


def _scale_mode(scales: FP8Scales | None, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> int:
    fp8 = torch.float8_e4m3fn
    if scales is None:
        if a.dtype == fp8 or b.dtype == fp8:
            raise ValueError("float8_e4m3fn operands need their scales (scales=FP8Scales(...))")
        return SCALE_NONE
    if a.dtype != fp8 or b.dtype != fp8:
        raise ValueError(f"scales given: both operands must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if out_dtype == fp8:
        raise ValueError("the output of an fp8 GEMM is bf16 / fp16 / fp32, not float8_e4m3fn")
    if scales.recipe not in ("tensor", "block"):
        raise ValueError(f"scales.recipe must be 'tensor' or 'block', got {scales.recipe!r}")
    return SCALE_TENSOR if scales.recipe == "tensor" else SCALE_BLOCK


def _scale_config_ok(scale_mode: int) -> Callable[[TileConfig], bool]:
    """Blockwise scales change once per 128 elements of K: a K step must stay inside one block."""
    return lambda cfg: scale_mode != SCALE_BLOCK or cfg.impl != "triton" or _FP8_QBLOCK % cfg.BK == 0


def _check_scale_config(scale_mode: int, cfg: TileConfig) -> None:
    if not _scale_config_ok(scale_mode)(cfg):
        raise ValueError(f"blockwise fp8 scales need a K block dividing {_FP8_QBLOCK}, got config {cfg}")


def _fp8_extra(kind: str, scale_mode: int) -> tuple[TileConfig, ...]:
    """More candidates for fp8 operands (1-byte elements: K blocks of 128 fill a 128-byte row)."""
    return _FP8_CANDIDATES[kind] if scale_mode else ()


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def gate_up_swiglu(
    x: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, num_rows: int, *,
    row_token: torch.Tensor | None = None, save_gate_up: bool = False, zero_pad: bool = True,
    activation: str = "silu", scales: FP8Scales | None = None, out_dtype: torch.dtype | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h [R, I] = act(x_r W_g^T) * (x_r W_u^T)`` per expert, and optionally ``gu [R, 2I]`` (g | u).

    Args:
        x: ``[R, H]`` expert-grouped rows, or ``[N, H]`` tokens read through ``row_token``.
        counts: integer ``[L]`` rows per expert (device).
        w_gate_up: ``[L, 2I, H]``, x's dtype, contiguous.
        num_rows: R (rows of h).
        row_token: integer ``[R]``: the row of ``x`` each row reads (gather), or None.
        activation: ``act``, a name of :data:`ACT_CODES`.
        scales: x and w_gate_up in float8_e4m3fn: their scales (``a``: x's, ``b``: the weight's,
            see :class:`FP8Scales`); None for x's dtype.
        out_dtype: of h and gu (default x's dtype; required with fp8 operands).
    """
    act = _act_code(activation)
    L, two_i, H = w_gate_up.shape
    I = two_i // 2
    out_dtype = out_dtype or x.dtype
    scale_mode = _scale_mode(scales, x, w_gate_up, out_dtype)
    h = torch.empty(num_rows, I, device=x.device, dtype=out_dtype)
    gu = torch.empty(num_rows, two_i, device=x.device, dtype=out_dtype) if save_gate_up else None
    if num_rows == 0 or I == 0:
        return h, gu

    def launch(cfg: TileConfig, h_out=h, gu_out=gu) -> None:
        npm = _num_row_blocks(num_rows, L, cfg.BM)
        a_tma = cfg.tma and row_token is None and _tma_ok(x)
        b_tma = cfg.tma and _tma_ok(w_gate_up)
        _gate_up_swiglu_kernel[(npm * triton.cdiv(I, cfg.BN),)](
            x, row_token if row_token is not None else counts, w_gate_up, counts, h_out,
            gu_out if gu_out is not None else h_out,
            _descriptor(x, [cfg.BM, cfg.BK]) if a_tma else None,
            _descriptor(w_gate_up.view(-1, H), [cfg.BN, cfg.BK]) if b_tma else None,
            scales.a if scales is not None else counts, scales.b if scales is not None else counts,
            num_rows, H, I, L, npm, x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), h_out.stride(0),
            gu_out.stride(0) if gu_out is not None else 0,
            scales.a.stride(0) if scale_mode == SCALE_BLOCK else 0,
            scales.b.stride(0) if scale_mode == SCALE_BLOCK else 0,
            scales.b.stride(1) if scale_mode == SCALE_BLOCK else 0,
            GATHER=row_token is not None, SAVE_GU=gu_out is not None, ZERO_PAD=zero_pad,
            EVEN_K=H % cfg.BK == 0, ACT=act, SCALE=scale_mode, A_TMA=a_tma, B_TMA=b_tma, DOT_PREC=_dot_precision(x.dtype),
            BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
            GROUP_M=cfg.GROUP_M, BLOCK_L=_block_l(L), num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if config is None:
        scratch = _once(lambda: (torch.empty_like(h), None if gu is None else torch.empty_like(gu)))
        config = tile_config("gate_up", (H, I, str(x.dtype), row_token is not None, save_gate_up, activation,
                                         scale_mode, str(out_dtype)),
                             _rows_bucket(num_rows, L), lambda c: launch(c, *scratch()),
                             flops=4.0 * num_rows * H * I, extra=_fp8_extra("gate_up", scale_mode),
                             keep=_scale_config_ok(scale_mode))
    _check_scale_config(scale_mode, config)
    launch(config)
    return h, gu


def rows_gemm(
    a: torch.Tensor, counts: torch.Tensor, b: torch.Tensor, b_strides: tuple[int, int, int], n: int,
    out: torch.Tensor, num_rows: int, *, epilogue: int = EPI_STORE, row_token: torch.Tensor | None = None,
    a_gather: bool = False, row_weight: torch.Tensor | None = None, gate_up: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None, activation: str = "silu", scales: FP8Scales | None = None,
    zero_pad: bool = True, config: TileConfig | None = None,
) -> torch.Tensor | None:
    """Grouped ``a_r @ B_e`` over ``num_rows`` expert-grouped rows; see ``_rows_gemm_kernel``.

    Args:
        a: ``[*, K]`` row-major (rows read through ``row_token`` when ``a_gather``).
        counts: integer ``[L]`` rows per expert.
        b: per-expert operand with element ``(e, k, n)`` at ``e * s0 + k * s1 + n * s2``,
            ``b_strides = (s0, s1, s2)``.
        n: N, output columns.
        out: ``[R, N]`` (EPI_STORE), fp32 ``[N_tok, N]`` zero-initialised (EPI_SCATTER, rows
            ``row_token``) or ``[R, 2N]`` (EPI_SWIGLU_BWD, with ``gate_up [R, 2N]``).
        num_rows: R.
        row_weight: fp32 ``[R]`` (scatter scale / routing weight), or None.
        h_out: EPI_SWIGLU_BWD only: ``[R, N]`` where ``h = act(g) * u`` is recomputed from
            ``gate_up`` (valid rows written), or None.
        activation: EPI_SWIGLU_BWD's ``act``, a name of :data:`ACT_CODES`.
        scales: a and b in float8_e4m3fn (EPI_STORE / EPI_SCATTER): their scales; ``scales.b_strides``
            gives b's scale element ``(e, k block, n block)``. None for a's dtype.

    Returns:
        For EPI_SWIGLU_BWD with ``row_weight``: fp32 ``[R]``, the gradient w.r.t. ``row_weight``
        (``sum_n acc * h``, reduced in a fixed order: deterministic); else None.
    """
    act = _act_code(activation)
    L = counts.shape[0]
    K = a.shape[1]
    scale_mode = _scale_mode(scales, a, b, out.dtype)
    if scale_mode and epilogue == EPI_SWIGLU_BWD:
        raise ValueError("fp8 operands are supported in the EPI_STORE / EPI_SCATTER epilogues only")
    want_dw = epilogue == EPI_SWIGLU_BWD and row_weight is not None
    # Tensor descriptors need b to be a contiguous [L, rows, cols] tensor read along its rows
    # (B_K_MAJOR: rows are n, k contiguous) or columns (rows are k).
    b_k_major = b_strides[1] == 1
    b_tma_layout = None
    if b.dim() == 3 and _tma_ok(b) and b_strides[0] == b.shape[1] * b.shape[2] and (
            (b_k_major and b_strides[2] == b.shape[2]) or (b_strides[2] == 1 and b_strides[1] == b.shape[2])):
        b_tma_layout = b.view(-1, b.shape[2])
    if num_rows == 0 or n == 0:
        if epilogue == EPI_STORE and zero_pad:
            out.zero_()
        if epilogue == EPI_SWIGLU_BWD:
            out.zero_()
            if h_out is not None:
                h_out.zero_()
        return torch.zeros(num_rows, device=a.device, dtype=torch.float32) if want_dw else None

    # dH on torch._grouped_mm, then the SwiGLU backward alone: a candidate where it can run
    # (b [L, K, N] row-major, rows of a not gathered)
    gmm_ok = (epilogue == EPI_SWIGLU_BWD and not a_gather and b.dim() == 3 and b_strides[2] == 1
              and b_strides[1] == b.shape[2] and b_strides[0] == b.shape[1] * b.shape[2] and _grouped_mm_ok(a, b))

    def launch_grouped_mm(out_t: torch.Tensor, h_t: torch.Tensor | None) -> torch.Tensor | None:
        dh = torch._grouped_mm(a, b, offs=_offsets(counts))  # [R, N], rows past sum(counts) garbage
        bm, bn = (16, 16) if _INTERPRET else (32, 128)
        dwp = torch.empty(triton.cdiv(n, bn), num_rows, device=a.device, dtype=torch.float32) if want_dw else None
        _swiglu_bwd_kernel[(triton.cdiv(num_rows, bm), triton.cdiv(n, bn))](
            dh, gate_up, counts, row_weight if row_weight is not None else counts, out_t,
            dwp if dwp is not None else counts, h_t if h_t is not None else out_t, num_rows, n, L, dh.stride(0),
            gate_up.stride(0), out_t.stride(0), h_t.stride(0) if h_t is not None else 0,
            HAS_WEIGHT=row_weight is not None, STORE_H=h_t is not None, ACT=act, BM=bm, BN=bn, BLOCK_L=_block_l(L),
            num_warps=4)
        return dwp

    def launch(cfg: TileConfig, out_t: torch.Tensor, h_t: torch.Tensor | None) -> torch.Tensor | None:
        if cfg.impl == "grouped_mm" and gmm_ok:
            return launch_grouped_mm(out_t, h_t)
        npm = _num_row_blocks(num_rows, L, cfg.BM)
        num_pid_n = triton.cdiv(n, cfg.BN)
        dwp = torch.empty(num_pid_n, num_rows, device=a.device, dtype=torch.float32) if want_dw else None
        dummy = counts
        a_tma = cfg.tma and not a_gather and _tma_ok(a)
        b_tma = cfg.tma and b_tma_layout is not None and (b_k_major or K % cfg.BK == 0)
        b_block = [cfg.BN, cfg.BK] if b_k_major else [cfg.BK, cfg.BN]
        _rows_gemm_kernel[(npm * num_pid_n,)](
            a, row_token if row_token is not None else dummy, b, counts, out_t,
            row_weight if row_weight is not None else dummy, gate_up if gate_up is not None else dummy,
            dwp if dwp is not None else dummy, h_t if h_t is not None else dummy,
            _descriptor(a, [cfg.BM, cfg.BK]) if a_tma else None,
            _descriptor(b_tma_layout, b_block) if b_tma else None,
            scales.a if scales is not None else dummy, scales.b if scales is not None else dummy,
            num_rows, n, K, L, npm, b.shape[1], a.stride(0), b_strides[0], b_strides[1], b_strides[2], out_t.stride(0),
            gate_up.stride(0) if gate_up is not None else 0, h_t.stride(0) if h_t is not None else 0,
            scales.a.stride(0) if scale_mode == SCALE_BLOCK else 0,
            *(scales.b_strides if scale_mode == SCALE_BLOCK else (0, 0, 0)), SCALE=scale_mode,
            A_GATHER=a_gather, EPILOGUE=epilogue, HAS_WEIGHT=row_weight is not None, STORE_H=h_t is not None,
            ACT=act,
            ZERO_PAD=zero_pad and epilogue == EPI_STORE,
            EVEN_K=K % cfg.BK == 0, A_TMA=a_tma, B_TMA=b_tma, B_K_MAJOR=b_k_major, DOT_PREC=_dot_precision(a.dtype), BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
            GROUP_M=cfg.GROUP_M, BLOCK_L=_block_l(L), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return dwp

    if config is None:
        scratch = _once(lambda: (torch.empty_like(out), None if h_out is None else torch.empty_like(h_out)))
        flags = (str(a.dtype), epilogue, a_gather, row_weight is not None, b_strides[2] == 1, h_out is not None)
        if epilogue == EPI_SWIGLU_BWD:
            flags += (activation,)
        if scale_mode:
            flags += (scale_mode, str(out.dtype))
        config = tile_config("rows", (n, K) + flags, _rows_bucket(num_rows, L), lambda c: launch(c, *scratch()),
                             flops=2.0 * num_rows * n * K,
                             extra=((_GROUPED_MM,) if gmm_ok else ()) + _fp8_extra("rows", scale_mode),
                             keep=_scale_config_ok(scale_mode))
    _check_scale_config(scale_mode, config)
    dwp = launch(config, out, h_out)
    return dwp.sum(0) if dwp is not None else None


def expert_weight_grad(
    a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, num_rows: int, *,
    a_token: torch.Tensor | None = None, a_weight: torch.Tensor | None = None,
    b_token: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, config: TileConfig | None = None,
) -> torch.Tensor:
    """``out[e] = sum_{r of expert e} (a_weight[r] *) a[ra(r)]^T b[rb(r)]``, ``out [L, P, Q]``.

    Args:
        a: ``[*, P]``; b: ``[*, Q]``, row-major, same dtype.
        counts: integer ``[L]`` rows per expert (the first ``num_rows`` rows of a / b, grouped).
        a_token / b_token: integer ``[R]`` row indices (gather) or None (row r).
        a_weight: fp32 ``[R]`` row scale of a, or None.
        out_dtype: of the result (default a's).

    Plain rows (no gather, no scale): ``torch._grouped_mm`` is one of the autotune's candidates.
    """
    L, P, Q = counts.shape[0], a.shape[1], b.shape[1]
    out_dtype = out_dtype or a.dtype
    if P == 0 or Q == 0 or num_rows == 0:
        return torch.zeros(L, P, Q, device=a.device, dtype=out_dtype)
    gmm_ok = (a_token is None and a_weight is None and b_token is None and out_dtype == a.dtype
              and _grouped_mm_ok(a, b))

    def launch(cfg: TileConfig) -> torch.Tensor:
        if cfg.impl == "grouped_mm" and gmm_ok:
            return torch._grouped_mm(a[:num_rows].t(), b[:num_rows], offs=_offsets(counts))
        out = torch.empty(L, P, Q, device=a.device, dtype=out_dtype)
        dummy = counts
        grid = (L * triton.cdiv(P, cfg.BM) * triton.cdiv(Q, cfg.BN),)
        _expert_wgrad_kernel[grid](
            a, a_token if a_token is not None else dummy, a_weight if a_weight is not None else dummy,
            b, b_token if b_token is not None else dummy, counts, out,
            P, Q, L, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
            A_GATHER=a_token is not None, A_SCALE=a_weight is not None, B_GATHER=b_token is not None,
            DOT_PREC=_dot_precision(a.dtype), BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
            BLOCK_L=_block_l(L), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out

    if config is None:
        flags = (str(a.dtype), a_token is not None, a_weight is not None, b_token is not None)
        config = tile_config("wgrad", (P, Q) + flags, _rows_bucket(num_rows, L), launch,
                             flops=2.0 * num_rows * P * Q, extra=(_GROUPED_MM,) if gmm_ok else ())
    return launch(config)
