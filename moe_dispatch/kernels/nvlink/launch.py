"""Launchers of the NVLink kernels: allocate outputs, pick block sizes and grids."""
from __future__ import annotations

import torch
import triton

from .backward import _combine_bwd_kernel, _gather_gw_kernel
from .combine import _combine_kernel
from .dispatch import _dispatch_kernel
from .route import _layout_kernel, _route_hist_kernel, _route_rank_kernel
from .wire import MAX_PEERS, counts_stride, snap_layout

__all__ = ["next_pow2", "route", "layout", "dispatch_fused", "combine_fused", "combine_backward_fused", "gather_weight_grads"]


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))



def _pad8(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if not 1 <= len(tensors) <= MAX_PEERS:
        raise ValueError(f"between 1 and {MAX_PEERS} peer buffers are supported, got {len(tensors)}")
    return list(tensors) + [tensors[0]] * (MAX_PEERS - len(tensors))


def _route_blocks(num_experts: int, topk: int, block_n: int = 0, block_g: int = 0) -> tuple[int, int, int, int]:
    """(E_PAD, BLOCK_N tokens per step, BLOCK_S slots per step, BLOCK_G hist rows per step):
    a step builds a one-hot [BLOCK_S, E_PAD] and a pairwise [BLOCK_S, BLOCK_S]; both stay
    around 8K elements. ``block_n`` / ``block_g`` > 0 override (tests: several programs)."""
    e_pad = next_pow2(num_experts)
    target = max(16, min(64, 8192 // e_pad))
    block_n = block_n or max(1, target // next_pow2(topk))
    block_s = next_pow2(block_n * topk)
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
    common = dict(P=p, P_PAD=next_pow2(p), K=k, E_PAD=e_pad, BLOCK_N=block_n, BLOCK_S=block_s)
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
    snap = torch.empty(lay.size, dtype=torch.int32, device=counts.device)
    tpe = torch.empty(num_local_experts, dtype=torch.int64, device=counts.device)
    _layout_kernel[(1,)](
        counts, count_flags, snap, tpe, status, rank, num_experts, num_local_experts, lay.cs, chunk_target,
        max_spins, P=p, P_PAD=next_pow2(p), L_PAD=next_pow2(num_local_experts), CS_PAD=next_pow2(lay.cs),
    )
    return snap, tpe


def _block_c(nchunk: int) -> int:
    return min(next_pow2(nchunk), 256)


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
        P=p, P_PAD=next_pow2(p), K=k, K_PAD=next_pow2(k), NCHUNK=nchunk, BLOCK_T=block_t, BLOCK_H=block_h,
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
        P=p, P_PAD=next_pow2(p), K=k, K_PAD=next_pow2(k), NCHUNK=nchunk, BLOCK_T=block_t, BLOCK_H=block_h,
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
        P=p, P_PAD=next_pow2(p), K=k, K_PAD=next_pow2(k), NCHUNK=nchunk, BLOCK_T=block_t, BLOCK_H=block_h,
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
        P=world_size, P_PAD=next_pow2(world_size), K=k, K_PAD=next_pow2(k), NCHUNK=nchunk, BLOCK_T=block_t,
    )
