"""Device helpers of the NVLink kernels: peer pointers, flags, the role loops (see ``__init__``)."""
from __future__ import annotations

import triton
import triton.language as tl

from . import wire

_BIG = tl.constexpr(2**30)  # > any slot index; a constexpr so kernels may read it

# The wire format's field positions (wire.py) as compile-time constants the kernels can read.
ROW_NUM_TOKENS, ROW_BAD_IDS, ROW_HIDDEN, ROW_DTYPE = map(
    tl.constexpr, (wire.ROW_NUM_TOKENS, wire.ROW_BAD_IDS, wire.ROW_HIDDEN, wire.ROW_DTYPE))
CTL_FLAG, CTL_FIRST, CTL_COUNT, CTL_WIDTH = map(tl.constexpr, (wire.CTL_FLAG, wire.CTL_FIRST, wire.CTL_COUNT, wire.CTL_WIDTH))
SNAP_ROWS_HERE, SNAP_MAX_TOKENS, SNAP_CHUNK_TOKENS, SNAP_BAD_IDS, SNAP_STATUS = map(
    tl.constexpr, (wire.SNAP_ROWS_HERE, wire.SNAP_MAX_TOKENS, wire.SNAP_CHUNK_TOKENS, wire.SNAP_BAD_IDS, wire.SNAP_STATUS))


@triton.jit
def _pick4(r: tl.constexpr, p0, p1, p2, p3):
    return (p0 if r == 0 else p1) if r < 2 else (p2 if r == 2 else p3)


@triton.jit
def _pick8(r: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    """Pointer argument number ``r`` (compile-time r: every branch is resolved at compile time)."""
    return _pick4(r, p0, p1, p2, p3) if r < 4 else _pick4(r - 4, p4, p5, p6, p7)


@triton.jit
def _pick8_rt(s, p0, p1, p2, p3, p4, p5, p6, p7):
    """Pointer argument number ``s`` (run-time s): a select over the compile-time picks."""
    p = p0
    for r in tl.static_range(1, 8):
        if s == r:
            p = _pick8(r, p0, p1, p2, p3, p4, p5, p6, p7)
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
        _wait_flags(ctl_ptr, cs * CTL_WIDTH, cs < stop, 0, status_ptr, max_spins)


@triton.jit
def _col(tile, ar_cols, c: tl.constexpr):
    """Column ``c`` of a 2-D integer tile (row-wise select + sum; exact for ints)."""
    return tl.sum(tl.where(ar_cols[None, :] == c, tile, 0), axis=1)


@triton.jit
def _colf(tile, ar_cols, c: tl.constexpr):
    return tl.sum(tl.where(ar_cols[None, :] == c, tile, 0.0), axis=1)



# ----------------------------------------------------------------------------------------------
# the role loops every fused kernel shares
# ----------------------------------------------------------------------------------------------
@triton.jit
def _num_chunks(n, chunk_t):
    """Chunks of ``n`` tokens; at least 1, so a rank without tokens still publishes (an empty) one."""
    return tl.maximum((n + chunk_t - 1) // chunk_t, 1)


@triton.jit
def _wait_send_credits(c0, c1, c2, c3, c4, c5, c6, c7, me, pid, N, chunk_t, n_send, status_ptr, max_spins,
                       P: tl.constexpr, NCHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Send role: wait until every remote receiver has freed the chunk slots this program will
    write (chunks ``pid, pid + n_send, ... < nch`` of ctl channel ``c0..c7``, row ``me``), and
    return ``nch``, the chunks of this rank's ``N`` tokens."""
    nch = _num_chunks(N, chunk_t)
    for r in tl.static_range(P):
        if r != me:
            ctl_r = _pick8(r, c0, c1, c2, c3, c4, c5, c6, c7)
            _wait_chunk_credits(ctl_r + me * NCHUNK * CTL_WIDTH, pid, nch, n_send, status_ptr, max_spins, BLOCK_C)
    return nch


@triton.jit
def _stage_tile(st0, st1, st2, st3, st4, st5, st6, st7, tile, slots2, ar_p, cols, mh, me, S, H, P: tl.constexpr):
    """Send role: a ``[BLOCK_T, BLOCK_H]`` tile of tokens into every remote receiver's stage rows
    ``[me, j]``, j = the token's slot there (``slots2 [BLOCK_T, P_PAD]``, -1: not sent there)."""
    for r in tl.static_range(P):
        if r != me:
            j = _col(slots2, ar_p, r)
            stage = _pick8(r, st0, st1, st2, st3, st4, st5, st6, st7)
            tl.store(stage + (me * S + j).to(tl.int64)[:, None] * H + cols[None, :], tile,
                     mask=(j >= 0)[:, None] & mh[None, :])


@triton.jit
def _publish_chunk(c0, c1, c2, c3, c4, c5, c6, c7, me, c, P: tl.constexpr, NCHUNK: tl.constexpr):
    """Send role, once chunk ``c`` is written: ``bar.sync``, then raise its flag at every remote
    receiver (release, system scope), so its rows are visible before the flag."""
    tl.debug_barrier()
    for r in tl.static_range(P):
        if r != me:
            ctl = _pick8(r, c0, c1, c2, c3, c4, c5, c6, c7) + (me * NCHUNK + c) * CTL_WIDTH
            tl.atomic_xchg(ctl, 1, sem="release", scope="sys")


@triton.jit
def _recv_items(snap_ptr, misc, chunk_t, P: tl.constexpr):
    """Work items of a receive role: P * the largest chunk count of any rank."""
    return P * _num_chunks(tl.load(snap_ptr + misc + SNAP_MAX_TOKENS), chunk_t)


@triton.jit
def _wait_staged(ctl_self, s, c, status_ptr, max_spins, NCHUNK: tl.constexpr):
    """Receive role: wait until rank ``s`` published chunk ``c`` here; ``bar.sync``; -> its ctl entry."""
    ctl = ctl_self + (s * NCHUNK + c) * CTL_WIDTH
    _spin_until(ctl, 1, status_ptr, max_spins)
    tl.debug_barrier()
    return ctl


@triton.jit
def _staged_range(recv_chunk_ptr, s, c, NCHUNK: tl.constexpr):
    """Slots ``[first, stop)`` of chunk ``c`` that rank ``s`` staged here (from the handle's copy)."""
    first = tl.load(recv_chunk_ptr + (s * NCHUNK + c) * 2)
    return first, first + tl.load(recv_chunk_ptr + (s * NCHUNK + c) * 2 + 1)


@triton.jit
def _staged_meta(recv_rows_ptr, recv_w_ptr, s, S_rows, j, m2, ar_k, K: tl.constexpr, USE_W: tl.constexpr):
    """``(rows [BLOCK_T, K_PAD], weights fp32)`` here of the tokens ``j`` rank ``s`` staged (weights
    1 without ``USE_W``)."""
    rrow = (s * S_rows + j)[:, None] * K + ar_k[None, :]
    rows2 = tl.load(recv_rows_ptr + rrow, mask=m2, other=-1)
    if USE_W:
        w2 = tl.load(recv_w_ptr + rrow, mask=m2, other=0.0)
    else:
        w2 = tl.where(m2, 1.0, 0.0)
    return rows2, w2


@triton.jit
def _recv_item(item, snap_ptr, me, CS, E, chunk_t, P: tl.constexpr):
    """Receive role: work item -> ``(chunk c, source rank s, live)``; ``live``: s is another rank
    and has a chunk c (items run over P * the largest chunk count of any rank)."""
    c = item // P
    s = item % P
    n_s = tl.load(snap_ptr + s * CS + E + P + ROW_NUM_TOKENS)
    return c, s, (s != me) & (c < _num_chunks(n_s, chunk_t))


@triton.jit
def _wait_chunk_from_all(ctl_self, c, chunk_t, N, ar_p, me, status_ptr, max_spins, P: tl.constexpr,
                         NCHUNK: tl.constexpr):
    """Owner of chunk ``c``: wait until every other rank published its part of the chunk into
    this rank's ctl channel ``ctl_self``, then ``bar.sync`` so all threads may load it.
    Returns the chunk's tokens ``[t_lo, t_hi)``."""
    _wait_flags(ctl_self, (ar_p * NCHUNK + c) * CTL_WIDTH, (ar_p < P) & (ar_p != me), 1, status_ptr, max_spins)
    tl.debug_barrier()
    return _chunk_range(c, chunk_t, N)


@triton.jit
def _free_chunk_from_all(ctl_self, c, ar_p, me, P: tl.constexpr, NCHUNK: tl.constexpr):
    """Owner of chunk ``c``, after consuming it: ``bar.sync``, then hand every other rank its
    credit back (flag 0, release) so it may reuse the slot."""
    tl.debug_barrier()
    tl.atomic_xchg(ctl_self + (ar_p * NCHUNK + c) * CTL_WIDTH, 0, mask=(ar_p < P) & (ar_p != me), sem="release",
                   scope="sys")


# ----------------------------------------------------------------------------------------------
# tiles: the index and row math the kernels share
# ----------------------------------------------------------------------------------------------
@triton.jit
def _kernel_setup(snap_ptr, P: tl.constexpr, CS, E, K: tl.constexpr, BLOCK_T: tl.constexpr, K_PAD: tl.constexpr,
                  P_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """``(pid, misc offset of snap, chunk tokens, ar_t, ar_k, ar_p, ar_h, mk = ar_k < K)``: what
    every fused kernel starts from."""
    misc = P * CS + E  # wire.SnapLayout.misc
    chunk_t = tl.load(snap_ptr + misc + SNAP_CHUNK_TOKENS)
    ar_k = tl.arange(0, K_PAD)
    return (tl.program_id(0), misc, chunk_t, tl.arange(0, BLOCK_T), ar_k, tl.arange(0, P_PAD), tl.arange(0, BLOCK_H),
            ar_k < K)


@triton.jit
def _chunk_range(c, chunk_t, N):
    """Tokens ``[t_lo, t_hi)`` of chunk ``c``."""
    t_lo = c * chunk_t
    return t_lo, tl.minimum(N, t_lo + chunk_t)


@triton.jit
def _token_tile(t0, t_hi, ar_t, mk):
    """``(tk int64 [BLOCK_T] token ids, mt token mask, m2 [BLOCK_T, K_PAD] slot mask)``."""
    tk = (t0 + ar_t).to(tl.int64)
    mt = tk < t_hi
    return tk, mt, mt[:, None] & mk[None, :]


@triton.jit
def _weighted_rows(y_ptr, rows2, w2, ar_k, cols, mh, H, K: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    """fp32 ``[BLOCK_T, BLOCK_H]``: ``sum_k w2[:, k] * y[rows2[:, k], cols]`` (rows < 0 skipped)."""
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):
        rowk = _col(rows2, ar_k, k)
        wk = _colf(w2, ar_k, k)
        ok = (rowk >= 0)[:, None] & mh[None, :]
        yk = tl.load(y_ptr + rowk.to(tl.int64)[:, None] * H + cols[None, :], mask=ok, other=0.0)
        acc += tl.where(ok, wk[:, None] * yk.to(tl.float32), 0.0)
    return acc


@triton.jit
def _grad_rows(g32, rows2, w2, ar_k, cols, mh, dots, gy_ptr, y_ptr, H, K: tl.constexpr):
    """Combine backward on one tile of columns: ``gy[rows2[:, k]] = w2[:, k] * g`` and
    ``dots[:, k] += <g, y[rows2[:, k]]>`` (rows < 0 skipped). Returns ``dots``."""
    for k in tl.static_range(K):
        rowk = _col(rows2, ar_k, k)
        wk = _colf(w2, ar_k, k)
        ok = (rowk >= 0)[:, None] & mh[None, :]
        rp = rowk.to(tl.int64)[:, None] * H + cols[None, :]
        tl.store(gy_ptr + rp, (wk[:, None] * g32).to(gy_ptr.dtype.element_ty), mask=ok)
        yk = tl.load(y_ptr + rp, mask=ok, other=0.0).to(tl.float32)
        d = tl.sum(tl.where(ok, g32 * yk, 0.0), axis=1)
        dots = tl.where(ar_k[None, :] == k, dots + d[:, None], dots)
    return dots
