"""Combine (and the backward of dispatch): weighted reduce at the receiver, sum at the sender."""
from __future__ import annotations

import triton
import triton.language as tl

from .sync import (CTL_WIDTH, ROW_NUM_TOKENS, SNAP_MAX_TOKENS, _col, _free_chunk_from_all, _kernel_setup, _num_chunks,
                   _pick8, _recv_item, _staged_meta, _staged_range, _token_tile, _wait_chunk_from_all, _wait_flags,
                   _weighted_rows)


@triton.jit
def _reduce_chunk(
    y_ptr, recv_rows_ptr, recv_w_ptr, recv_chunk_ptr, comb, flag, s, c, H, me, S, S_rows,
    K: tl.constexpr, K_PAD: tl.constexpr, NCHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    USE_W: tl.constexpr,
):
    """Combine's send role for chunk c staged here by rank s: the weighted sum over this rank's
    slots of each staged token, into s's comb buffer at ``[me, j]``; then raise the flag."""
    ar_t = tl.arange(0, BLOCK_T)
    ar_k = tl.arange(0, K_PAD)
    ar_h = tl.arange(0, BLOCK_H)
    mk = ar_k < K
    first, stop = _staged_range(recv_chunk_ptr, s, c, NCHUNK)
    for j0 in range(first, stop, BLOCK_T):
        j, mj, m2 = _token_tile(j0, stop, ar_t, mk)
        rows2, w2 = _staged_meta(recv_rows_ptr, recv_w_ptr, s, S_rows, j, m2, ar_k, K, USE_W)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + ar_h
            mh = cols < H
            acc = _weighted_rows(y_ptr, rows2, w2, ar_k, cols, mh, H, K, BLOCK_T, BLOCK_H)
            tl.store(comb + (me * S + j)[:, None] * H + cols[None, :], acc.to(comb.dtype.element_ty),
                     mask=mj[:, None] & mh[None, :])
    tl.debug_barrier()
    tl.atomic_xchg(flag, 1, sem="release", scope="sys")


@triton.jit(do_not_specialize=["me", "N", "S", "S_rows", "n_send", "n_recv", "max_spins"])
def _combine_kernel(
    y_ptr, out_ptr, w_ptr, local_rows_ptr, slot_ptr, snap_ptr,
    recv_rows_ptr, recv_w_ptr, recv_chunk_ptr, status_ptr,
    cb0, cb1, cb2, cb3, cb4, cb5, cb6, cb7,   # peers' comb rows [P, S, H] (out dtype)
    cc0, cc1, cc2, cc3, cc4, cc5, cc6, cc7,   # peers' comb ctl [P, C, 4]
    cb_self, cc_self,
    N, H, E, CS, me, S, S_rows, n_send, n_recv, max_spins,
    P: tl.constexpr, P_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, NCHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, USE_W: tl.constexpr,
):
    """``out[n] = sum_k w[n, k] * y[row(n, k)]`` in fp32 (``w = 1`` without USE_W: the backward
    of dispatch). Send role, per (chunk, source s) of tokens staged here: the fp32 weighted sum
    over this rank's slots of each staged token, rounded to out's dtype, into s's comb buffer at
    ``[me, j]``. Receive role, per chunk of own tokens: the local slots' sum, then (after the
    chunk's flags from every other rank) plus the partial sums the other ranks sent back."""
    pid, misc, chunk_t, ar_t, ar_k, ar_p, ar_h, mk = _kernel_setup(snap_ptr, P, CS, E, K, BLOCK_T, K_PAD, P_PAD, BLOCK_H)
    if pid < n_send:
        max_n = tl.load(snap_ptr + misc + SNAP_MAX_TOKENS)
        nch_max = _num_chunks(max_n, chunk_t)
        ar_c = tl.arange(0, BLOCK_C)
        for r in tl.static_range(P):
            if r != me:
                # credits of the items of this program for source r: chunks c with
                # (c * P + r) % n_send == pid, a vector of them per round trip
                ctl_r = _pick8(r, cc0, cc1, cc2, cc3, cc4, cc5, cc6, cc7) + me * NCHUNK * CTL_WIDTH
                n_r = tl.load(snap_ptr + r * CS + E + P + ROW_NUM_TOKENS)
                nch_r = _num_chunks(n_r, chunk_t)
                for c0 in range(0, nch_r, BLOCK_C):
                    cs = c0 + ar_c
                    _wait_flags(ctl_r, cs * CTL_WIDTH, (cs < nch_r) & ((cs * P + r) % n_send == pid), 0, status_ptr, max_spins)
        for item in range(pid, P * nch_max, n_send):
            c, s, live = _recv_item(item, snap_ptr, me, CS, E, chunk_t, P)
            # one copy of the body per source rank, so the peer pointer is picked at compile time
            # (keeps Triton's 16-byte alignment facts, hence vector stores over NVLink)
            for sr in tl.static_range(P):
                if sr != me:
                    if live & (s == sr):
                        _reduce_chunk(
                            y_ptr, recv_rows_ptr, recv_w_ptr, recv_chunk_ptr,
                            _pick8(sr, cb0, cb1, cb2, cb3, cb4, cb5, cb6, cb7),
                            _pick8(sr, cc0, cc1, cc2, cc3, cc4, cc5, cc6, cc7) + (me * NCHUNK + c) * CTL_WIDTH,
                            sr, c, H, me, S, S_rows, K, K_PAD, NCHUNK, BLOCK_T, BLOCK_H, USE_W)
    else:
        for c in range(pid - n_send, _num_chunks(N, chunk_t), n_recv):
            t_lo, t_hi = _wait_chunk_from_all(cc_self, c, chunk_t, N, ar_p, me, status_ptr, max_spins, P, NCHUNK)
            for t0 in range(t_lo, t_hi, BLOCK_T):
                tk, mt, m2 = _token_tile(t0, t_hi, ar_t, mk)
                loc2 = tl.load(local_rows_ptr + tk[:, None] * K + ar_k[None, :], mask=m2, other=-1)
                if USE_W:
                    w2 = tl.load(w_ptr + tk[:, None] * K + ar_k[None, :], mask=m2, other=0.0).to(tl.float32)
                else:
                    w2 = tl.where(m2, 1.0, 0.0)
                slots2 = tl.load(slot_ptr + tk[:, None] * P + ar_p[None, :], mask=mt[:, None] & (ar_p < P)[None, :],
                                 other=-1)
                for h0 in range(0, H, BLOCK_H):
                    cols = h0 + ar_h
                    mh = cols < H
                    acc = _weighted_rows(y_ptr, loc2, w2, ar_k, cols, mh, H, K, BLOCK_T, BLOCK_H)
                    for r in tl.static_range(P):
                        if r != me:
                            j = _col(slots2, ar_p, r)
                            ok = (j >= 0)[:, None] & mh[None, :]
                            part = tl.load(cb_self + (r * S + j).to(tl.int64)[:, None] * H + cols[None, :], mask=ok,
                                           other=0.0, cache_modifier=".cg")
                            acc += part.to(tl.float32)
                    tl.store(out_ptr + tk[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                             mask=mt[:, None] & mh[None, :])
            _free_chunk_from_all(cc_self, c, ar_p, me, P, NCHUNK)

