"""Dispatch: push each token once per destination rank, expand at the receiver."""
from __future__ import annotations

import triton
import triton.language as tl

from .sync import (CTL_COUNT, CTL_FIRST, CTL_WIDTH, _BIG, _chunk_range, _col, _kernel_setup, _pick8, _publish_chunk,
                   _recv_item, _recv_items, _stage_tile, _token_tile, _wait_send_credits, _wait_staged)


@triton.jit(do_not_specialize=["me", "N", "S", "S_rows", "row_limit", "n_send", "n_recv", "max_spins"])
def _dispatch_kernel(
    x_ptr, sel_ptr, w_ptr, rank_ptr, slot_ptr, snap_ptr,
    out_ptr, local_rows_ptr, recv_rows_ptr, recv_w_ptr, recv_chunk_ptr, status_ptr,
    st0, st1, st2, st3, st4, st5, st6, st7,   # peers' stage rows [P, S, H]
    sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7,   # peers' stage meta [P, S, 2K]
    sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7,   # peers' stage ctl [P, C, 4]
    st_self, sm_self, sc_self,
    N, H, E, L, CS, me, S, S_rows, row_limit, n_send, n_recv, max_spins,
    P: tl.constexpr, P_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, NCHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Send role (programs < n_send), per chunk of this rank's tokens: compute each slot's row at
    its destination (``base[e] + rank``), write ``local_rows``, copy local slots straight into
    ``out`` (= expert_input) and each token once into every remote destination's stage (+ meta),
    then publish the chunk. Receive role: per (chunk, source), wait for the chunk, copy its
    meta into ``recv_rows``/``recv_w``/``recv_chunk`` (combine needs them after the staging
    buffers are reused) and each staged row into its rows of ``out``, then free the chunk."""
    pid, misc, chunk_t, ar_t, ar_k, ar_p, ar_h, mk = _kernel_setup(snap_ptr, P, CS, E, K, BLOCK_T, K_PAD, P_PAD, BLOCK_H)
    if pid < n_send:
        nch = _wait_send_credits(sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7, me, pid, N, chunk_t, n_send, status_ptr,
                                 max_spins, P, NCHUNK, BLOCK_C)
        for c in range(pid, nch, n_send):
            cnt_v = tl.zeros([P_PAD], dtype=tl.int32)   # tokens of the chunk sent to each rank
            first_v = tl.full([P_PAD], _BIG, dtype=tl.int32)  # and the first slot j at each
            t_lo, t_hi = _chunk_range(c, chunk_t, N)
            for t0 in range(t_lo, t_hi, BLOCK_T):
                tk, mt, m2 = _token_tile(t0, t_hi, ar_t, mk)
                e2 = tl.load(sel_ptr + tk[:, None] * K + ar_k[None, :], mask=m2, other=-1)
                v2 = m2 & (e2 >= 0) & (e2 < E)
                ei = tl.where(v2, e2, 0).to(tl.int32)
                rk = tl.load(rank_ptr + tk[:, None] * K + ar_k[None, :], mask=v2, other=0)
                b2 = tl.load(snap_ptr + P * CS + ei,  # wire.SnapLayout.base
                              mask=v2, other=0)
                # rows past row_limit (capacity mode: only with repeated experts in a token) are dropped
                v2 = v2 & (b2 + rk < row_limit)
                row2 = tl.where(v2, b2 + rk, -1)
                dst2 = tl.where(v2, ei // L, -1)
                w2 = tl.load(w_ptr + tk[:, None] * K + ar_k[None, :], mask=m2, other=0.0).to(tl.float32)
                loc2 = tl.where(dst2 == me, row2, -1)
                tl.store(local_rows_ptr + tk[:, None] * K + ar_k[None, :], loc2, mask=m2)
                slots2 = tl.load(slot_ptr + tk[:, None] * P + ar_p[None, :], mask=mt[:, None] & (ar_p < P)[None, :],
                                 other=-1)
                sent = slots2 >= 0
                cnt_v += tl.sum(sent.to(tl.int32), axis=0)
                first_v = tl.minimum(first_v, tl.min(tl.where(sent, slots2, _BIG), axis=0))
                for r in tl.static_range(P):
                    if r != me:
                        j = _col(slots2, ar_p, r)
                        meta = _pick8(r, sm0, sm1, sm2, sm3, sm4, sm5, sm6, sm7)
                        mrow = meta + (me * S + j).to(tl.int64)[:, None] * (2 * K) + ar_k[None, :]
                        mm = (j >= 0)[:, None] & mk[None, :]
                        tl.store(mrow, tl.where(dst2 == r, row2, -1), mask=mm)
                        tl.store(mrow + K, w2.to(tl.int32, bitcast=True), mask=mm)
                for h0 in range(0, H, BLOCK_H):
                    cols = h0 + ar_h
                    mh = cols < H
                    xt = tl.load(x_ptr + tk[:, None] * H + cols[None, :], mask=mt[:, None] & mh[None, :])
                    _stage_tile(st0, st1, st2, st3, st4, st5, st6, st7, xt, slots2, ar_p, cols, mh, me, S, H, P)
                    for k in tl.static_range(K):
                        rowk = _col(loc2, ar_k, k)
                        tl.store(out_ptr + rowk.to(tl.int64)[:, None] * H + cols[None, :], xt,
                                 mask=(rowk >= 0)[:, None] & mh[None, :])
            tl.debug_barrier()
            for r in tl.static_range(P):
                if r != me:
                    ctl = _pick8(r, sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7) + (me * NCHUNK + c) * CTL_WIDTH
                    cnt_r = tl.sum(tl.where(ar_p == r, cnt_v, 0), axis=0)
                    first_r = tl.sum(tl.where(ar_p == r, first_v, 0), axis=0)
                    tl.store(ctl + CTL_FIRST, tl.where(cnt_r > 0, first_r, 0))
                    tl.store(ctl + CTL_COUNT, cnt_r)
            _publish_chunk(sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7, me, c, P, NCHUNK)
    else:
        for item in range(pid - n_send, _recv_items(snap_ptr, misc, chunk_t, P), n_recv):
            c, s, live = _recv_item(item, snap_ptr, me, CS, E, chunk_t, P)
            if live:
                ctl = _wait_staged(sc_self, s, c, status_ptr, max_spins, NCHUNK)
                first = tl.load(ctl + CTL_FIRST, cache_modifier=".cg")
                cnt = tl.load(ctl + CTL_COUNT, cache_modifier=".cg")
                tl.store(recv_chunk_ptr + (s * NCHUNK + c) * 2, first)
                tl.store(recv_chunk_ptr + (s * NCHUNK + c) * 2 + 1, cnt)
                for j0 in range(first, first + cnt, BLOCK_T):
                    j, mj, m2 = _token_tile(j0, first + cnt, ar_t, mk)
                    mrow = sm_self + (s * S + j)[:, None] * (2 * K) + ar_k[None, :]
                    rows2 = tl.load(mrow, mask=m2, other=-1, cache_modifier=".cg")
                    wbits = tl.load(mrow + K, mask=m2, other=0, cache_modifier=".cg")
                    rrow = (s * S_rows + j)[:, None] * K + ar_k[None, :]
                    tl.store(recv_rows_ptr + rrow, rows2, mask=m2)
                    tl.store(recv_w_ptr + rrow, wbits.to(tl.float32, bitcast=True), mask=m2)
                    for h0 in range(0, H, BLOCK_H):
                        cols = h0 + ar_h
                        mh = cols < H
                        xt = tl.load(st_self + (s * S + j)[:, None] * H + cols[None, :], mask=mj[:, None] & mh[None, :],
                                     cache_modifier=".cg")
                        for k in tl.static_range(K):
                            rowk = _col(rows2, ar_k, k)
                            tl.store(out_ptr + rowk.to(tl.int64)[:, None] * H + cols[None, :], xt,
                                     mask=(rowk >= 0)[:, None] & mh[None, :])
                tl.debug_barrier()
                tl.atomic_xchg(ctl, 0, sem="release", scope="sys")

