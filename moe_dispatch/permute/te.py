"""TransformerEngine backend: ``moe_permute`` / ``moe_unpermute`` with the index map.

TransformerEngine is optional and imported lazily. TE's index ``row_id_map`` is int32
``[K * N]``, k-major (``te_map[k * N + n]`` = destination row, -1 past ``num_out_tokens``);
ours is int64 ``[N, K]``: the conversion is a transpose. TE sorts with a radix sort on the
expert id, stable in (n, k), so rows come out in the same order as the torch reference.
Dropped slots (-1, and any id outside ``[0, E)``) are given the id E, which sorts after every
real expert, and then cut off by ``num_out_tokens`` = number of kept slots. When ``num_out_rows``
is given (no host sync), TE copies the dropped slots' tokens into the rows past the kept ones:
those rows are set to zero after (a mask on the row index against the kept count, on the
device), so padding rows are zero as in every backend, and their gradient does not reach the
tokens. Only ``align_size == 1``. Rows that are not a multiple of 16 bytes, and empty inputs,
go through the torch reference (TE faults on them).
"""
from __future__ import annotations

import torch

from .._optional import import_transformer_engine
from . import reference


def _te():
    return import_transformer_engine()  # ImportError with the install hint


def why_unavailable(device: torch.device) -> str:
    if device.type != "cuda":
        return "TransformerEngine's permutation runs on CUDA only"
    try:
        _te()
    except ImportError as exc:
        return str(exc)
    return ""


def is_available(device: torch.device) -> bool:
    return not why_unavailable(device)


def _te_can_take(rows: torch.Tensor) -> bool:
    """TE's kernels move rows in 16-byte vectors: they need 16-byte rows and a non-empty input
    (on other inputs they fault with a misaligned address). The torch path takes the rest."""
    return rows.shape[0] > 0 and (rows.shape[1] * rows.element_size()) % 16 == 0


def permute(tokens, selected_experts, num_experts, probs, align_size, num_out_rows):
    permuted, permuted_probs, row_id_map, _ = _permute(tokens, selected_experts, num_experts, probs, align_size,
                                                       num_out_rows, False)
    return permuted, permuted_probs, row_id_map


def permute_counted(tokens, selected_experts, num_experts, probs, align_size, num_out_rows):
    """:func:`permute` plus ``tokens_per_expert`` int64 ``[E]``, the rows of each expert that are
    filled (see :func:`moe_dispatch.permute.reference.filled_rows`). No host sync when
    ``num_out_rows`` is given."""
    return _permute(tokens, selected_experts, num_experts, probs, align_size, num_out_rows, True)


def _permute(tokens, selected_experts, num_experts, probs, align_size, num_out_rows, with_counts):
    if align_size != 1:
        raise ValueError(f"the te permute backend supports align_size=1 only, got {align_size}")
    if not _te_can_take(tokens) or selected_experts.shape[1] == 0:
        if with_counts:
            return reference.permute_counted(tokens, selected_experts, num_experts, probs, align_size, num_out_rows)
        return reference.permute(tokens, selected_experts, num_experts, probs, align_size, num_out_rows) + (None,)
    te = _te()
    num_tokens, topk = selected_experts.shape
    valid = (selected_experts >= 0) & (selected_experts < num_experts)
    exact = num_out_rows is None
    if exact:
        num_out_rows = int(valid.sum())  # host sync: output size depends on the routing
    indices = torch.where(valid, selected_experts, num_experts).to(torch.int32)
    kept = min(num_out_rows, num_tokens * topk)
    permuted, te_map = te.moe_permute(tokens, indices, kept, map_type="index")
    row_id_map = te_map.view(topk, num_tokens).t().long()
    # TE keeps the first `kept` sorted slots; slots of the "drop" id E that fit must still be -1.
    row_id_map = torch.where(valid, row_id_map, -1)
    counts = None
    if not exact or with_counts:
        counts = reference.count_slots(indices, num_experts)
    if not exact:
        # Rows past the kept slots hold TE's copies of dropped slots (when they fit): zero them
        # (torch.where: their gradient is zero too).
        total = counts.sum()
        rows = torch.arange(permuted.shape[0], device=permuted.device)
        permuted = torch.where((rows < total).unsqueeze(1), permuted, 0)
    if permuted.shape[0] < num_out_rows:
        permuted = torch.cat([permuted, permuted.new_zeros(num_out_rows - permuted.shape[0], permuted.shape[1])])
    permuted_probs = None
    if probs is not None:
        permuted_probs = reference.permute_by_map(probs.reshape(-1, 1), row_id_map.reshape(-1, 1), num_out_rows).view(-1)
    tokens_per_expert = None
    if with_counts:
        tokens_per_expert = counts if num_out_rows >= num_tokens * topk else reference.filled_rows(
            counts, reference.exclusive_cumsum(counts), num_out_rows)
    return permuted, permuted_probs, row_id_map, tokens_per_expert


def unpermute(permuted, row_id_map, merging_probs):
    num_tokens, topk = row_id_map.shape
    if num_tokens == 0 or topk == 0 or not _te_can_take(permuted):
        return reference.unpermute(permuted, row_id_map, merging_probs)
    te = _te()
    te_map = row_id_map.t().reshape(-1).to(torch.int32)
    probs = None if merging_probs is None else merging_probs.float()
    out = te.moe_unpermute(permuted, te_map, merging_probs=probs, map_type="index")
    return out.to(permuted.dtype)


# TE has no permute for a given row map: the torch reference moves those rows.
permute_by_map = reference.permute_by_map
