"""Triton kernels of the NVLink (symmetric-memory) token dispatcher, and their launchers.

Imports torch and triton only (nothing else of ours). Import lazily: under ``TRITON_INTERPRET=1``
Triton decides how to run the kernels when this module is first imported.

Shape legend: N tokens on this rank, H hidden, K top-k, E experts (global), L = E / P local
experts, P ranks, ``me`` this rank, S slots per source in the staging buffers (capacity),
C = NCHUNK chunk slots per source.

What the kernels exchange (all buffers below live in every rank's workspace; "peer r's X" is a
tensor view mapped onto rank r's memory, a plain tensor of another simulated rank on CPU):

* ``counts [P, CS]`` int32: row s is written by rank s into every rank. Columns
  ``[0, E)`` slots per global expert, ``[E, E + P)`` tokens sent to each rank, then ``N``, the
  number of invalid expert ids, the hidden size and a dtype code. ``count_flags [P]``: rank s
  sets its entry in rank r's flags after writing its row there.
* ``stage rows [P, S, H]`` (hidden dtype) and ``stage meta [P, S, 2K]`` int32: sender s writes
  its token n to receiver r at row ``[s, j]`` where j = ``send_slot[n, r]``, the position of n
  among the tokens s sends to r (token order). Meta holds the token's K destination rows at r
  (-1 for slots on other ranks) and its K weights (fp32 bits).
* ``comb rows [P, S, H]``: receiver r writes, into sender s's buffer at ``[r, j]``, the fp32
  weighted sum over its local slots of token (s, j), rounded to the output dtype.
* ``gw [P, S, K]`` fp32: combine backward returns the weight gradients the same way.
* ``ctl [P, C, 4]`` int32 per channel (stage, comb, gw): ``[flag, first_j, count, -]`` per
  (source, chunk).

Synchronisation (no host sync, no separate barrier kernel, CUDA-graph safe): a sender splits
its tokens into chunks of ``chunk_t`` consecutive tokens (chunk_t is computed on device from the
largest N of any rank, so all ranks agree). For each chunk and each remote receiver it writes
the rows, then ``bar.sync`` + one ``atom.release.sys`` that sets the chunk's flag to 1 in the
receiver's ctl. The receiver spins (``atom.acquire.sys``) until the flag is 1, consumes the
rows, then ``bar.sync`` + release-store of 0: the flag is also the credit that lets the sender
reuse the slot in a later operation (the sender waits for 0 before writing). Flags only ever
toggle 0 -> 1 -> 0, so there is no epoch counter to keep in sync with CUDA-graph replays.
The pattern "all threads store, bar.sync, one thread does a release at system scope" is the one
cooperative-groups' grid sync uses; the reader side is "one thread acquires, bar.sync, all
threads load"; loads of peer-written data use ``.cg`` (L2, never a stale L1 line).

Deadlock freedom: send roles never wait on anything of the current operation (only on credits
of earlier operations, which earlier kernels return); receive roles wait only on send roles.
A fused kernel puts the send role on the low program ids, so it is scheduled first.

Every fused kernel takes ``n_send`` and ``n_recv`` and runs the send role on programs
``[0, n_send)`` and the receive role on ``[n_send, n_send + n_recv)``. On GPU one launch runs
both; the CPU simulation launches the send role of every rank, then the receive role of every
rank (same kernel, same code), so the interpreter never spins on a flag that is not yet set.

Spins are bounded by ``max_spins``: on time-out the kernel sets bit 0 of ``status`` and goes on
(wrong results, no hang); the dispatcher checks ``status`` at its host syncs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "counts_stride", "snap_layout", "route", "layout", "dispatch_fused", "combine_fused",
    "combine_backward_fused", "gather_weight_grads", "MAX_PEERS", "DTYPE_CODES",
]

MAX_PEERS = 8  # single node: up to 8 GPUs; one pointer argument per peer buffer
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}
_BIG = tl.constexpr(2**30)  # > any slot index; a constexpr so kernels may read it


def _np2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def counts_stride(num_experts: int, world_size: int) -> int:
    """Columns of a counts row: E expert counts, P token counts, N, invalid ids, H, dtype code."""
    return num_experts + world_size + 4


def snap_layout(num_experts: int, world_size: int) -> dict[str, int]:
    """Offsets (int32 elements) in the per-dispatch ``snap`` tensor written by ``layout``.

    ``counts`` [P, CS] copy of the exchanged matrix; ``base`` [E]: for each global expert e, the
    first row at rank e // L of this rank's slots of e; ``misc``: [rows for me, max N over
    ranks, chunk_t, invalid ids over all ranks, status word]; ``host`` = elements the host reads.
    """
    cs = counts_stride(num_experts, world_size)
    base = world_size * cs
    misc = base + num_experts
    return {"counts": 0, "base": base, "misc": misc, "size": misc + 8, "cs": cs, "host": misc + 5}


# ----------------------------------------------------------------------------------------------
# small device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pick8(r: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    """Pointer argument number ``r`` (compile-time r)."""
    if r == 0:
        p = p0
    elif r == 1:
        p = p1
    elif r == 2:
        p = p2
    elif r == 3:
        p = p3
    elif r == 4:
        p = p4
    elif r == 5:
        p = p5
    elif r == 6:
        p = p6
    else:
        p = p7
    return p


@triton.jit
def _pick8_rt(s, p0, p1, p2, p3, p4, p5, p6, p7):
    """Pointer argument number ``s`` (run-time s)."""
    p = p0
    if s == 1:
        p = p1
    if s == 2:
        p = p2
    if s == 3:
        p = p3
    if s == 4:
        p = p4
    if s == 5:
        p = p5
    if s == 6:
        p = p6
    if s == 7:
        p = p7
    return p


@triton.jit
def _spin_until(ptr, target, status_ptr, max_spins):
    """Wait (acquire, system scope) until ``*ptr == target``; bit 0 of status on time-out."""
    spins = 0
    while (tl.atomic_add(ptr, 0, sem="acquire", scope="sys") != target) & (spins < max_spins):
        spins += 1
    if spins >= max_spins:
        tl.atomic_or(status_ptr, 1)


@triton.jit
def _wait_flags(ptr, idx, mask, target, status_ptr, max_spins):
    """Wait until ``ptr[idx] == target`` for every lane of ``mask`` (vector of flag offsets)."""
    v = tl.atomic_add(ptr + idx, 0, mask=mask, sem="acquire", scope="sys")
    pending = tl.sum(((v != target) & mask).to(tl.int32), axis=0)
    spins = 0
    while (pending > 0) & (spins < max_spins):
        v = tl.atomic_add(ptr + idx, 0, mask=mask, sem="acquire", scope="sys")
        pending = tl.sum(((v != target) & mask).to(tl.int32), axis=0)
        spins += 1
    if spins >= max_spins:
        tl.atomic_or(status_ptr, 1)


@triton.jit
def _wait_chunk_credits(ctl_ptr, first, stop, step, status_ptr, max_spins, BLOCK_C: tl.constexpr):
    """Wait until the flags of chunks ``first, first + step, ... < stop`` in one ``[C, 4]`` ctl
    row are 0 (free), a vector of chunks at a time: one round trip instead of one per chunk."""
    ar = tl.arange(0, BLOCK_C)
    for c0 in range(first, stop, step * BLOCK_C):
        cs = c0 + ar * step
        _wait_flags(ctl_ptr, cs * 4, cs < stop, 0, status_ptr, max_spins)


@triton.jit
def _col(tile, ar_cols, c: tl.constexpr):
    """Column ``c`` of a 2-D integer tile (row-wise select + sum; exact for ints)."""
    return tl.sum(tl.where(ar_cols[None, :] == c, tile, 0), axis=1)


@triton.jit
def _colf(tile, ar_cols, c: tl.constexpr):
    return tl.sum(tl.where(ar_cols[None, :] == c, tile, 0.0), axis=1)


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


# ----------------------------------------------------------------------------------------------
# routing metadata: counting sort of the slots (deterministic, no atomics for ordering)
# ----------------------------------------------------------------------------------------------
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
        ar_g = tl.arange(0, BLOCK_G)
        for g0 in range(0, pid, BLOCK_G):
            gs = g0 + ar_g
            mg = gs < pid
            rows = hist_ptr + gs.to(tl.int64)[:, None] * HS
            run_e += tl.sum(tl.load(rows + ar_e[None, :], mask=mg[:, None] & (ar_e < E)[None, :], other=0), axis=0)
            run_t += tl.sum(tl.load(rows + E + ar_p[None, :], mask=mg[:, None] & (ar_p < P)[None, :], other=0), axis=0)
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
            tot_e = tl.zeros([E_PAD], dtype=tl.int32)
            tot_t = tl.zeros([P_PAD], dtype=tl.int32)
            tot_bad = tl.zeros([], dtype=tl.int32)
            ar_g2 = tl.arange(0, BLOCK_G)
            for g0 in range(0, num_ctas, BLOCK_G):
                gs = g0 + ar_g2
                mg = gs < num_ctas
                rows = hist_ptr + gs.to(tl.int64)[:, None] * HS
                tot_e += tl.sum(tl.load(rows + ar_e[None, :], mask=mg[:, None] & (ar_e < E)[None, :], other=0), axis=0)
                tot_t += tl.sum(tl.load(rows + E + ar_p[None, :], mask=mg[:, None] & (ar_p < P)[None, :], other=0), axis=0)
                tot_bad += tl.sum(tl.load(hist_ptr + gs.to(tl.int64) * HS + E + P, mask=mg, other=0), axis=0)
        for r in tl.static_range(P):
            cnt_r = _pick8(r, c0, c1, c2, c3, c4, c5, c6, c7)
            flg_r = _pick8(r, f0, f1, f2, f3, f4, f5, f6, f7)
            if r != me:
                # credit: rank r's layout kernel of the previous dispatch has read our row
                _spin_until(flg_r + me, 0, status_ptr, max_spins)
            row = cnt_r + me * CS
            tl.store(row + ar_e, tot_e, mask=ar_e < E)
            tl.store(row + E + ar_p, tot_t, mask=ar_p < P)
            tl.store(row + E + P, N)
            tl.store(row + E + P + 1, tot_bad)
            tl.store(row + E + P + 2, H)
            tl.store(row + E + P + 3, dtype_code)
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
    base_off = P * CS
    misc = base_off + E
    for r in tl.static_range(P):
        blk = tl.load(cnt_ptr + ar_p[:, None] * CS + r * L + ar_l[None, :], mask=mp[:, None] & ml[None, :], other=0,
                      cache_modifier=".cg")
        col = tl.sum(blk, axis=0)
        before_me = tl.sum(tl.where((ar_p < me)[:, None], blk, 0), axis=0)
        row0 = tl.cumsum(col, axis=0) - col + before_me
        tl.store(snap_ptr + base_off + r * L + ar_l, row0, mask=ml)
        if r == me:
            tl.store(tpe_ptr + ar_l, col.to(tl.int64), mask=ml)
            tl.store(snap_ptr + misc, tl.sum(col, axis=0))
    n_all = tl.load(cnt_ptr + ar_p * CS + E + P, mask=mp, other=0, cache_modifier=".cg")
    max_n = tl.max(n_all, axis=0)
    chunk_t = tl.maximum((max_n + chunk_target - 1) // chunk_target, 1)
    bad = tl.sum(tl.load(cnt_ptr + ar_p * CS + E + P + 1, mask=mp, other=0, cache_modifier=".cg"), axis=0)
    tl.store(snap_ptr + misc + 1, max_n)
    tl.store(snap_ptr + misc + 2, chunk_t)
    tl.store(snap_ptr + misc + 3, bad)
    tl.store(snap_ptr + misc + 4, tl.load(status_ptr))  # time-outs so far: the host reads one table
    tl.debug_barrier()
    for s in tl.static_range(P):
        if s != me:
            tl.atomic_xchg(cflag_ptr + s, 0, sem="release", scope="sys")


# ----------------------------------------------------------------------------------------------
# dispatch: push each token once per destination rank, expand at the receiver
# ----------------------------------------------------------------------------------------------
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
    pid = tl.program_id(0)
    misc = P * CS + E
    chunk_t = tl.load(snap_ptr + misc + 2)
    ar_t = tl.arange(0, BLOCK_T)
    ar_k = tl.arange(0, K_PAD)
    ar_p = tl.arange(0, P_PAD)
    ar_h = tl.arange(0, BLOCK_H)
    mk = ar_k < K
    if pid < n_send:
        nch = tl.maximum((N + chunk_t - 1) // chunk_t, 1)
        for r in tl.static_range(P):
            if r != me:
                ctl_r = _pick8(r, sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7)
                _wait_chunk_credits(ctl_r + me * NCHUNK * 4, pid, nch, n_send, status_ptr, max_spins, BLOCK_C)
        for c in range(pid, nch, n_send):
            t_lo = c * chunk_t
            t_hi = tl.minimum(N, t_lo + chunk_t)
            cnt_v = tl.zeros([P_PAD], dtype=tl.int32)
            first_v = tl.full([P_PAD], _BIG, dtype=tl.int32)
            for t0 in range(t_lo, t_hi, BLOCK_T):
                tk = (t0 + ar_t).to(tl.int64)
                mt = tk < t_hi
                m2 = mt[:, None] & mk[None, :]
                e2 = tl.load(sel_ptr + tk[:, None] * K + ar_k[None, :], mask=m2, other=-1)
                v2 = m2 & (e2 >= 0) & (e2 < E)
                ei = tl.where(v2, e2, 0).to(tl.int32)
                rk = tl.load(rank_ptr + tk[:, None] * K + ar_k[None, :], mask=v2, other=0)
                b2 = tl.load(snap_ptr + P * CS + ei, mask=v2, other=0)
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
                    for r in tl.static_range(P):
                        if r != me:
                            j = _col(slots2, ar_p, r)
                            stage = _pick8(r, st0, st1, st2, st3, st4, st5, st6, st7)
                            tl.store(stage + (me * S + j).to(tl.int64)[:, None] * H + cols[None, :], xt,
                                     mask=(j >= 0)[:, None] & mh[None, :])
                    for k in tl.static_range(K):
                        rowk = _col(loc2, ar_k, k)
                        tl.store(out_ptr + rowk.to(tl.int64)[:, None] * H + cols[None, :], xt,
                                 mask=(rowk >= 0)[:, None] & mh[None, :])
            tl.debug_barrier()
            for r in tl.static_range(P):
                if r != me:
                    ctl = _pick8(r, sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7) + (me * NCHUNK + c) * 4
                    cnt_r = tl.sum(tl.where(ar_p == r, cnt_v, 0), axis=0)
                    first_r = tl.sum(tl.where(ar_p == r, first_v, 0), axis=0)
                    tl.store(ctl + 1, tl.where(cnt_r > 0, first_r, 0))
                    tl.store(ctl + 2, cnt_r)
            tl.debug_barrier()
            for r in tl.static_range(P):
                if r != me:
                    ctl = _pick8(r, sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7) + (me * NCHUNK + c) * 4
                    tl.atomic_xchg(ctl, 1, sem="release", scope="sys")
    else:
        rid = pid - n_send
        max_n = tl.load(snap_ptr + misc + 1)
        nch_max = tl.maximum((max_n + chunk_t - 1) // chunk_t, 1)
        for item in range(rid, P * nch_max, n_recv):
            c = item // P
            s = item % P
            n_s = tl.load(snap_ptr + s * CS + E + P)
            nch_s = tl.maximum((n_s + chunk_t - 1) // chunk_t, 1)
            if (s != me) & (c < nch_s):
                ctl = sc_self + (s * NCHUNK + c) * 4
                _spin_until(ctl, 1, status_ptr, max_spins)
                tl.debug_barrier()
                first = tl.load(ctl + 1, cache_modifier=".cg")
                cnt = tl.load(ctl + 2, cache_modifier=".cg")
                tl.store(recv_chunk_ptr + (s * NCHUNK + c) * 2, first)
                tl.store(recv_chunk_ptr + (s * NCHUNK + c) * 2 + 1, cnt)
                for j0 in range(first, first + cnt, BLOCK_T):
                    j = (j0 + ar_t).to(tl.int64)
                    mj = j < first + cnt
                    m2 = mj[:, None] & mk[None, :]
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


# ----------------------------------------------------------------------------------------------
# combine (and dispatch backward): weighted reduce at the receiver, sum at the sender
# ----------------------------------------------------------------------------------------------
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
    first = tl.load(recv_chunk_ptr + (s * NCHUNK + c) * 2)
    cnt = tl.load(recv_chunk_ptr + (s * NCHUNK + c) * 2 + 1)
    for j0 in range(first, first + cnt, BLOCK_T):
        j = (j0 + ar_t).to(tl.int64)
        mj = j < first + cnt
        m2 = mj[:, None] & mk[None, :]
        rrow = (s * S_rows + j)[:, None] * K + ar_k[None, :]
        rows2 = tl.load(recv_rows_ptr + rrow, mask=m2, other=-1)
        if USE_W:
            w2 = tl.load(recv_w_ptr + rrow, mask=m2, other=0.0)
        else:
            w2 = tl.where(m2, 1.0, 0.0)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + ar_h
            mh = cols < H
            acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
            for k in tl.static_range(K):
                rowk = _col(rows2, ar_k, k)
                wk = _colf(w2, ar_k, k)
                ok = (rowk >= 0)[:, None] & mh[None, :]
                yk = tl.load(y_ptr + rowk.to(tl.int64)[:, None] * H + cols[None, :], mask=ok, other=0.0)
                acc += tl.where(ok, wk[:, None] * yk.to(tl.float32), 0.0)
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
    pid = tl.program_id(0)
    misc = P * CS + E
    chunk_t = tl.load(snap_ptr + misc + 2)
    ar_t = tl.arange(0, BLOCK_T)
    ar_k = tl.arange(0, K_PAD)
    ar_p = tl.arange(0, P_PAD)
    ar_h = tl.arange(0, BLOCK_H)
    mk = ar_k < K
    if pid < n_send:
        max_n = tl.load(snap_ptr + misc + 1)
        nch_max = tl.maximum((max_n + chunk_t - 1) // chunk_t, 1)
        ar_c = tl.arange(0, BLOCK_C)
        for r in tl.static_range(P):
            if r != me:
                # credits of the items of this program for source r: chunks c with
                # (c * P + r) % n_send == pid, a vector of them per round trip
                ctl_r = _pick8(r, cc0, cc1, cc2, cc3, cc4, cc5, cc6, cc7) + me * NCHUNK * 4
                n_r = tl.load(snap_ptr + r * CS + E + P)
                nch_r = tl.maximum((n_r + chunk_t - 1) // chunk_t, 1)
                for c0 in range(0, nch_r, BLOCK_C):
                    cs = c0 + ar_c
                    _wait_flags(ctl_r, cs * 4, (cs < nch_r) & ((cs * P + r) % n_send == pid), 0, status_ptr, max_spins)
        for item in range(pid, P * nch_max, n_send):
            c = item // P
            s = item % P
            n_s = tl.load(snap_ptr + s * CS + E + P)
            nch_s = tl.maximum((n_s + chunk_t - 1) // chunk_t, 1)
            # one copy of the body per source rank, so the peer pointer is picked at compile time
            # (keeps Triton's 16-byte alignment facts, hence vector stores over NVLink)
            for sr in tl.static_range(P):
                if sr != me:
                    if (s == sr) & (c < nch_s):
                        _reduce_chunk(
                            y_ptr, recv_rows_ptr, recv_w_ptr, recv_chunk_ptr,
                            _pick8(sr, cb0, cb1, cb2, cb3, cb4, cb5, cb6, cb7),
                            _pick8(sr, cc0, cc1, cc2, cc3, cc4, cc5, cc6, cc7) + (me * NCHUNK + c) * 4,
                            sr, c, H, me, S, S_rows, K, K_PAD, NCHUNK, BLOCK_T, BLOCK_H, USE_W)
    else:
        rid = pid - n_send
        nch = tl.maximum((N + chunk_t - 1) // chunk_t, 1)
        for c in range(rid, nch, n_recv):
            _wait_flags(cc_self, (ar_p * NCHUNK + c) * 4, (ar_p < P) & (ar_p != me), 1, status_ptr, max_spins)
            tl.debug_barrier()
            t_lo = c * chunk_t
            t_hi = tl.minimum(N, t_lo + chunk_t)
            for t0 in range(t_lo, t_hi, BLOCK_T):
                tk = (t0 + ar_t).to(tl.int64)
                mt = tk < t_hi
                m2 = mt[:, None] & mk[None, :]
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
                    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
                    for k in tl.static_range(K):
                        rowk = _col(loc2, ar_k, k)
                        wk = _colf(w2, ar_k, k)
                        ok = (rowk >= 0)[:, None] & mh[None, :]
                        yk = tl.load(y_ptr + rowk.to(tl.int64)[:, None] * H + cols[None, :], mask=ok, other=0.0)
                        acc += tl.where(ok, wk[:, None] * yk.to(tl.float32), 0.0)
                    for r in tl.static_range(P):
                        if r != me:
                            j = _col(slots2, ar_p, r)
                            ok = (j >= 0)[:, None] & mh[None, :]
                            part = tl.load(cb_self + (r * S + j).to(tl.int64)[:, None] * H + cols[None, :], mask=ok,
                                           other=0.0, cache_modifier=".cg")
                            acc += part.to(tl.float32)
                    tl.store(out_ptr + tk[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                             mask=mt[:, None] & mh[None, :])
            tl.debug_barrier()
            tl.atomic_xchg(cc_self + (ar_p * NCHUNK + c) * 4, 0, mask=(ar_p < P) & (ar_p != me), sem="release",
                           scope="sys")


# ----------------------------------------------------------------------------------------------
# combine backward: push grad_out like a dispatch, weight/dot at the receiver, return grad_w
# ----------------------------------------------------------------------------------------------
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
    pid = tl.program_id(0)
    misc = P * CS + E
    chunk_t = tl.load(snap_ptr + misc + 2)
    ar_t = tl.arange(0, BLOCK_T)
    ar_k = tl.arange(0, K_PAD)
    ar_p = tl.arange(0, P_PAD)
    ar_h = tl.arange(0, BLOCK_H)
    mk = ar_k < K
    if pid < n_send:
        nch = tl.maximum((N + chunk_t - 1) // chunk_t, 1)
        for r in tl.static_range(P):
            if r != me:
                ctl_r = _pick8(r, sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7)
                _wait_chunk_credits(ctl_r + me * NCHUNK * 4, pid, nch, n_send, status_ptr, max_spins, BLOCK_C)
        for c in range(pid, nch, n_send):
            t_lo = c * chunk_t
            t_hi = tl.minimum(N, t_lo + chunk_t)
            for t0 in range(t_lo, t_hi, BLOCK_T):
                tk = (t0 + ar_t).to(tl.int64)
                mt = tk < t_hi
                m2 = mt[:, None] & mk[None, :]
                loc2 = tl.load(local_rows_ptr + tk[:, None] * K + ar_k[None, :], mask=m2, other=-1)
                w2 = tl.load(w_ptr + tk[:, None] * K + ar_k[None, :], mask=m2, other=0.0).to(tl.float32)
                slots2 = tl.load(slot_ptr + tk[:, None] * P + ar_p[None, :], mask=mt[:, None] & (ar_p < P)[None, :],
                                 other=-1)
                dots = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
                for h0 in range(0, H, BLOCK_H):
                    cols = h0 + ar_h
                    mh = cols < H
                    gt = tl.load(g_ptr + tk[:, None] * H + cols[None, :], mask=mt[:, None] & mh[None, :], other=0.0)
                    for r in tl.static_range(P):
                        if r != me:
                            j = _col(slots2, ar_p, r)
                            stage = _pick8(r, st0, st1, st2, st3, st4, st5, st6, st7)
                            tl.store(stage + (me * S + j).to(tl.int64)[:, None] * H + cols[None, :], gt,
                                     mask=(j >= 0)[:, None] & mh[None, :])
                    g32 = gt.to(tl.float32)
                    for k in tl.static_range(K):
                        rowk = _col(loc2, ar_k, k)
                        wk = _colf(w2, ar_k, k)
                        ok = (rowk >= 0)[:, None] & mh[None, :]
                        rp = rowk.to(tl.int64)[:, None] * H + cols[None, :]
                        tl.store(gy_ptr + rp, (wk[:, None] * g32).to(gy_ptr.dtype.element_ty), mask=ok)
                        yk = tl.load(y_ptr + rp, mask=ok, other=0.0).to(tl.float32)
                        d = tl.sum(tl.where(ok, g32 * yk, 0.0), axis=1)
                        dots = tl.where(ar_k[None, :] == k, dots + d[:, None], dots)
                tl.store(gw_ptr + tk[:, None] * K + ar_k[None, :], dots, mask=m2 & (loc2 >= 0))
            tl.debug_barrier()
            for r in tl.static_range(P):
                if r != me:
                    ctl = _pick8(r, sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7) + (me * NCHUNK + c) * 4
                    tl.atomic_xchg(ctl, 1, sem="release", scope="sys")
    else:
        rid = pid - n_send
        max_n = tl.load(snap_ptr + misc + 1)
        nch_max = tl.maximum((max_n + chunk_t - 1) // chunk_t, 1)
        for item in range(rid, P * nch_max, n_recv):
            c = item // P
            s = item % P
            n_s = tl.load(snap_ptr + s * CS + E + P)
            nch_s = tl.maximum((n_s + chunk_t - 1) // chunk_t, 1)
            if (s != me) & (c < nch_s):
                ctl = sc_self + (s * NCHUNK + c) * 4
                gctl = _pick8_rt(s, gc0, gc1, gc2, gc3, gc4, gc5, gc6, gc7) + (me * NCHUNK + c) * 4
                gbuf = _pick8_rt(s, gb0, gb1, gb2, gb3, gb4, gb5, gb6, gb7)
                _spin_until(ctl, 1, status_ptr, max_spins)
                _spin_until(gctl, 0, status_ptr, max_spins)   # credit of s's gw slot for chunk c
                tl.debug_barrier()
                first = tl.load(recv_chunk_ptr + (s * NCHUNK + c) * 2)
                cnt = tl.load(recv_chunk_ptr + (s * NCHUNK + c) * 2 + 1)
                for j0 in range(first, first + cnt, BLOCK_T):
                    j = (j0 + ar_t).to(tl.int64)
                    mj = j < first + cnt
                    m2 = mj[:, None] & mk[None, :]
                    rrow = (s * S_rows + j)[:, None] * K + ar_k[None, :]
                    rows2 = tl.load(recv_rows_ptr + rrow, mask=m2, other=-1)
                    w2 = tl.load(recv_w_ptr + rrow, mask=m2, other=0.0)
                    dots = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
                    for h0 in range(0, H, BLOCK_H):
                        cols = h0 + ar_h
                        mh = cols < H
                        g32 = tl.load(st_self + (s * S + j)[:, None] * H + cols[None, :], mask=mj[:, None] & mh[None, :],
                                      other=0.0, cache_modifier=".cg").to(tl.float32)
                        for k in tl.static_range(K):
                            rowk = _col(rows2, ar_k, k)
                            wk = _colf(w2, ar_k, k)
                            ok = (rowk >= 0)[:, None] & mh[None, :]
                            rp = rowk.to(tl.int64)[:, None] * H + cols[None, :]
                            tl.store(gy_ptr + rp, (wk[:, None] * g32).to(gy_ptr.dtype.element_ty), mask=ok)
                            yk = tl.load(y_ptr + rp, mask=ok, other=0.0).to(tl.float32)
                            d = tl.sum(tl.where(ok, g32 * yk, 0.0), axis=1)
                            dots = tl.where(ar_k[None, :] == k, dots + d[:, None], dots)
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
    misc = P * CS + E
    chunk_t = tl.load(snap_ptr + misc + 2)
    ar_t = tl.arange(0, BLOCK_T)
    ar_k = tl.arange(0, K_PAD)
    ar_p = tl.arange(0, P_PAD)
    mk = ar_k < K
    nch = tl.maximum((N + chunk_t - 1) // chunk_t, 1)
    for c in range(pid, nch, nprog):
        _wait_flags(gc_self, (ar_p * NCHUNK + c) * 4, (ar_p < P) & (ar_p != me), 1, status_ptr, max_spins)
        tl.debug_barrier()
        t_lo = c * chunk_t
        t_hi = tl.minimum(N, t_lo + chunk_t)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            tk = (t0 + ar_t).to(tl.int64)
            mt = tk < t_hi
            m2 = mt[:, None] & mk[None, :]
            e2 = tl.load(sel_ptr + tk[:, None] * K + ar_k[None, :], mask=m2, other=-1)
            v2 = m2 & (e2 >= 0) & (e2 < E)
            dst2 = tl.where(v2, e2, 0).to(tl.int32) // L
            remote = v2 & (dst2 != me)
            j2 = tl.load(slot_ptr + tk[:, None] * P + dst2, mask=remote, other=0)
            val = tl.load(gb_self + (dst2 * S + j2).to(tl.int64) * K + ar_k[None, :], mask=remote, other=0.0,
                          cache_modifier=".cg")
            tl.store(gw_ptr + tk[:, None] * K + ar_k[None, :], val, mask=remote)
        tl.debug_barrier()
        tl.atomic_xchg(gc_self + (ar_p * NCHUNK + c) * 4, 0, mask=(ar_p < P) & (ar_p != me), sem="release",
                       scope="sys")


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _pad8(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if not 1 <= len(tensors) <= MAX_PEERS:
        raise ValueError(f"between 1 and {MAX_PEERS} peer buffers are supported, got {len(tensors)}")
    return list(tensors) + [tensors[0]] * (MAX_PEERS - len(tensors))


def _route_blocks(num_experts: int, topk: int, block_n: int = 0, block_g: int = 0) -> tuple[int, int, int, int]:
    """(E_PAD, BLOCK_N tokens per step, BLOCK_S slots per step, BLOCK_G hist rows per step):
    a step builds a one-hot [BLOCK_S, E_PAD] and a pairwise [BLOCK_S, BLOCK_S]; both stay
    around 8K elements. ``block_n`` / ``block_g`` > 0 override (tests: several programs)."""
    e_pad = _np2(num_experts)
    target = max(16, min(64, 8192 // e_pad))
    block_n = block_n or max(1, target // _np2(topk))
    block_s = _np2(block_n * topk)
    block_g = block_g or max(1, min(64, 8192 // e_pad))
    return e_pad, block_n, block_s, block_g


def route(
    selected_experts: torch.Tensor, counts_peers: list[torch.Tensor], flags_peers: list[torch.Tensor],
    status: torch.Tensor, *, rank: int, num_experts: int, num_local_experts: int, hidden_size: int, dtype_code: int,
    max_ctas: int, max_spins: int, block_n: int = 0, block_g: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing metadata of this rank's tokens, and its counts row pushed to every rank.

    Args:
        selected_experts: integer ``[N, K]`` (any int dtype), contiguous.
        counts_peers / flags_peers: the P ranks' ``counts [P, CS]`` int32 / ``count_flags [P]``.

    Returns:
        ``(rank_in_expert int32 [N * K], send_slot int32 [N, P])``. Two launches (one when N is
        at most one routing step).
    """
    n, k = selected_experts.shape
    p = len(counts_peers)
    dev = selected_experts.device
    e_pad, block_n, block_s, block_g = _route_blocks(num_experts, k, block_n, block_g)
    tpc = max(block_n, triton.cdiv(triton.cdiv(max(n, 1), max(1, max_ctas)), block_n) * block_n)
    grid = max(1, triton.cdiv(n, tpc))
    single = grid == 1
    rank_in_expert = torch.empty(max(n * k, 1), dtype=torch.int32, device=dev)
    send_slot = torch.empty((n, p), dtype=torch.int32, device=dev)
    hs = num_experts + p + 1
    hist = torch.empty((grid if not single else 1, hs), dtype=torch.int32, device=dev)
    common = dict(P=p, P_PAD=_np2(p), K=k, E_PAD=e_pad, BLOCK_N=block_n, BLOCK_S=block_s)
    if not single:
        _route_hist_kernel[(grid,)](selected_experts, hist, n, num_experts, num_local_experts, tpc, hs, **common)
    _route_rank_kernel[(grid,)](
        selected_experts, hist, rank_in_expert, send_slot, status, *_pad8(counts_peers), *_pad8(flags_peers),
        grid, n, num_experts, num_local_experts, tpc, hs, counts_stride(num_experts, p), rank, hidden_size, dtype_code,
        max_spins, BLOCK_G=block_g, SINGLE=single, **common,
    )
    return rank_in_expert, send_slot


def layout(
    counts: torch.Tensor, count_flags: torch.Tensor, status: torch.Tensor, *, rank: int, num_experts: int,
    num_local_experts: int, chunk_target: int, max_spins: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wait for all counts rows (own ``counts [P, CS]``), then -> ``(snap int32, tokens_per_expert
    int64 [L])``. One launch, one program."""
    p = counts.shape[0]
    lay = snap_layout(num_experts, p)
    snap = torch.empty(lay["size"], dtype=torch.int32, device=counts.device)
    tpe = torch.empty(num_local_experts, dtype=torch.int64, device=counts.device)
    _layout_kernel[(1,)](
        counts, count_flags, snap, tpe, status, rank, num_experts, num_local_experts, lay["cs"], chunk_target,
        max_spins, P=p, P_PAD=_np2(p), L_PAD=_np2(num_local_experts), CS_PAD=_np2(lay["cs"]),
    )
    return snap, tpe


def _block_c(nchunk: int) -> int:
    return min(_np2(nchunk), 256)


def dispatch_fused(
    x, selected_experts, weights, rank_in_expert, send_slot, snap, out, local_rows, recv_rows, recv_w, recv_chunk,
    status, stage_peers, meta_peers, ctl_peers, *, rank: int, num_experts: int, num_local_experts: int,
    row_limit: int, n_send: int, n_recv: int, max_spins: int, block_t: int, block_h: int, num_warps: int,
) -> None:
    """Launch the fused push/expand kernel (``_dispatch_kernel``); writes ``out``, ``local_rows``
    and, on the receive role, ``recv_rows / recv_w / recv_chunk``. ``n_send + n_recv`` programs."""
    n, h = x.shape
    k = selected_experts.shape[1]
    p = len(stage_peers)
    nchunk = ctl_peers[0].shape[1]
    _dispatch_kernel[(n_send + n_recv,)](
        x, selected_experts, weights, rank_in_expert, send_slot, snap, out, local_rows, recv_rows, recv_w, recv_chunk,
        status, *_pad8(stage_peers), *_pad8(meta_peers), *_pad8(ctl_peers),
        stage_peers[rank], meta_peers[rank], ctl_peers[rank],
        n, h, num_experts, num_local_experts, counts_stride(num_experts, p), rank, stage_peers[0].shape[1],
        recv_rows.shape[1], row_limit, n_send, n_recv, max_spins,
        P=p, P_PAD=_np2(p), K=k, K_PAD=_np2(k), NCHUNK=nchunk, BLOCK_T=block_t, BLOCK_H=block_h,
        BLOCK_C=_block_c(nchunk), num_warps=num_warps,
    )


def combine_fused(
    y, out, weights, local_rows, send_slot, snap, recv_rows, recv_w, recv_chunk, status, comb_peers, ctl_peers, *,
    rank: int, num_experts: int, use_weights: bool, n_send: int, n_recv: int, max_spins: int, block_t: int,
    block_h: int, num_warps: int,
) -> None:
    """Launch ``_combine_kernel``: ``out [N, H]`` = weighted (or plain) sum of each token's rows
    of ``y [R, H]`` over all ranks."""
    n, h = out.shape
    k = local_rows.shape[1]
    p = len(comb_peers)
    nchunk = ctl_peers[0].shape[1]
    _combine_kernel[(n_send + n_recv,)](
        y, out, weights, local_rows, send_slot, snap, recv_rows, recv_w, recv_chunk, status,
        *_pad8(comb_peers), *_pad8(ctl_peers), comb_peers[rank], ctl_peers[rank],
        n, h, num_experts, counts_stride(num_experts, p), rank, comb_peers[0].shape[1], recv_rows.shape[1],
        n_send, n_recv, max_spins,
        P=p, P_PAD=_np2(p), K=k, K_PAD=_np2(k), NCHUNK=nchunk, BLOCK_T=block_t, BLOCK_H=block_h,
        BLOCK_C=_block_c(nchunk), USE_W=use_weights, num_warps=num_warps,
    )


def combine_backward_fused(
    g, y, grad_y, grad_w, weights, local_rows, send_slot, snap, recv_rows, recv_w, recv_chunk, status,
    stage_peers, stage_ctl_peers, gw_peers, gw_ctl_peers, *, rank: int, num_experts: int, n_send: int, n_recv: int,
    max_spins: int, block_t: int, block_h: int, num_warps: int,
) -> None:
    """Launch ``_combine_bwd_kernel``; writes ``grad_y`` and the local slots of ``grad_w``."""
    n, h = g.shape
    k = local_rows.shape[1]
    p = len(stage_peers)
    nchunk = stage_ctl_peers[0].shape[1]
    _combine_bwd_kernel[(n_send + n_recv,)](
        g, y, grad_y, grad_w, weights, local_rows, send_slot, snap, recv_rows, recv_w, recv_chunk, status,
        *_pad8(stage_peers), *_pad8(stage_ctl_peers), *_pad8(gw_peers), *_pad8(gw_ctl_peers),
        stage_peers[rank], stage_ctl_peers[rank],
        n, h, num_experts, counts_stride(num_experts, p), rank, stage_peers[0].shape[1], recv_rows.shape[1],
        n_send, n_recv, max_spins,
        P=p, P_PAD=_np2(p), K=k, K_PAD=_np2(k), NCHUNK=nchunk, BLOCK_T=block_t, BLOCK_H=block_h,
        BLOCK_C=_block_c(nchunk), num_warps=num_warps,
    )


def gather_weight_grads(
    grad_w, selected_experts, send_slot, snap, gw_self, gw_ctl_self, status, *, rank: int, num_experts: int,
    num_local_experts: int, world_size: int, programs: int, max_spins: int, block_t: int,
) -> None:
    """Launch ``_gather_gw_kernel``: the weight gradients of slots on other ranks into ``grad_w``."""
    n, k = selected_experts.shape
    nchunk = gw_ctl_self.shape[1]
    _gather_gw_kernel[(max(1, programs),)](
        grad_w, selected_experts, send_slot, snap, gw_self, gw_ctl_self, status,
        n, num_experts, num_local_experts, counts_stride(num_experts, world_size), rank, gw_self.shape[1], max_spins,
        P=world_size, P_PAD=_np2(world_size), K=k, K_PAD=_np2(k), NCHUNK=nchunk, BLOCK_T=block_t,
    )
