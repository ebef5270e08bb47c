"""Combine backward: push grad_out like a dispatch, weight / dot at the receiver, return grad_w."""
from __future__ import annotations

import triton
import triton.language as tl

from .sync import (CTL_WIDTH, SNAP_CHUNK_TOKENS, _chunk_range, _free_chunk_from_all, _grad_rows, _kernel_setup,
                   _num_chunks, _pick8_rt, _publish_chunk, _recv_item, _recv_items, _spin_until, _stage_tile,
                   _staged_meta, _staged_range, _token_tile, _wait_chunk_from_all, _wait_send_credits, _wait_staged)


@triton.jit(do_not_specialize=["me", "N", "S", "S_rows", "n_send", "n_recv", "max_spins"])
def _combine_bwd_kernel(
    g_ptr, y_ptr, gy_ptr, gw_ptr, w_ptr, local_rows_ptr, slot_ptr, snap_ptr,
    recv_rows_ptr, recv_w_ptr, recv_chunk_ptr, status_ptr,
    st0, st1, st2, st3, st4, st5, st6, st7,   # peers' stage rows [P, S, H] (g dtype)
    sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7,   # peers' stage ctl
    gb0, gb1, gb2, gb3, gb4, gb5, gb6, gb7,   # peers' gw [P, S, K] fp32
    gc0, gc1, gc2, gc3, gc4, gc5, gc6, gc7,   # peers' gw ctl
    st_self, sc_self,
    N, H, E, CS, me, S, S_rows, n_send, n_recv, max_spins,
    P: tl.constexpr, P_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, NCHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Given ``g = d loss / d out``: ``gy[row(n, k)] = w[n, k] * g[n]`` and
    ``gw[n, k] = <g[n], y[row(n, k)]>``. Send role: own tokens' local slots directly; each token
    once to every remote destination (stage channel). Receive role, per staged chunk: ``gy`` of
    the local rows, and the K dot products sent back into the source's gw buffer (gw channel);
    ``gather_weight_grads`` then reads them into ``gw``."""
    pid, misc, chunk_t, ar_t, ar_k, ar_p, ar_h, mk = _kernel_setup(snap_ptr, P, CS, E, K, BLOCK_T, K_PAD, P_PAD, BLOCK_H)
    if pid < n_send:
        nch = _wait_send_credits(sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7, me, pid, N, chunk_t, n_send, status_ptr,
                                 max_spins, P, NCHUNK, BLOCK_C)
        for c in range(pid, nch, n_send):
            t_lo, t_hi = _chunk_range(c, chunk_t, N)
            for t0 in range(t_lo, t_hi, BLOCK_T):
                tk, mt, m2 = _token_tile(t0, t_hi, ar_t, mk)
                loc2 = tl.load(local_rows_ptr + tk[:, None] * K + ar_k[None, :], mask=m2, other=-1)
                w2 = tl.load(w_ptr + tk[:, None] * K + ar_k[None, :], mask=m2, other=0.0).to(tl.float32)
                slots2 = tl.load(slot_ptr + tk[:, None] * P + ar_p[None, :], mask=mt[:, None] & (ar_p < P)[None, :],
                                 other=-1)
                dots = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
                for h0 in range(0, H, BLOCK_H):
                    cols = h0 + ar_h
                    mh = cols < H
                    gt = tl.load(g_ptr + tk[:, None] * H + cols[None, :], mask=mt[:, None] & mh[None, :], other=0.0)
                    _stage_tile(st0, st1, st2, st3, st4, st5, st6, st7, gt, slots2, ar_p, cols, mh, me, S, H, P)
                    dots = _grad_rows(gt.to(tl.float32), loc2, w2, ar_k, cols, mh, dots, gy_ptr, y_ptr, H, K)
                tl.store(gw_ptr + tk[:, None] * K + ar_k[None, :], dots, mask=m2 & (loc2 >= 0))
            _publish_chunk(sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7, me, c, P, NCHUNK)
    else:
        for item in range(pid - n_send, _recv_items(snap_ptr, misc, chunk_t, P), n_recv):
            c, s, live = _recv_item(item, snap_ptr, me, CS, E, chunk_t, P)
            if live:
                gctl = _pick8_rt(s, gc0, gc1, gc2, gc3, gc4, gc5, gc6, gc7) + (me * NCHUNK + c) * CTL_WIDTH
                gbuf = _pick8_rt(s, gb0, gb1, gb2, gb3, gb4, gb5, gb6, gb7)
                ctl = _wait_staged(sc_self, s, c, status_ptr, max_spins, NCHUNK)
                _spin_until(gctl, 0, status_ptr, max_spins)   # credit of s's gw slot for chunk c
                tl.debug_barrier()
                first, stop = _staged_range(recv_chunk_ptr, s, c, NCHUNK)
                for j0 in range(first, stop, BLOCK_T):
                    j, mj, m2 = _token_tile(j0, stop, ar_t, mk)
                    rows2, w2 = _staged_meta(recv_rows_ptr, recv_w_ptr, s, S_rows, j, m2, ar_k, K, True)
                    dots = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
                    for h0 in range(0, H, BLOCK_H):
                        cols = h0 + ar_h
                        mh = cols < H
                        g32 = tl.load(st_self + (s * S + j)[:, None] * H + cols[None, :], mask=mj[:, None] & mh[None, :],
                                      other=0.0, cache_modifier=".cg").to(tl.float32)
                        dots = _grad_rows(g32, rows2, w2, ar_k, cols, mh, dots, gy_ptr, y_ptr, H, K)
                    # all K (0 where the slot is not here or was dropped): the source reads its own slots
                    tl.store(gbuf + (me * S + j)[:, None] * K + ar_k[None, :], dots, mask=m2)
                tl.debug_barrier()
                tl.atomic_xchg(ctl, 0, sem="release", scope="sys")
                tl.atomic_xchg(gctl, 1, sem="release", scope="sys")


@triton.jit(do_not_specialize=["me", "N", "S", "max_spins"])
def _gather_gw_kernel(
    gw_ptr, sel_ptr, slot_ptr, snap_ptr, gb_self, gc_self, status_ptr,
    N, E, L, CS, me, S, max_spins,
    P: tl.constexpr, P_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, NCHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Per chunk of own tokens: wait for every other rank's weight gradients of the chunk, copy
    ``gw[n, k]`` for the slots on other ranks, free the chunk."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    misc = P * CS + E  # wire.SnapLayout.misc
    chunk_t = tl.load(snap_ptr + misc + SNAP_CHUNK_TOKENS)
    ar_t = tl.arange(0, BLOCK_T)
    ar_k = tl.arange(0, K_PAD)
    ar_p = tl.arange(0, P_PAD)
    mk = ar_k < K
    for c in range(pid, _num_chunks(N, chunk_t), nprog):
        t_lo, t_hi = _wait_chunk_from_all(gc_self, c, chunk_t, N, ar_p, me, status_ptr, max_spins, P, NCHUNK)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            tk, mt, m2 = _token_tile(t0, t_hi, ar_t, mk)
            e2 = tl.load(sel_ptr + tk[:, None] * K + ar_k[None, :], mask=m2, other=-1)
            v2 = m2 & (e2 >= 0) & (e2 < E)
            dst2 = tl.where(v2, e2, 0).to(tl.int32) // L
            remote = v2 & (dst2 != me)
            j2 = tl.load(slot_ptr + tk[:, None] * P + dst2, mask=remote, other=0)
            val = tl.load(gb_self + (dst2 * S + j2).to(tl.int64) * K + ar_k[None, :], mask=remote, other=0.0,
                          cache_modifier=".cg")
            tl.store(gw_ptr + tk[:, None] * K + ar_k[None, :], val, mask=remote)
        _free_chunk_from_all(gc_self, c, ar_p, me, P, NCHUNK)

