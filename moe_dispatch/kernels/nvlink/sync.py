"""Device helpers of the NVLink kernels: peer pointers, flags, the role loops (see ``__init__``)."""
from __future__ import annotations

import triton
import triton.language as tl

_BIG = tl.constexpr(2**30)  # > any slot index; a constexpr so kernels may read it

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

