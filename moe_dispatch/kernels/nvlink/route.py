"""Routing metadata: counting sort of the slots (deterministic, no atomics decide an order),
the counts exchange and the layout kernel."""
from __future__ import annotations

import triton
import triton.language as tl

from .sync import (ROW_BAD_IDS, ROW_DTYPE, ROW_HIDDEN, ROW_NUM_TOKENS, SNAP_BAD_IDS, SNAP_CHUNK_TOKENS,
                   SNAP_MAX_TOKENS, SNAP_ROWS_HERE, SNAP_STATUS, _pick8, _spin_until)


@triton.jit
def _slots(sel_ptr, t0, t_end, E, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """The (token, k) slots of tokens ``[t0, min(t0 + BLOCK_N, t_end))``, flat in (n, k) order.

    Returns (s int64 flat slot indices, in-range mask, expert id int32 (-1 unless valid),
    valid mask, count of invalid ids). Invalid ids (< -1 or >= E) count as dropped slots.
    """
    ar = tl.arange(0, BLOCK_S)
    s = (tl.zeros([BLOCK_S], dtype=tl.int64) + t0) * K + ar
    m = (ar < BLOCK_N * K) & (s < (tl.zeros([BLOCK_S], dtype=tl.int64) + t_end) * K)
    raw = tl.load(sel_ptr + s, mask=m, other=-1)
    valid = m & (raw >= 0) & (raw < E)
    bad = tl.sum((m & ((raw < -1) | (raw >= E))).to(tl.int32), axis=0)
    e = tl.where(valid, raw, -1).to(tl.int32)
    return s, m, e, valid, bad


@triton.jit
def _token_dests(sel_ptr, t0, t_end, E, L, K: tl.constexpr, P_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """``goes [BLOCK_N, P_PAD]`` int32: 1 where token t0 + i has at least one valid expert on
    rank r (each token is sent once per destination rank, whatever its number of experts there)."""
    tk = t0 + tl.arange(0, BLOCK_N)
    mt = tk < t_end
    ar_p = tl.arange(0, P_PAD)
    goes = tl.zeros([BLOCK_N, P_PAD], dtype=tl.int32)
    for k in tl.static_range(K):
        raw = tl.load(sel_ptr + tk.to(tl.int64) * K + k, mask=mt, other=-1)
        ok = mt & (raw >= 0) & (raw < E)
        dest = tl.where(ok, raw, 0).to(tl.int32) // L
        hit = ok[:, None] & (dest[:, None] == ar_p[None, :])
        goes = tl.maximum(goes, hit.to(tl.int32))
    return goes


@triton.jit(do_not_specialize=["N", "tokens_per_cta"])
def _route_hist_kernel(
    sel_ptr, hist_ptr, N, E, L, tokens_per_cta, HS,
    P: tl.constexpr, P_PAD: tl.constexpr, K: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program b: ``hist[b] = [slots per expert (E) | tokens per destination rank (P) | invalid
    ids]`` over its tokens ``[b * tokens_per_cta, (b + 1) * tokens_per_cta)``."""
    pid = tl.program_id(0)
    t_lo = pid * tokens_per_cta
    t_hi = tl.minimum(N, t_lo + tokens_per_cta)
    ar_e = tl.arange(0, E_PAD)
    ar_p = tl.arange(0, P_PAD)
    acc_e = tl.zeros([E_PAD], dtype=tl.int32)
    acc_t = tl.zeros([P_PAD], dtype=tl.int32)
    bad = tl.zeros([], dtype=tl.int32)
    for t0 in range(t_lo, t_hi, BLOCK_N):
        s, m, e, valid, nbad = _slots(sel_ptr, t0, t_hi, E, K, BLOCK_N, BLOCK_S)
        onehot = (e[:, None] == ar_e[None, :]) & valid[:, None]
        acc_e += tl.sum(onehot.to(tl.int32), axis=0)
        acc_t += tl.sum(_token_dests(sel_ptr, t0, t_hi, E, L, K, P_PAD, BLOCK_N), axis=0)
        bad += nbad
    row = hist_ptr + pid.to(tl.int64) * HS
    tl.store(row + ar_e, acc_e, mask=ar_e < E)
    tl.store(row + E + ar_p, acc_t, mask=ar_p < P)
    tl.store(row + E + P, bad)


@triton.jit
def _hist_sums(hist_ptr, n_rows, HS, E, ar_e, ar_p, P: tl.constexpr, E_PAD: tl.constexpr, P_PAD: tl.constexpr,
               BLOCK_G: tl.constexpr):
    """Sums of ``hist`` rows ``[0, n_rows)``: (slots per expert [E_PAD], tokens per rank [P_PAD],
    invalid ids), ``BLOCK_G`` rows per step."""
    tot_e = tl.zeros([E_PAD], dtype=tl.int32)
    tot_t = tl.zeros([P_PAD], dtype=tl.int32)
    tot_bad = tl.zeros([], dtype=tl.int32)
    ar_g = tl.arange(0, BLOCK_G)
    for g0 in range(0, n_rows, BLOCK_G):
        gs = g0 + ar_g
        mg = gs < n_rows
        rows = hist_ptr + gs.to(tl.int64)[:, None] * HS
        tot_e += tl.sum(tl.load(rows + ar_e[None, :], mask=mg[:, None] & (ar_e < E)[None, :], other=0), axis=0)
        tot_t += tl.sum(tl.load(rows + E + ar_p[None, :], mask=mg[:, None] & (ar_p < P)[None, :], other=0), axis=0)
        tot_bad += tl.sum(tl.load(hist_ptr + gs.to(tl.int64) * HS + E + P, mask=mg, other=0), axis=0)
    return tot_e, tot_t, tot_bad


@triton.jit(do_not_specialize=["me", "N", "num_ctas", "tokens_per_cta", "max_spins"])
def _route_rank_kernel(
    sel_ptr, hist_ptr, rank_ptr, slot_ptr, status_ptr,
    c0, c1, c2, c3, c4, c5, c6, c7,          # peers' counts [P, CS]
    f0, f1, f2, f3, f4, f5, f6, f7,          # peers' count flags [P]
    num_ctas, N, E, L, tokens_per_cta, HS, CS, me, H, dtype_code, max_spins,
    P: tl.constexpr, P_PAD: tl.constexpr, K: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, SINGLE: tl.constexpr,
):
    """Program b, over the same tokens as ``_route_hist_kernel``:

    * ``rank[n * K + k]``: position of slot (n, k) among this rank's slots of its expert, in
      (n, k) order (-1 for dropped slots) = slots of e in earlier programs (prefix of ``hist``)
      + in earlier blocks of this program (running count) + earlier in this block (pairwise).
    * ``slot[n, r]``: position of token n among the tokens this rank sends to rank r, or -1.

    Program 0 then writes this rank's counts row into every rank's ``counts[me]`` and raises
    its flag there. ``SINGLE``: one program, no ``_route_hist_kernel`` before it (small N).
    """
    pid = tl.program_id(0)
    t_lo = pid * tokens_per_cta
    t_hi = tl.minimum(N, t_lo + tokens_per_cta)
    ar_e = tl.arange(0, E_PAD)
    ar_p = tl.arange(0, P_PAD)
    ar_s = tl.arange(0, BLOCK_S)
    run_e = tl.zeros([E_PAD], dtype=tl.int32)
    run_t = tl.zeros([P_PAD], dtype=tl.int32)
    if not SINGLE:
        run_e, run_t, _ = _hist_sums(hist_ptr, pid, HS, E, ar_e, ar_p, P, E_PAD, P_PAD, BLOCK_G)
    bad = tl.zeros([], dtype=tl.int32)
    for t0 in range(t_lo, t_hi, BLOCK_N):
        s, m, e, valid, nbad = _slots(sel_ptr, t0, t_hi, E, K, BLOCK_N, BLOCK_S)
        onehot = (e[:, None] == ar_e[None, :]) & valid[:, None]
        base = tl.sum(tl.where(onehot, run_e[None, :], 0), axis=1)
        before = (e[:, None] == e[None, :]) & valid[None, :] & (ar_s[None, :] < ar_s[:, None])
        within = tl.sum(before.to(tl.int32), axis=1)
        tl.store(rank_ptr + s, tl.where(valid, base + within, -1), mask=m)
        run_e += tl.sum(onehot.to(tl.int32), axis=0)

        goes = _token_dests(sel_ptr, t0, t_hi, E, L, K, P_PAD, BLOCK_N)
        excl = tl.cumsum(goes, axis=0) - goes
        slot = tl.where(goes > 0, run_t[None, :] + excl, -1)
        tk = t0 + tl.arange(0, BLOCK_N)
        tl.store(slot_ptr + tk.to(tl.int64)[:, None] * P + ar_p[None, :], slot,
                 mask=(tk < t_hi)[:, None] & (ar_p < P)[None, :])
        run_t += tl.sum(goes, axis=0)
        bad += nbad

    if pid == 0:
        if SINGLE:
            tot_e = run_e
            tot_t = run_t
            tot_bad = bad
        else:
            tot_e, tot_t, tot_bad = _hist_sums(hist_ptr, num_ctas, HS, E, ar_e, ar_p, P, E_PAD, P_PAD, BLOCK_G)
        for r in tl.static_range(P):
            cnt_r = _pick8(r, c0, c1, c2, c3, c4, c5, c6, c7)
            flg_r = _pick8(r, f0, f1, f2, f3, f4, f5, f6, f7)
            if r != me:
                # credit: rank r's layout kernel of the previous dispatch has read our row
                _spin_until(flg_r + me, 0, status_ptr, max_spins)
            row = cnt_r + me * CS
            tl.store(row + ar_e, tot_e, mask=ar_e < E)
            tl.store(row + E + ar_p, tot_t, mask=ar_p < P)
            tl.store(row + E + P + ROW_NUM_TOKENS, N)
            tl.store(row + E + P + ROW_BAD_IDS, tot_bad)
            tl.store(row + E + P + ROW_HIDDEN, H)
            tl.store(row + E + P + ROW_DTYPE, dtype_code)
            if r != me:
                tl.debug_barrier()
                tl.atomic_xchg(flg_r + me, 1, sem="release", scope="sys")


@triton.jit(do_not_specialize=["me", "max_spins"])
def _layout_kernel(
    cnt_ptr, cflag_ptr, snap_ptr, tpe_ptr, status_ptr,
    me, E, L, CS, chunk_target, max_spins,
    P: tl.constexpr, P_PAD: tl.constexpr, L_PAD: tl.constexpr, CS_PAD: tl.constexpr,
):
    """One program: wait for every rank's counts row, then write ``snap`` (see ``snap_layout``)
    and ``tokens_per_expert`` (int64 [L]) for this rank, and return the count credits.

    Receiver r's rows: local expert l, then source rank s, then (n, k):
    ``row0(r, l, s) = sum_{l' < l} sum_{s'} C[s', rL + l'] + sum_{s' < s} C[s', rL + l]``;
    ``base[rL + l] = row0(r, l, me)``.
    """
    for s in tl.static_range(P):
        if s != me:
            _spin_until(cflag_ptr + s, 1, status_ptr, max_spins)
    tl.debug_barrier()
    ar_p = tl.arange(0, P_PAD)
    mp = ar_p < P
    ar_c = tl.arange(0, CS_PAD)
    mat = tl.load(cnt_ptr + ar_p[:, None] * CS + ar_c[None, :], mask=mp[:, None] & (ar_c < CS)[None, :], other=0,
                  cache_modifier=".cg")
    tl.store(snap_ptr + ar_p[:, None] * CS + ar_c[None, :], mat, mask=mp[:, None] & (ar_c < CS)[None, :])
    ar_l = tl.arange(0, L_PAD)
    ml = ar_l < L
    base_off = P * CS  # wire.SnapLayout.base
    misc = base_off + E  # wire.SnapLayout.misc
    for r in tl.static_range(P):
        blk = tl.load(cnt_ptr + ar_p[:, None] * CS + r * L + ar_l[None, :], mask=mp[:, None] & ml[None, :], other=0,
                      cache_modifier=".cg")
        col = tl.sum(blk, axis=0)
        before_me = tl.sum(tl.where((ar_p < me)[:, None], blk, 0), axis=0)
        row0 = tl.cumsum(col, axis=0) - col + before_me
        tl.store(snap_ptr + base_off + r * L + ar_l, row0, mask=ml)
        if r == me:
            tl.store(tpe_ptr + ar_l, col.to(tl.int64), mask=ml)
            tl.store(snap_ptr + misc + SNAP_ROWS_HERE, tl.sum(col, axis=0))
    n_all = tl.load(cnt_ptr + ar_p * CS + E + P + ROW_NUM_TOKENS, mask=mp, other=0, cache_modifier=".cg")
    max_n = tl.max(n_all, axis=0)
    chunk_t = tl.maximum((max_n + chunk_target - 1) // chunk_target, 1)
    bad = tl.sum(tl.load(cnt_ptr + ar_p * CS + E + P + ROW_BAD_IDS, mask=mp, other=0, cache_modifier=".cg"), axis=0)
    tl.store(snap_ptr + misc + SNAP_MAX_TOKENS, max_n)
    tl.store(snap_ptr + misc + SNAP_CHUNK_TOKENS, chunk_t)
    tl.store(snap_ptr + misc + SNAP_BAD_IDS, bad)
    tl.store(snap_ptr + misc + SNAP_STATUS, tl.load(status_ptr))  # time-outs so far: the host reads one table
    tl.debug_barrier()
    for s in tl.static_range(P):
        if s != me:
            tl.atomic_xchg(cflag_ptr + s, 0, sem="release", scope="sys")

