"""Capacity-mode layout of the all-to-all dispatch: fixed-size blocks per destination rank, the
drop policy, and the receiver's regroup index. Pure torch, no host sync (CUDA-graph capturable).

Shape legend (see :mod:`moe_dispatch.protocol`): N tokens, K top-k, E experts, L local experts,
P ranks, S = N * K slots (flat index ``n * K + k``), B = capacity slots per (source, destination)
rank pair = ``max_tokens_per_rank * min(K, L)`` (the NVLink dispatcher's capacity: each token
can reach at most min(K, L) experts of one rank).

Send buffer: ``[P * B, H]``, block d (rows ``[d * B, (d + 1) * B)``) holds the slots kept for
rank d in (local expert, token, k) order, then zero padding rows.

**Drop policy** (deterministic, like Megatron's ``drop_policy="probs"``): when more than B of a
rank's slots go to one destination rank, it keeps the B with the highest routing weight; equal
weights keep the lower token index, then the lower k. Dropped slots get row -1 (combine adds
nothing for them) and are reported in ``dropped [N, K]``. Ids outside ``[0, E)`` select nothing.

Worked example, P=2, L=1 (E=2), B=2, one source rank with N=3, K=1::

    selected_experts = [[1], [1], [1]]   weights = [[.2], [.5], [.5]]
    rank 1's priority: token 1 (.5), token 2 (.5, later), token 0 (.2) -> token 0 dropped
    row_id_map = [[-1], [2], [3]]   (block 1 = rows 2, 3)   send_counts = [[0], [2]]
"""
from __future__ import annotations

import torch

from ..permute.reference import exclusive_cumsum

__all__ = ["capacity_slots", "capacity_layout", "capacity_regroup_index"]


def capacity_slots(max_tokens_per_rank: int, topk: int, num_local_experts: int) -> int:
    """B: rows of one (source, destination) block."""
    return max_tokens_per_rank * min(topk, num_local_experts)


def capacity_layout(
    selected_experts: torch.Tensor, routing_weights: torch.Tensor, num_experts: int, num_local_experts: int,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the drop policy and place the kept slots in the fixed blocks of the send buffer.

    Args:
        selected_experts: integer ``[N, K]`` global expert ids, -1 (or any id outside
            ``[0, E)``) for none.
        routing_weights: floating ``[N, K]``: the drop priority (not differentiated).
        num_experts: E; num_local_experts: L (P = E / L destination ranks).
        capacity: B.

    Returns:
        ``(row_id_map int64 [N, K]`` rows of the send buffer ``[P * B, H]``, -1 when not sent;
        ``dropped bool [N, K]``: valid slots dropped by the policy;
        ``send_counts int64 [P, L]``: slots kept per destination rank and local expert``)``.
    """
    num_tokens, topk = selected_experts.shape
    P, L, E, B = num_experts // num_local_experts, num_local_experts, num_experts, capacity
    device = selected_experts.device
    flat = selected_experts.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    expert = torch.where(valid, flat, E)  # E: "no expert", destination P
    dest = expert // L
    slots = torch.arange(flat.numel(), device=device)
    if flat.numel() <= B:  # no destination can overflow (known from the shapes): no priority sort
        dropped = torch.zeros_like(valid)
        kept_expert = expert
    else:
        # priority order: by destination, then weight descending, then slot index (both sorts stable)
        order = torch.sort(routing_weights.detach().reshape(-1), descending=True, stable=True).indices
        order = order[torch.sort(dest[order], stable=True).indices]
        per_dest = torch.zeros(P + 1, dtype=torch.int64, device=device).scatter_add_(0, dest, torch.ones_like(dest))
        rank_in_dest = slots - exclusive_cumsum(per_dest)[dest[order]]
        keep = torch.empty_like(valid).scatter_(0, order, (rank_in_dest < B) & (dest[order] < P))
        dropped = valid & ~keep
        kept_expert = torch.where(keep, expert, E)
    # rows: block of the destination + kept slots of its lower local experts + rank in the expert
    by_expert = torch.sort(kept_expert, stable=True).indices  # (expert, token, k) order
    per_expert = torch.zeros(E + 1, dtype=torch.int64, device=device).scatter_add_(0, kept_expert, torch.ones_like(kept_expert))
    start = exclusive_cumsum(per_expert)  # [E + 1]; start[E] = kept slots
    e_sorted = kept_expert[by_expert]
    d_sorted = e_sorted // L
    row_sorted = d_sorted * B + start[e_sorted] - start[d_sorted * L] + (slots - start[e_sorted])
    row_sorted = torch.where(e_sorted < E, row_sorted, -1)
    row_id_map = torch.empty_like(row_sorted).scatter_(0, by_expert, row_sorted)
    return row_id_map.view(num_tokens, topk), dropped.view(num_tokens, topk), per_expert[:E].view(P, L)


def capacity_regroup_index(recv_counts: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices between the received blocks and the expert-major ``expert_input``.

    Args:
        recv_counts: int64 ``[P, L]``: rows of each local expert in source rank s's block (its
            kept rows come first, in local-expert order).
        capacity: B.

    Returns:
        ``(expert_major [P * B], rank_major [P * B])``, int64 permutations:
        ``expert_input = received[expert_major]`` holds the rows in (local expert, source rank)
        order, then every padding row; ``received_again = expert_input[rank_major]``.

    Example, P=2, L=2, B=3, recv_counts ``[[1, 1], [0, 2]]``: received ``a b _ | c d _``
    (a: expert 0; b, c, d: expert 1), expert-major ``a b c d _ _``: expert_major
    ``[0, 1, 3, 4, 2, 5]``, rank_major ``[0, 1, 4, 2, 3, 5]``.
    """
    P, L = recv_counts.shape
    device = recv_counts.device
    j = torch.arange(capacity, device=device).expand(P, capacity)
    within_end = torch.cumsum(recv_counts, 1)  # [P, L]
    local = torch.searchsorted(within_end, j.contiguous(), right=True)  # [P, B]; L on padding rows
    pad = local >= L
    local_c = local.clamp(max=L - 1)
    tokens_per_expert = recv_counts.sum(0)
    # expert-major row of (s, j): rows of lower experts + rows of (l, s' < s) + position within (s, l)
    row = (exclusive_cumsum(tokens_per_expert)[local_c] + torch.gather(exclusive_cumsum(recv_counts, 0), 1, local_c)
           + j - torch.gather(within_end - recv_counts, 1, local_c))
    pad_flat = pad.reshape(-1)
    pad_rank = torch.cumsum(pad_flat.long(), 0) - 1
    rank_major = torch.where(pad_flat, tokens_per_expert.sum() + pad_rank, row.reshape(-1))
    expert_major = torch.empty_like(rank_major).scatter_(0, rank_major, torch.arange(P * capacity, device=device))
    return expert_major, rank_major
