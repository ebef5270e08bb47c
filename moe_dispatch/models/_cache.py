"""The KV-cache conventions of transformers that the models here follow, in one place.

transformers renamed the cache argument and output field from ``past_key_values`` to ``cache``
in 5.24 (``generate`` passes ``cache=`` and reads ``outputs["cache"]``); 5.17 - 5.23 use
``past_key_values``. The models accept both names and return the cache under the name of the
installed version, so either version's ``generate`` finds it.

Key positions: a cache layer's ``update`` returns keys whose absolute token positions are
``kv_offset + arange(kv_length)``, with ``(kv_length, kv_offset) =
cache.get_mask_sizes(query_length, layer_idx)`` read *before* the update. This holds for every
``Cache`` layer ``generate`` may create: dynamic (all tokens so far), dynamic sliding window
(the last ``window - 1`` plus the new ones), static (the whole preallocated buffer: slots not
yet written have positions past the last query, so the causal mask hides them) and static
sliding window.
"""
from __future__ import annotations

import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

__all__ = ["CACHE_FIELD", "resolve_cache", "with_cache", "cache_length", "kv_positions"]

#: Name of the cache field of transformers' model outputs (and of ``generate``'s model kwarg).
CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache(cache=None, past_key_values=None):
    """The cache passed under either name (transformers >= 5.24: ``cache``; earlier: ``past_key_values``).

    Raises:
        ValueError: two different caches were passed.
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as cache= or as past_key_values=, not two different caches")
    return cache if cache is not None else past_key_values


def with_cache(fields: dict, cache) -> dict:
    """``fields`` plus the cache under :data:`CACHE_FIELD`, for a transformers output class."""
    return {**fields, CACHE_FIELD: cache}


def cache_length(cache) -> int:
    """Tokens already in ``cache`` (0 for None). A device-to-host sync for static caches, whose
    length is a device tensor."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())  # host sync on static caches


def kv_positions(cache, layer_idx: int, query_length: int, past_length: int, device) -> tuple[int, torch.Tensor | None]:
    """``(kv_length, positions int64 [kv_length])`` of the keys ``cache.update`` is about to return.

    Call before the layer's update. Without a cache the keys are this forward's tokens
    (positions ``past_length + arange(query_length)``).
    """
    if cache is None:
        return query_length, past_length + torch.arange(query_length, device=device)
    kv_length, kv_offset = cache.get_mask_sizes(query_length, layer_idx)
    return int(kv_length), int(kv_offset) + torch.arange(int(kv_length), device=device)
