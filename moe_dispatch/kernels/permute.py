"""Triton kernels for permute / unpermute: a counting sort of the (token, k) slots by expert fused
with the row copy, a gather-reduce kernel, and the backward kernel of the latter.

Imports torch and triton only (nothing else of ours). Import this module lazily: it imports
triton at the top, and under ``TRITON_INTERPRET=1`` Triton decides how to run the kernels when
they are defined, i.e. when this module is first imported.

Shape legend: N tokens, H hidden, K top-k, E experts, S = N * K slots (flat index ``n * K + k``),
M output rows (``num_out_rows``), T tokens per sort chunk, C = T * K slots per chunk,
B = cdiv(N, T) chunks.

``row_id_map`` (int64 ``[N, K]``) is the format of :mod:`moe_dispatch.permute.reference`:
the row of ``permuted`` holding token n's copy for its k-th expert, -1 when dropped. Rows are
grouped by expert, in (token, k) order inside an expert; each expert's group starts at a
multiple of ``align_size`` (padding rows are zero); rows at or past M are dropped.

Permute = a counting sort, O(S) work, deterministic, no host sync, in two launches (three for
large inputs), each through the cached launcher of :mod:`.launcher`:

1. ``_expert_hist_kernel``, B programs: ``hist[b, e]`` = slots of chunk b that chose expert e.
2. ``_expert_scan_kernel``, 1 program: ``counts[e] = sum_b hist[b, e]``; padded starts
   ``ps[e] = sum_{e' < e} ceil(counts[e'] / a) * a``; chunk bases
   ``base[b, e] = ps[e] + sum_{b' < b} hist[b', e]``; and ``meta`` (int32 ``[2, E + 1]``):
   ``meta[0] = ps`` with ``ps[E]`` = rows used, ``meta[1] = counts`` with ``counts[E]`` = kept slots.
   For small inputs (``N * K * pow2(E) <= 2**14``) steps 1 and 2 are one launch of
   ``_expert_count_scan_kernel`` (one program, compare-and-count over many chunks at a time):
   the same ``base`` and ``meta``, no ``hist``.
3. ``_permute_kernel``, one program per token n (chunk b): the row of slot (n, k) with expert e
   is ``base[b, e]`` + the number of slots of chunk b before (n, k) with expert e (a compare of
   its K ids with the < C ids of its chunk before it), -1 if it falls at or past M. It writes
   ``row_id_map[n]``, reads the token once and writes it to its K rows. Extra programs zero the
   padding rows: one per expert when ``align_size > 1``, and a few for the rows past ``ps[E]``
   when M may exceed it. No full memset.

Worked example, N=3, K=2, E=3, align 1, one chunk (T >= 3)::

    selected_experts = [[2, 0], [0, -1], [2, 1]]  -> slots e = [2, 0, 0, -1, 2, 1]
    hist = counts = [2, 1, 2]        ps = [0, 2, 3, 5]          base[0] = [0, 2, 3]
    slot 0 (e=2): 3 + 0 = 3    slot 1 (e=0): 0 + 0 = 0    slot 2 (e=0): 0 + 1 = 1
    slot 3: -1                 slot 4 (e=2): 3 + 1 = 4    slot 5 (e=1): 2 + 0 = 2
    row_id_map = [[3, 0], [1, -1], [4, 2]]

Unpermute: ``_unpermute_kernel`` gathers a token's K rows and sums them in fp32 (one program per
token); ``_unpermute_bwd_kernel`` scatters ``grad_out[n] * p[n, k]`` back to the rows and takes
the row-wise dots for the gradient of the weights. Without weights the same kernel is
``permute_by_map``: a permute along a ``row_id_map`` computed elsewhere (all-to-all capacity mode).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launcher import launch, launch_spec_key

__all__ = ["permute", "permute_counted", "unpermute", "unpermute_backward", "permute_by_map"]

_INT32_MAX = 2**31 - 1
# The scan reads its whole table hist [B, E] in one tile of at most this many elements (more
# chunks: it loops over tiles); chunk sizes are picked so that B * E fits.
_SCAN_TILE_ELEMS = 8192
# Slots per chunk: at least this many (fewer, larger histogram programs) ...
_MIN_CHUNK_SLOTS = 64
# ... and at most this many: each token program compares its K ids with up to C ids of its chunk.
_MAX_CHUNK_SLOTS = 1024


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_ids(ptr, mask, E):
    """Expert ids as int32, every id outside ``[0, E)`` (-1, or any out-of-range value, compared
    before the cast so that no int64 id wraps into range) as -1."""
    e = tl.load(ptr, mask=mask, other=-1)
    return tl.where((e >= 0) & (e < E), e.to(tl.int32), -1)


@triton.jit
def _expert_hist_kernel(ids_ptr, work_ptr, S, E, C, BLOCK_C: tl.constexpr, NBINS: tl.constexpr):
    """``hist[b, e]`` (int32 ``[B, E]``, B = the grid) = slots of chunk b (``[b * C, (b + 1) * C)``)
    with expert e; ``hist`` is the workspace's third part (see :func:`_expert_scan_kernel`).

    ``ids``: integer ``[S]``, expert per slot, -1 = dropped. NBINS: power of 2 > E, >= 32.
    """
    b = tl.program_id(0).to(tl.int64)
    hist_ptr = work_ptr + 2 * (E + 1) + tl.num_programs(0).to(tl.int64) * E
    j = tl.arange(0, BLOCK_C)
    offs = b * C + j
    e = _load_ids(ids_ptr + offs, (j < C) & (offs < S), E)
    key = tl.where(e >= 0, e, E)  # dropped slots and slots past the chunk: bin E, not stored
    h = tl.histogram(key, NBINS)
    bins = tl.arange(0, NBINS)
    tl.store(hist_ptr + b * E + bins, h, mask=bins < E)


@triton.jit
def _store_meta(meta_ptr, counts, align, E, ev, emask, M, cnt_ptr, HAS_COUNTS: tl.constexpr):
    """Write ``meta`` (int32 ``[2, E + 1]``) from the per-expert ``counts``, and with
    ``HAS_COUNTS`` the rows each expert fills in an output of M rows, int64 ``[E]`` at
    ``cnt_ptr``: ``min(counts[e], max(M - ps[e], 0))``. Returns the padded starts ``ps``
    ``[BLOCK_E]``."""
    padded = (counts + align - 1) // align * align
    ps = tl.cumsum(padded, axis=0) - padded
    tl.store(meta_ptr + ev, ps, mask=emask)
    tl.store(meta_ptr + E, tl.sum(padded, axis=0))
    tl.store(meta_ptr + (E + 1) + ev, counts, mask=emask)
    tl.store(meta_ptr + (E + 1) + E, tl.sum(counts, axis=0))
    if HAS_COUNTS:
        room = tl.maximum(M - ps.to(tl.int64), 0)
        tl.store(cnt_ptr + ev, tl.minimum(counts.to(tl.int64), room), mask=emask)
    return ps


@triton.jit
def _expert_scan_kernel(
    work_ptr, B, E, align, M, cnt_ptr,
    TB: tl.constexpr, BLOCK_E: tl.constexpr, ONE_TILE: tl.constexpr, HAS_COUNTS: tl.constexpr,
):
    """One program. The int32 workspace ``work`` holds ``meta [2, E + 1] | base [B, E] | hist
    [B, E]``; ``cnt``: int64 ``[E]`` (with ``HAS_COUNTS``, see :func:`_store_meta`).

    Reads ``hist`` in tiles of ``[TB, BLOCK_E]``: once when ``ONE_TILE`` (B <= TB), else twice
    (totals first, then the running prefix over chunks).
    """
    meta_ptr = work_ptr
    base_ptr = work_ptr + 2 * (E + 1)
    hist_ptr = base_ptr + B.to(tl.int64) * E
    ev = tl.arange(0, BLOCK_E)
    emask = ev < E
    rb = tl.arange(0, TB).to(tl.int64)
    if ONE_TILE:
        tile_mask = (rb[:, None] < B) & emask[None, :]
        h = tl.load(hist_ptr + rb[:, None] * E + ev[None, :], mask=tile_mask, other=0)
        counts = tl.sum(h, axis=0)
    else:
        counts = tl.zeros([BLOCK_E], dtype=tl.int32)
        for b0 in range(0, B, TB):
            r = b0 + rb
            m = (r[:, None] < B) & emask[None, :]
            counts += tl.sum(tl.load(hist_ptr + r[:, None] * E + ev[None, :], mask=m, other=0), axis=0)
    ps = _store_meta(meta_ptr, counts, align, E, ev, emask, M, cnt_ptr, HAS_COUNTS)
    if ONE_TILE:
        tl.store(base_ptr + rb[:, None] * E + ev[None, :], ps[None, :] + tl.cumsum(h, axis=0) - h, mask=tile_mask)
    else:
        run = ps
        for b0 in range(0, B, TB):
            r = b0 + rb
            m = (r[:, None] < B) & emask[None, :]
            h = tl.load(hist_ptr + r[:, None] * E + ev[None, :], mask=m, other=0)
            tl.store(base_ptr + r[:, None] * E + ev[None, :], run[None, :] + tl.cumsum(h, axis=0) - h, mask=m)
            run += tl.sum(h, axis=0)


@triton.jit
def _chunk_hist(ids_ptr, chunks, j, S, C, E, ev):
    """``[CPT, BLOCK_E]`` int32: slots with expert ``ev`` in each of ``chunks`` (compare-and-count:
    no histogram op, so many chunks fit in one tile)."""
    offs = chunks[:, None].to(tl.int64) * C + j[None, :]
    e = _load_ids(ids_ptr + offs, (j[None, :] < C) & (offs < S), E)
    hit = (e[:, :, None] == ev[None, None, :]) & (ev < E)[None, None, :]
    return tl.sum(hit.to(tl.int32), axis=1)


@triton.jit
def _expert_count_scan_kernel(
    ids_ptr, work_ptr, S, E, C, B, align, M, cnt_ptr,
    CPT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, HAS_COUNTS: tl.constexpr,
):
    """One program: ``_expert_hist_kernel`` and ``_expert_scan_kernel`` in one launch, for small
    inputs (S * BLOCK_E bounded by the launcher). Same outputs: ``work`` = ``meta`` int32
    ``[2, E + 1]`` | ``base`` int32 ``[B, E]`` (no ``hist``), and ``cnt``. Two passes over the
    ids, ``CPT`` chunks at a time: totals (for the padded starts), then the running prefix over
    chunks."""
    meta_ptr = work_ptr
    base_ptr = work_ptr + 2 * (E + 1)
    ev = tl.arange(0, BLOCK_E)
    emask = ev < E
    cb = tl.arange(0, CPT)
    j = tl.arange(0, BLOCK_C)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for b0 in range(0, B, CPT):
        counts += tl.sum(_chunk_hist(ids_ptr, b0 + cb, j, S, C, E, ev), axis=0)
    ps = _store_meta(meta_ptr, counts, align, E, ev, emask, M, cnt_ptr, HAS_COUNTS)
    run = ps
    for b0 in range(0, B, CPT):
        r = b0 + cb
        h = _chunk_hist(ids_ptr, r, j, S, C, E, ev)
        m = (r[:, None] < B) & emask[None, :]
        tl.store(base_ptr + r[:, None].to(tl.int64) * E + ev[None, :], run[None, :] + tl.cumsum(h, axis=0) - h, mask=m)
        run += tl.sum(h, axis=0)


@triton.jit
def _kept(hm, row):
    """``hm & (row >= 0)`` for a vector mask ``hm`` and a scalar ``row``, spelled with a vector
    compare: Triton's interpreter mistypes ``vector_int1 & scalar_int1``. Same code on the GPU."""
    return hm & ((row + tl.zeros(hm.shape, dtype=row.dtype)) >= 0)


@triton.jit
def _permute_kernel(
    src_ptr, src_stride, ids_ptr, work_ptr, probs_ptr, dst_ptr, dst_probs_ptr, rid_ptr,
    K, E, H, M, n_pad_progs, n_tail_progs,
    HAS_PROBS: tl.constexpr, T: tl.constexpr, RB: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr, ZR: tl.constexpr,
):
    """Rank + copy: ``rid[n, k]`` = row of slot (n, k); ``dst[rid[n, k]] = src[n]``,
    ``dst_probs[rid[n, k]] = probs[n, k]``; padding rows zero.

    Programs ``[0, n_pad_progs)``: expert e's padding rows ``[ps[e] + counts[e], ps[e + 1])``.
    Next ``n_tail_progs``: rows ``[ps[E], M)``, grid-strided. The rest: one token each.
    src ``[N, H]`` (row stride ``src_stride``), ids integer ``[N * K]``, work int32 = meta
    ``[2, E + 1]`` | base ``[B, E]``, probs ``[N, K]``, dst ``[M, H]`` (contiguous), dst_probs
    ``[M]``, rid int64 ``[N, K]``.
    """
    meta_ptr = work_ptr
    base_ptr = work_ptr + 2 * (E + 1)
    dst_stride = H
    pid = tl.program_id(0)
    if pid < n_pad_progs + n_tail_progs:
        # zero rows [lo, hi): tiles of ZR rows at lo, lo + step, ...
        if pid < n_pad_progs:  # expert pid's padding
            lo = tl.load(meta_ptr + pid).to(tl.int64) + tl.load(meta_ptr + (E + 1) + pid)
            hi = tl.minimum(tl.load(meta_ptr + pid + 1).to(tl.int64), M)
            step = pid * 0 + ZR  # (tensors in both branches, even if an int arg is specialized to 1)
        else:  # the rows past the last group, grid-strided over the tail programs
            lo = tl.minimum(tl.load(meta_ptr + E).to(tl.int64), M) + (pid - n_pad_progs) * ZR
            hi = tl.maximum(lo, M)
            step = pid * 0 + n_tail_progs * ZR
        r0 = lo
        while r0 < hi:
            rows = r0 + tl.arange(0, ZR).to(tl.int64)
            rmask = rows < hi
            zero = tl.zeros([ZR, BLOCK_H], dtype=dst_ptr.dtype.element_ty)
            for h0 in range(0, H, BLOCK_H):
                h = h0 + tl.arange(0, BLOCK_H)
                tl.store(dst_ptr + rows[:, None] * dst_stride + h[None, :], zero, mask=rmask[:, None] & (h[None, :] < H))
            if HAS_PROBS:
                tl.store(dst_probs_ptr + rows, tl.zeros([ZR], dtype=dst_probs_ptr.dtype.element_ty), mask=rmask)
            r0 += step
    else:
        n = (pid - n_pad_progs - n_tail_progs).to(tl.int64)
        src = src_ptr + n * src_stride
        h = tl.arange(0, BLOCK_H)
        x = tl.load(src + h, mask=h < H)  # issued first: its latency overlaps the rank below
        b = n // T
        k = tl.arange(0, BLOCK_K)
        slot = n * K + k
        e = _load_ids(ids_ptr + slot, k < K, E)
        valid = e >= 0
        base = tl.load(base_ptr + b * E + e, mask=valid, other=0)
        # rank of each of the token's slots among the slots of its chunk with the same expert
        # (positions inside the chunk in int32; only the ids before this token, RB at a time: a
        # runtime loop keeps registers, hence occupancy, independent of the chunk size)
        chunk_ids = ids_ptr + b * T * K
        first = ((n % T) * K).to(tl.int32)
        mine = first + k
        rank = tl.zeros([BLOCK_K], dtype=tl.int32)
        j0 = 0
        while j0 < first + K:
            j = j0 + tl.arange(0, RB)
            ej = _load_ids(chunk_ids + j, j < first + K, E)
            hit = (ej[None, :] == e[:, None]) & (j[None, :] < mine[:, None])
            rank += tl.sum(hit.to(tl.int32), axis=1)
            j0 += RB
        row = (base + rank).to(tl.int64)
        keep = valid & (row < M)
        row = tl.where(keep, row, -1)
        tl.store(rid_ptr + slot, row, mask=k < K)
        if HAS_PROBS:
            tl.store(dst_probs_ptr + row, tl.load(probs_ptr + slot, mask=keep), mask=keep)
        dst = dst_ptr + row[:, None] * dst_stride
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            x_next = tl.load(src + h + BLOCK_H, mask=h + BLOCK_H < H)  # one chunk ahead
            tl.store(dst + h[None, :], tl.broadcast_to(x[None, :], [BLOCK_K, BLOCK_H]), mask=keep[:, None] & (h[None, :] < H))
            x = x_next


@triton.jit
def _unpermute_kernel(
    src_ptr, src_stride, rid_ptr, probs_ptr, dst_ptr, K, H,
    HAS_PROBS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``dst[n] = sum_k probs[n, k] * src[rid[n, k]]`` over kept slots, in fp32; one token per program.

    src ``[M, H]`` (row stride ``src_stride``), rid int64 ``[N, K]``, probs ``[N, K]``, dst ``[N, H]``
    (contiguous).
    """
    n = tl.program_id(0).to(tl.int64)
    dst_stride = H
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hm = h < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for kk in tl.static_range(BLOCK_K):
            row = tl.load(rid_ptr + n * K + kk, mask=kk < K, other=-1)
            x = tl.load(src_ptr + row * src_stride + h, mask=_kept(hm, row), other=0).to(tl.float32)
            if HAS_PROBS:
                x = x * tl.load(probs_ptr + n * K + kk, mask=row >= 0, other=0).to(tl.float32)
            acc += x
        tl.store(dst_ptr + n * dst_stride + h, acc.to(dst_ptr.dtype.element_ty), mask=hm)


@triton.jit
def _unpermute_bwd_kernel(
    g_ptr, g_stride, rid_ptr, probs_ptr, used_ptr, x_ptr, x_stride, dx_ptr, dx_stride, dprobs_ptr,
    K, H, M, n_zero_progs,
    HAS_PROBS: tl.constexpr, PROBS_GRAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    ZB: tl.constexpr, ZR: tl.constexpr,
):
    """Backward of ``_unpermute_kernel``: ``dx[rid[n, k]] = g[n] * probs[n, k]`` (rows no slot maps
    to: zero) and ``dprobs[n, k] = <g[n], x[rid[n, k]]>`` in fp32 (0 for dropped slots).

    Programs ``[0, n_zero_progs)`` zero the unused rows among ``[ZB * pid, ZB * (pid + 1))``
    (``used``: int8 ``[M + 1]``, nonzero where some slot maps); the rest: one token each.
    g ``[N, H]``, rid int64 ``[N, K]``, probs ``[N, K]``, x and dx ``[M, H]``, dprobs ``[N, K]``.
    """
    pid = tl.program_id(0)
    if pid < n_zero_progs:
        r = pid.to(tl.int64) * ZB + tl.arange(0, ZB)
        unused = tl.load(used_ptr + r, mask=r < M, other=1) == 0
        if tl.max(unused.to(tl.int32), axis=0) > 0:
            for r0 in range(0, ZB, ZR):
                rows = pid.to(tl.int64) * ZB + r0 + tl.arange(0, ZR)
                rz = tl.load(used_ptr + rows, mask=rows < M, other=1) == 0
                zero = tl.zeros([ZR, BLOCK_H], dtype=dx_ptr.dtype.element_ty)
                for h0 in range(0, H, BLOCK_H):
                    h = h0 + tl.arange(0, BLOCK_H)
                    tl.store(dx_ptr + rows[:, None] * dx_stride + h[None, :], zero, mask=rz[:, None] & (h[None, :] < H))
    else:
        n = (pid - n_zero_progs).to(tl.int64)
        k = tl.arange(0, BLOCK_K)
        row = tl.load(rid_ptr + n * K + k, mask=k < K, other=-1)
        keep = row >= 0
        if HAS_PROBS:
            w = tl.load(probs_ptr + n * K + k, mask=keep, other=0).to(tl.float32)
        if PROBS_GRAD:
            dot = tl.zeros([BLOCK_K], dtype=tl.float32)
        dx_rows = dx_ptr + row[:, None] * dx_stride
        x_rows = x_ptr + row[:, None] * x_stride
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            hm = h < H
            m = keep[:, None] & hm[None, :]
            g = tl.load(g_ptr + n * g_stride + h, mask=hm, other=0).to(tl.float32)
            if HAS_PROBS:
                dx = g[None, :] * w[:, None]
            else:
                dx = tl.broadcast_to(g[None, :], [BLOCK_K, BLOCK_H])
            tl.store(dx_rows + h[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
            if PROBS_GRAD:
                x = tl.load(x_rows + h[None, :], mask=m, other=0).to(tl.float32)
                dot += tl.sum(x * g[None, :], axis=1)
        if PROBS_GRAD:
            tl.store(dprobs_ptr + n * K + k, dot.to(dprobs_ptr.dtype.element_ty), mask=k < K)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a jit function: microseconds per call on the host


def _pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def _row_block(hidden: int, elem_bytes: int, rows_in_flight: int, max_row_bytes: int, max_tile_elems: int) -> tuple[int, int]:
    """``(BLOCK_H, num_warps)`` for kernels that move rows of ``hidden`` elements: 16-byte vectors
    per thread, at most ``max_row_bytes`` per row chunk and ``rows_in_flight * BLOCK_H <=
    max_tile_elems`` elements per program and step, up to 4 warps (one program per token gives
    thousands of programs: occupancy comes from many programs, not from wide ones)."""
    vec = max(1, 16 // elem_bytes)
    block_h = min(_pow2(hidden), max(vec * 32, min(max_row_bytes // elem_bytes, max_tile_elems // rows_in_flight)))
    num_warps = max(1, min(4, block_h // (vec * 32)))
    return block_h, num_warps


def _chunk_tokens(num_tokens: int, topk: int, num_experts: int) -> int:
    """Tokens per sort chunk (a power of 2): few enough chunks that the scan reads hist [B, E] in
    one tile, at least ``_MIN_CHUNK_SLOTS`` and at most ``_MAX_CHUNK_SLOTS`` slots per chunk."""
    k2 = _pow2(topk)
    one_tile = _pow2(_cdiv(num_tokens * _pow2(num_experts), _SCAN_TILE_ELEMS))
    lo, hi = max(1, _MIN_CHUNK_SLOTS // k2), max(1, _MAX_CHUNK_SLOTS // k2)
    return min(max(one_tile, lo), hi)


# The one-launch count + scan (``_expert_count_scan_kernel``, one program) takes inputs with at
# most this many slot x expert-bin compares per pass; larger ones take the B-program histogram
# and the scan kernel (two launches), where one program would serialise too much work (on an
# H200 at 2**16 compares, T=4096 top-2 of 8, the one program cost ~30 us: more than a launch).
_FUSED_COUNT_MAX = 2**14
# compares per step of the fused kernel's loop (8 warps: 32 per thread)
_FUSED_COUNT_TILE = 2**13


@functools.lru_cache(maxsize=4096)
def _permute_plan(num_tokens, topk, num_experts, hidden, elem_bytes, align_size, num_out_rows, has_probs,
                  chunk_tokens, scan_tile, has_counts=False):
    """Grid sizes, constexprs and launch spec keys of one permute, cached on the shapes: a permute
    call then does no launch-parameter arithmetic in Python. ``num_out_rows`` None: the kernels
    run on the largest size the routing can need (``plan["rows"]``); the exact one is read after."""
    num_slots = num_tokens * topk
    block_e = _pow2(num_experts)
    fused = num_slots * block_e <= _FUSED_COUNT_MAX and chunk_tokens is None and scan_tile is None
    if fused:
        chunk_tokens = max(1, _MIN_CHUNK_SLOTS // _pow2(topk))
    chunk_tokens = chunk_tokens or _chunk_tokens(num_tokens, topk, num_experts)
    num_chunks = _cdiv(num_tokens, chunk_tokens)
    chunk = chunk_tokens * topk
    table = num_chunks * num_experts
    plan = {"num_chunks": num_chunks, "chunk": chunk, "fused": fused,
            # one int32 workspace: meta [2, E + 1] | base [B, E] (| hist [B, E] on the three-kernel path)
            "work": 2 * (num_experts + 1) + table * (1 if fused else 2)}
    if fused:
        block_c = _pow2(chunk)
        plan["count"] = dict(CPT=max(1, min(_pow2(num_chunks), _FUSED_COUNT_TILE // (block_c * block_e))),
                             BLOCK_C=block_c, BLOCK_E=block_e, HAS_COUNTS=has_counts)
        plan["count_warps"] = 8
        plan["count_key"] = launch_spec_key(plan["count"], 8)
    else:
        hist_block = max(32, _pow2(chunk))  # >= one warp: no replicated elements in the histogram
        plan["hist"] = dict(BLOCK_C=hist_block, NBINS=max(32, _pow2(num_experts + 1)))
        plan["hist_warps"] = max(1, min(4, hist_block // 32))
        plan["hist_key"] = launch_spec_key(plan["hist"], plan["hist_warps"])
        tile = scan_tile or max(1, min(_pow2(num_chunks), _SCAN_TILE_ELEMS // block_e))
        plan["scan"] = dict(TB=tile, BLOCK_E=block_e, ONE_TILE=num_chunks <= tile, HAS_COUNTS=has_counts)
        plan["scan_warps"] = max(1, min(8, tile * block_e // 1024))  # <= 32 table entries per thread: no spills
        plan["scan_key"] = launch_spec_key(plan["scan"], plan["scan_warps"])
    block_k = _pow2(topk)
    block_h, num_warps = _row_block(hidden, elem_bytes, block_k, 4096, 16384)
    zero_rows = min(64, max(1, 8192 // block_h))
    plan["n_pad"] = num_experts if align_size > 1 else 0
    plan["zero_rows"] = zero_rows
    exact = num_out_rows is None
    plan["rows"] = num_slots + (num_experts * (align_size - 1) if align_size > 1 else 0) if exact else num_out_rows
    plan["n_tail"] = 0 if exact else min(_cdiv(num_out_rows, zero_rows), 128)
    plan["grid"] = plan["n_pad"] + plan["n_tail"] + num_tokens
    plan["permute"] = dict(HAS_PROBS=has_probs, T=chunk_tokens, RB=min(_pow2(chunk), max(32, 1024 // block_k)),
                           BLOCK_K=block_k, BLOCK_H=block_h, ZR=zero_rows)  # RB: compare tiles [BLOCK_K, RB] <= 1024 ids
    plan["permute_warps"] = num_warps
    plan["permute_key"] = launch_spec_key(plan["permute"], num_warps)
    return plan


def permute(
    tokens: torch.Tensor,
    selected_experts: torch.Tensor,
    num_experts: int,
    probs: torch.Tensor | None,
    align_size: int,
    num_out_rows: int | None,
    *,
    chunk_tokens: int | None = None,
    scan_tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`permute_counted` without ``tokens_per_expert``: ``(permuted [M, H], permuted_probs
    [M] or None, row_id_map int64 [N, K])``. No host sync when ``num_out_rows`` is given."""
    permuted, permuted_probs, row_id_map, _ = _permute(tokens, selected_experts, num_experts, probs, align_size,
                                                       num_out_rows, chunk_tokens, scan_tile, False)
    return permuted, permuted_probs, row_id_map


def permute_counted(
    tokens: torch.Tensor,
    selected_experts: torch.Tensor,
    num_experts: int,
    probs: torch.Tensor | None,
    align_size: int,
    num_out_rows: int | None,
    *,
    chunk_tokens: int | None = None,
    scan_tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Sort the (token, k) slots by expert and copy each token to its rows. Two kernels (three
    for large inputs); no host sync when ``num_out_rows`` is given.

    Args:
        tokens: ``[N, H]`` floating point (any row stride).
        selected_experts: integer ``[N, K]``; ids outside ``[0, E)`` (-1, or any other) are dropped.
        num_experts: E.
        probs: ``[N, K]`` floating point, or None.
        align_size: each expert's group of rows starts at a multiple of this (padding rows zero).
        num_out_rows: M; slots whose row would be ``>= M`` get -1, rows past the last group are
            zero. None: exactly the rows needed (one host sync).
        chunk_tokens, scan_tile: powers of 2 overriding the tokens per sort chunk and the chunks
            per scan tile (tests use them to reach the many-chunk / many-tile paths when small;
            either one selects the three-kernel path).

    Returns:
        ``(permuted [M, H] in tokens' dtype, permuted_probs [M] in probs' dtype or None,
        row_id_map int64 [N, K], tokens_per_expert int64 [E])``, on ``tokens.device``.
        ``tokens_per_expert[e]``: the rows of expert e that are filled, ``min(slots of e,
        max(M - start of e, 0))`` -- all its slots when M is at least what the routing needs
        (always when ``num_out_rows`` is None or ``>= N * K + E * (align_size - 1)``). Written
        by the count kernel: no extra launch.
    """
    return _permute(tokens, selected_experts, num_experts, probs, align_size, num_out_rows, chunk_tokens, scan_tile,
                    True)


def _permute(tokens, selected_experts, num_experts, probs, align_size, num_out_rows, chunk_tokens, scan_tile, counts):
    """:func:`permute_counted`; ``tokens_per_expert`` None (not written) unless ``counts``."""
    num_tokens, hidden = tokens.shape
    topk = selected_experts.shape[1]
    num_slots = num_tokens * topk
    device = tokens.device
    if num_slots + num_experts * (align_size - 1) > _INT32_MAX:
        raise ValueError(
            f"the triton permute backend needs N*K + E*(align_size-1) < 2**31, got N*K={num_slots}, "
            f"E={num_experts}, align_size={align_size}"
        )
    plan = _permute_plan(num_tokens, topk, num_experts, hidden, tokens.element_size(), align_size, num_out_rows,
                         probs is not None, chunk_tokens, scan_tile, counts)
    rows = plan["rows"]
    # The kernels index the ids as a flat [N * K]: a contiguous [N, K] tensor is that already.
    ids = selected_experts if selected_experts.is_contiguous() else selected_experts.contiguous()
    row_id_map = torch.empty(num_tokens, topk, dtype=torch.int64, device=device)
    work = torch.empty(plan["work"], dtype=torch.int32, device=device)
    tokens_per_expert = torch.empty(num_experts, dtype=torch.int64, device=device) if counts else None
    cnt = work if tokens_per_expert is None else tokens_per_expert  # never written without HAS_COUNTS
    if plan["fused"]:
        launch(_expert_count_scan_kernel, (1,), (ids, work, num_slots, num_experts, plan["chunk"], plan["num_chunks"],
                                                 align_size, rows, cnt),
               plan["count"], plan["count_warps"], plan["count_key"])
    elif num_slots == 0:
        work.zero_()
        if tokens_per_expert is not None:
            tokens_per_expert.zero_()
    else:
        num_chunks = plan["num_chunks"]
        launch(_expert_hist_kernel, (num_chunks,), (ids, work, num_slots, num_experts, plan["chunk"]), plan["hist"],
               plan["hist_warps"], plan["hist_key"])
        launch(_expert_scan_kernel, (1,), (work, num_chunks, num_experts, align_size, rows, cnt), plan["scan"],
               plan["scan_warps"], plan["scan_key"])
    if hidden > 0 and tokens.stride(1) != 1:
        tokens = tokens.contiguous()
    permuted = torch.empty(rows, hidden, dtype=tokens.dtype, device=device)
    permuted_probs = None if probs is None else torch.empty(rows, dtype=probs.dtype, device=device)
    if plan["grid"] > 0:
        launch(_permute_kernel, (plan["grid"],), (
            tokens, tokens.stride(0), ids, work, permuted if probs is None else probs.contiguous(), permuted,
            permuted if permuted_probs is None else permuted_probs, row_id_map,
            topk, num_experts, hidden, rows, plan["n_pad"], plan["n_tail"],
        ), plan["permute"], plan["permute_warps"], plan["permute_key"])
    if num_out_rows is None:
        used = int(work[num_experts])  # host sync: the output size depends on the routing (meta[0, E])
        permuted = permuted[:used]
        permuted_probs = None if permuted_probs is None else permuted_probs[:used]
    return permuted, permuted_probs, row_id_map, tokens_per_expert


@functools.lru_cache(maxsize=4096)
def _row_plan(topk: int, hidden: int, elem_bytes: int, max_row_bytes: int, max_tile_elems: int):
    block_k = _pow2(topk)
    return (block_k,) + _row_block(hidden, elem_bytes, block_k, max_row_bytes, max_tile_elems)


@functools.lru_cache(maxsize=4096)
def _unpermute_plan(topk: int, hidden: int, elem_bytes: int, has_probs: bool):
    """``(constexprs, num_warps, spec key)`` of one unpermute."""
    block_k, block_h, num_warps = _row_plan(topk, hidden, elem_bytes, 8192, 8192)
    constexprs = dict(HAS_PROBS=has_probs, BLOCK_K=block_k, BLOCK_H=block_h)
    return constexprs, num_warps, launch_spec_key(constexprs, num_warps)


def unpermute(permuted: torch.Tensor, row_id_map: torch.Tensor, merging_probs: torch.Tensor | None) -> torch.Tensor:
    """``out[n] = sum_k merging_probs[n, k] * permuted[row_id_map[n, k]]`` over kept slots, in fp32.

    Args:
        permuted: ``[M, H]`` floating point (any row stride).
        row_id_map: int64 ``[N, K]``.
        merging_probs: ``[N, K]`` floating point, or None (weights 1).

    Returns:
        ``[N, H]`` in ``permuted``'s dtype.
    """
    num_tokens, topk = row_id_map.shape
    hidden = permuted.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=permuted.dtype, device=permuted.device)
    if num_tokens == 0:
        return out
    if hidden > 0 and permuted.stride(1) != 1:
        permuted = permuted.contiguous()
    constexprs, num_warps, spec_key = _unpermute_plan(topk, hidden, permuted.element_size(), merging_probs is not None)
    launch(_unpermute_kernel, (num_tokens,), (
        permuted, permuted.stride(0), row_id_map.contiguous(),
        out if merging_probs is None else merging_probs.contiguous(), out, topk, hidden,
    ), constexprs, num_warps, spec_key)
    return out


def unpermute_backward(
    grad_out: torch.Tensor,
    permuted: torch.Tensor,
    row_id_map: torch.Tensor,
    merging_probs: torch.Tensor | None,
    probs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`unpermute`. No host sync.

    Args:
        grad_out: ``[N, H]``.
        permuted: ``[M, H]`` (read only when ``probs_grad``).
        row_id_map: int64 ``[N, K]``.
        merging_probs: ``[N, K]`` or None.
        probs_grad: compute the gradient of ``merging_probs`` (needs it not None).

    Returns:
        ``(grad_permuted [M, H] in permuted's dtype, zero on rows no slot maps to;
        grad_merging_probs [N, K] in merging_probs' dtype, or None)``.
    """
    return _scatter_rows(grad_out, permuted, permuted.shape[0], row_id_map, merging_probs, probs_grad)


def permute_by_map(tokens: torch.Tensor, row_id_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``out[row_id_map[n, k]] = tokens[n]`` for kept slots; rows no slot maps to are zero.

    Args:
        tokens: ``[N, H]`` floating point (any row stride).
        row_id_map: int64 ``[N, K]``, rows in ``[0, num_rows)`` or -1, each row used at most once.
        num_rows: M.

    Returns:
        ``[M, H]`` in tokens' dtype. (The kernel of :func:`unpermute_backward` without weights.)
    """
    return _scatter_rows(tokens, None, num_rows, row_id_map, None, False)[0]


def _scatter_rows(grad_out, permuted, num_rows, row_id_map, merging_probs, probs_grad):
    """``unpermute_backward``; ``permuted`` None (no weights' gradient): output in grad_out's dtype."""
    num_tokens, topk = row_id_map.shape
    hidden = grad_out.shape[1]
    device = grad_out.device
    if permuted is not None and hidden > 0 and permuted.stride(1) != 1:
        permuted = permuted.contiguous()
    if hidden > 0 and grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    out_dtype = grad_out.dtype if permuted is None else permuted.dtype
    grad_permuted = torch.empty(num_rows, hidden, dtype=out_dtype, device=device)
    if permuted is None:
        permuted = grad_permuted  # never read without PROBS_GRAD: a pointer and a row stride
    grad_probs = torch.empty(num_tokens, topk, dtype=merging_probs.dtype, device=device) if probs_grad else None
    rid = row_id_map.contiguous()
    used = torch.zeros(num_rows + 1, dtype=torch.int8, device=device)
    used.index_fill_(0, torch.where(rid >= 0, rid, num_rows).reshape(-1), 1)  # slot rows; -1 -> row M
    constexprs, num_warps, spec_key = _scatter_plan(topk, hidden, grad_permuted.element_size(),
                                                    merging_probs is not None, probs_grad)
    n_zero = _cdiv(num_rows, _ZERO_BLOCK)
    grid = n_zero + num_tokens
    if grid == 0:
        return grad_permuted, grad_probs
    launch(_unpermute_bwd_kernel, (grid,), (
        grad_out, grad_out.stride(0), rid, grad_permuted if merging_probs is None else merging_probs.contiguous(),
        used, permuted, permuted.stride(0), grad_permuted, grad_permuted.stride(0),
        grad_permuted if grad_probs is None else grad_probs,
        topk, hidden, num_rows, n_zero,
    ), constexprs, num_warps, spec_key)
    return grad_permuted, grad_probs


_ZERO_BLOCK = 128  # rows per zeroing program of _unpermute_bwd_kernel


@functools.lru_cache(maxsize=4096)
def _scatter_plan(topk: int, hidden: int, elem_bytes: int, has_probs: bool, probs_grad: bool):
    """``(constexprs, num_warps, spec key)`` of one ``_unpermute_bwd_kernel`` launch."""
    block_k, block_h, num_warps = _row_plan(topk, hidden, elem_bytes, 4096, 8192)
    zero_rows = min(64, max(1, 8192 // block_h))
    constexprs = dict(HAS_PROBS=has_probs, PROBS_GRAD=probs_grad, BLOCK_K=block_k, BLOCK_H=block_h,
                      ZB=_ZERO_BLOCK, ZR=min(zero_rows, _ZERO_BLOCK))
    return constexprs, num_warps, launch_spec_key(constexprs, num_warps)
