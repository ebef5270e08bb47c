"""Pure-torch permutation: the ground truth every other backend is tested against.

Runs on CPU and GPU, differentiable through ordinary autograd (``index_copy`` /
``index_select``). Uses a stable ``argsort``: clear, not fast.

``row_id_map`` (the format every backend shares): int64 ``[N, K]``; ``row_id_map[n, k]`` is the
row of ``permuted`` that holds token ``n``'s copy for its ``k``-th expert, or -1 when that slot
is dropped (``selected_experts[n, k] == -1``, or its row falls past ``num_out_rows``). Every
backend treats an id outside ``[0, E)`` like -1 (the public ``permute`` rejects them first; the
backend functions, called by dispatchers that may not afford the check, drop them).

Worked example, N=3, K=2, E=3, align_size=1::

    selected_experts = [[2, 0],      sorted by (expert, token, k):
                        [0, -1],       expert 0: (0,1) (1,0)   -> rows 0, 1
                        [2, 1]]        expert 1: (2,1)         -> row 2
                                       expert 2: (0,0) (2,0)   -> rows 3, 4
    row_id_map       = [[3, 0],
                        [1, -1],
                        [4, 2]]
    permuted         = [x0, x1, x2, x0, x2]

With ``align_size=4`` each expert's group starts at a multiple of 4 (padding rows are zero):
expert 0 -> rows 0, 1; expert 1 -> row 4; expert 2 -> rows 8, 9; ``permuted`` has 12 rows.
"""
from __future__ import annotations

import torch

__all__ = ["exclusive_cumsum", "count_slots", "make_row_id_map", "filled_rows", "permute_rows", "permute_slot_values", "unpermute_rows"]


def exclusive_cumsum(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``[x0, x1, x2] -> [0, x0, x0 + x1]`` along ``dim`` (start offsets from counts)."""
    return torch.cumsum(x, dim) - x


def count_slots(selected_experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[E]``: how many (token, k) slots chose each expert; ids outside ``[0, E)`` (-1 or
    any other) are not counted. No host sync (``scatter_add``, not ``bincount``: CUDA bincount
    syncs to size its output)."""
    flat = selected_experts.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, key, torch.ones_like(key))[:num_experts]


def make_row_id_map(
    selected_experts: torch.Tensor, num_experts: int, align_size: int, num_out_rows: int | None
) -> tuple[torch.Tensor, int]:
    """Sort the (token, k) slots by expert. Returns ``(row_id_map [N, K] int64, num_out_rows)``.

    When ``num_out_rows`` is None it is computed (one device-to-host sync).
    """
    row_id_map, num_out_rows, _ = _sort_slots(selected_experts, num_experts, align_size, num_out_rows, False)
    return row_id_map, num_out_rows


def _sort_slots(selected_experts, num_experts, align_size, num_out_rows, with_counts: bool):
    """:func:`make_row_id_map` plus ``tokens_per_expert`` int64 ``[E]`` (see :func:`filled_rows`;
    None unless ``with_counts``)."""
    num_tokens, topk = selected_experts.shape
    device = selected_experts.device
    flat = selected_experts.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))  # dropped slots (any id outside [0, E)) sort last
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts + align_size - 1) // align_size * align_size
    padded[num_experts] = 0
    starts = exclusive_cumsum(counts)
    padded_starts = exclusive_cumsum(padded)
    bound = flat.numel() + (num_experts * (align_size - 1) if align_size > 1 else 0)
    if num_out_rows is None:
        num_out_rows = int(padded.sum())  # host sync: output size depends on the routing
        bound = num_out_rows
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    rank_in_expert = torch.arange(flat.numel(), device=device) - starts[sorted_key]
    dest = padded_starts[sorted_key] + rank_in_expert
    dest = torch.where((sorted_key < num_experts) & (dest < num_out_rows), dest, torch.full_like(dest, -1))
    row_id_map = torch.empty_like(flat)
    row_id_map[order] = dest
    tokens_per_expert = counts[:num_experts] if with_counts else None
    if with_counts and num_out_rows < bound:  # some expert's rows may not all fit
        tokens_per_expert = filled_rows(tokens_per_expert, padded_starts[:num_experts], num_out_rows)
    return row_id_map.view(num_tokens, topk), num_out_rows, tokens_per_expert


def filled_rows(counts: torch.Tensor, starts: torch.Tensor, num_out_rows: int) -> torch.Tensor:
    """Rows of each expert that an output of ``num_out_rows`` rows holds: int64 ``[E]``,
    ``min(counts[e], max(num_out_rows - starts[e], 0))`` (``counts``: slots of each expert,
    ``starts``: the row its group starts at). Example: counts ``[3, 2, 4]``, align 1 (starts
    ``[0, 3, 5]``), 6 rows -> ``[3, 2, 1]``."""
    return torch.minimum(counts, (num_out_rows - starts).clamp(min=0))


def permute_rows(tokens: torch.Tensor, row_id_map: torch.Tensor, num_out_rows: int) -> torch.Tensor:
    """``permuted[row_id_map[n, k]] = tokens[n]``; unused (padding) rows are zero. ``[num_out_rows, H]``."""
    topk = row_id_map.shape[1]
    flat = row_id_map.reshape(-1)
    valid = flat >= 0
    token_of_slot = torch.arange(flat.numel(), device=flat.device) // topk
    rows, src = flat[valid], token_of_slot[valid]
    out = tokens.new_zeros(num_out_rows, tokens.shape[1])
    return out.index_copy(0, rows, tokens.index_select(0, src))


def unpermute_rows(
    permuted: torch.Tensor, row_id_map: torch.Tensor, merging_probs: torch.Tensor | None
) -> torch.Tensor:
    """``out[n] = sum_k p[n, k] * permuted[row_id_map[n, k]]`` over kept slots, in fp32; ``[N, H]``
    in ``permuted``'s dtype (``p = 1`` without ``merging_probs``)."""
    num_tokens, topk = row_id_map.shape
    acc_dtype = torch.promote_types(permuted.dtype, torch.float32)
    # A zero row at the end stands in for dropped slots: no masking of possibly non-finite rows.
    padded = torch.cat([permuted, permuted.new_zeros(1, permuted.shape[1])])
    rows = torch.where(row_id_map >= 0, row_id_map, permuted.shape[0]).reshape(-1)
    gathered = padded.index_select(0, rows).view(num_tokens, topk, permuted.shape[1]).to(acc_dtype)
    if merging_probs is not None:
        gathered = gathered * merging_probs.to(acc_dtype).unsqueeze(-1)
    return gathered.sum(1).to(permuted.dtype)


# --- backend interface (see moe_dispatch.permute) ---------------------------------------------
def is_available(device: torch.device) -> bool:
    return True


def why_unavailable(device: torch.device) -> str:
    return ""


def permute(
    tokens: torch.Tensor,
    selected_experts: torch.Tensor,
    num_experts: int,
    probs: torch.Tensor | None,
    align_size: int,
    num_out_rows: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    row_id_map, num_out_rows = make_row_id_map(selected_experts, num_experts, align_size, num_out_rows)
    permuted = permute_rows(tokens, row_id_map, num_out_rows)
    permuted_probs = None
    if probs is not None:
        permuted_probs = permute_slot_values(probs, row_id_map, num_out_rows)
    return permuted, permuted_probs, row_id_map


def permute_counted(
    tokens: torch.Tensor,
    selected_experts: torch.Tensor,
    num_experts: int,
    probs: torch.Tensor | None,
    align_size: int,
    num_out_rows: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """:func:`permute` plus ``tokens_per_expert`` int64 ``[E]``: the rows of each expert that are
    filled (:func:`filled_rows`; every slot of it when ``num_out_rows`` is None or at least
    ``N * K + E * (align_size - 1)``). No host sync when ``num_out_rows`` is given, on any
    device: rows are moved with :func:`permute_by_map` (no boolean-mask indexing), same values
    and gradients as :func:`permute_rows`."""
    row_id_map, num_out_rows, tokens_per_expert = _sort_slots(selected_experts, num_experts, align_size, num_out_rows,
                                                              True)
    permuted = permute_by_map(tokens, row_id_map, num_out_rows)
    permuted_probs = None
    if probs is not None:
        permuted_probs = permute_by_map(probs.reshape(-1, 1), row_id_map.reshape(-1, 1), num_out_rows).view(-1)
    return permuted, permuted_probs, row_id_map, tokens_per_expert


def unpermute(
    permuted: torch.Tensor, row_id_map: torch.Tensor, merging_probs: torch.Tensor | None
) -> torch.Tensor:
    return unpermute_rows(permuted, row_id_map, merging_probs)


def permute_by_map(tokens: torch.Tensor, row_id_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """:func:`permute_rows` without its boolean-mask indexing (a host sync on GPU): every slot is
    copied, dropped ones into an extra row ``num_rows`` that is cut off. Same values, and the
    same gradient (dropped slots add exact zeros). For a ``row_id_map`` computed elsewhere."""
    num_tokens, topk = row_id_map.shape
    rows = torch.where(row_id_map >= 0, row_id_map, num_rows).reshape(-1)
    src = tokens.index_select(0, torch.arange(num_tokens * topk, device=tokens.device) // topk)
    out = tokens.new_zeros(num_rows + 1, tokens.shape[1])
    return out.index_copy(0, rows, src)[:num_rows]


def permute_slot_values(values: torch.Tensor, row_id_map: torch.Tensor, num_out_rows: int) -> torch.Tensor:
    """Move one value per (n, k) slot (e.g. routing probs ``[N, K]``) to its permuted row: ``[M]``,
    0 on padding rows. Each slot is treated as a one-element "token" of its own."""
    return permute_rows(values.reshape(-1, 1), row_id_map.reshape(-1, 1), num_out_rows).view(-1)
