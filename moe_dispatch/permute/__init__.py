"""Permute tokens into expert-grouped rows and back.

``permute`` / ``unpermute`` pick a backend:

========  =====================================================  ==================
backend   what                                                   devices
========  =====================================================  ==================
torch     reference (stable argsort + index_copy), ground truth   CPU, CUDA
triton    fused counting sort + gather / weighted-reduce kernels  CUDA (CPU under
                                                                  TRITON_INTERPRET=1)
cuda      the same algorithm in C++/CUDA (``csrc/``, built only   CUDA, extension
          with MOE_DISPATCH_BUILD_CUDA=1): the least host time    built
te        TransformerEngine ``moe_permute`` / ``moe_unpermute``   CUDA
========  =====================================================  ==================

``"auto"`` takes ``cuda`` (when built), then ``triton``, then ``te`` on CUDA, else ``torch``. All backends
return the same ``row_id_map`` format (see :mod:`moe_dispatch.permute.reference`), so
``unpermute`` of one backend's output works with any backend.

Backend modules (:func:`backend_module`; ``reference`` is ``"torch"``). Every backend module
defines these functions, with no argument checks (dispatchers check their inputs once, the
public functions above check theirs); ``M`` = ``num_out_rows``::

    is_available(device) -> bool
    why_unavailable(device) -> str            # "" when available, else why (with the fix)
    permute(tokens [N, H] float, selected_experts [N, K] int, num_experts: int,
            probs [N, K] float | None, align_size: int, num_out_rows: int | None)
        -> (permuted [M, H] tokens' dtype, permuted_probs [M] probs' dtype | None,
            row_id_map int64 [N, K])
    permute_counted(same arguments)
        -> (permuted, permuted_probs, row_id_map, tokens_per_expert int64 [E])
    unpermute(permuted [M, H], row_id_map int64 [N, K], merging_probs [N, K] | None)
        -> [N, H] permuted's dtype (sum over k in fp32)
    permute_by_map(tokens [N, H], row_id_map int64 [N, K], num_rows: int) -> [num_rows, H]

All outputs on the tokens' device. Rules every backend keeps: rows grouped by expert, in
(token, k) order inside an expert, each group starting at a multiple of ``align_size``; padding
rows (alignment, and rows past the last group) are zero; a slot whose row would be ``>= M`` is
dropped (-1); any id outside ``[0, E)`` is dropped like -1 (never an out-of-range index: the
dispatchers rely on this where checking the ids would cost a host sync). ``num_out_rows`` None:
exactly the rows needed, one host sync. ``tokens_per_expert[e]`` = the rows of expert e that
are filled, ``min(slots of e, max(M - start of e, 0))`` (all its slots when M is None or at
least ``N * K + E * (align_size - 1)``), computed with the permute (no extra host sync; the
triton kernels write it in the count kernel, no extra launch). ``permute`` and
``permute_counted`` are differentiable w.r.t. ``tokens`` and ``probs`` (``row_id_map`` and
``tokens_per_expert`` are not), ``unpermute`` w.r.t. ``permuted`` and ``merging_probs``,
``permute_by_map`` w.r.t. ``tokens``. With ``num_out_rows`` given, the torch and triton
backends' ``permute_counted``, ``unpermute`` and ``permute_by_map`` never sync with the host
(the triton ``permute`` neither; the torch ``permute`` does on CUDA: boolean-mask indexing; te:
as far as TransformerEngine's kernels do not). A new backend (e.g. a CUDA-extension module) implements
the same functions and is added to ``BACKENDS`` / ``_MODULES``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

from .._checks import check_expert_ids_range, check_routing, describe
from .reference import count_slots

__all__ = ["permute", "permute_with_probs", "unpermute", "count_tokens_per_expert", "resolve_backend", "backend_module", "BACKENDS"]

BACKENDS = ("torch", "triton", "cuda", "te")
_MODULES = {"torch": "reference", "triton": "triton", "cuda": "cuda", "te": "te"}
_AUTO_ORDER_CUDA = ("cuda", "triton", "te")


_LOADED: dict[str, ModuleType] = {}  # backend name -> its imported module (what sys.modules holds)


def backend_module(backend: str) -> ModuleType:
    """The module implementing ``backend`` (a resolved name, not ``"auto"``): its functions (see
    the module docstring) skip argument checks, for dispatchers that validated their inputs
    already."""
    module = _LOADED.get(backend)
    if module is None:
        module = _LOADED[backend] = importlib.import_module(f"{__name__}.{_MODULES[backend]}")
    return module


def resolve_backend(backend: str, device: torch.device, align_size: int = 1) -> str:
    """Name of the backend that ``backend`` (possibly ``"auto"``) means on ``device``.

    Raises:
        ValueError: unknown backend name, or a backend that cannot run here (with why).
    """
    if backend == "auto":
        if device.type == "cuda":
            for name in _AUTO_ORDER_CUDA:
                if (name != "te" or align_size == 1) and backend_module(name).is_available(device):
                    return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"permute backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if not backend_module(backend).is_available(device):
        raise ValueError(f"permute backend {backend!r} is not available on {device}: {backend_module(backend).why_unavailable(device)}")
    return backend


def count_tokens_per_expert(selected_experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[E]``: how many (token, k) slots chose each expert (-1 slots, and any id outside
    ``[0, E)``, are not counted). No host sync."""
    return count_slots(selected_experts, num_experts)


def _check_permute_args(tokens, selected_experts, num_experts, probs, align_size, num_out_rows):
    check_routing(tokens, selected_experts, probs, hidden_name="tokens", weights_name="probs")
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(align_size, int) or align_size < 1:
        raise ValueError(f"align_size must be an int >= 1, got {align_size!r}")
    if num_out_rows is not None and (not isinstance(num_out_rows, int) or num_out_rows < 0):
        raise ValueError(f"num_out_rows must be None or an int >= 0, got {num_out_rows!r}")
    check_expert_ids_range(selected_experts, num_experts)


def permute(
    tokens: torch.Tensor,
    selected_experts: torch.Tensor,
    num_experts: int,
    backend: str = "auto",
    *,
    align_size: int = 1,
    num_out_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy each token once per chosen expert into rows grouped by expert.

    Within one expert, rows are ordered by (token index, k).

    Args:
        tokens: ``[N, H]``.
        selected_experts: ``[N, K]`` integer expert ids in ``[-1, num_experts)``; -1 = dropped.
        num_experts: E.
        backend: ``"auto" | "torch" | "triton" | "cuda" | "te"``.
        align_size: pad each expert's group of rows to a multiple of this (zero rows), e.g. 16,
            32 or 128 for FP8 / MXFP8 grouped GEMMs. ``te`` supports only 1.
        num_out_rows: rows of the output. ``None`` computes the exact count (a host sync on
            GPU); a larger value gives zero rows at the end; rows that do not fit are dropped
            (their ``row_id_map`` entry is -1).

    Returns:
        ``(permuted [M, H], row_id_map int64 [N, K])``; see :mod:`moe_dispatch.permute.reference`.

    Raises:
        TypeError / ValueError naming the bad argument.
    """
    _check_permute_args(tokens, selected_experts, num_experts, None, align_size, num_out_rows)
    name = resolve_backend(backend, tokens.device, align_size)
    permuted, _, row_id_map = backend_module(name).permute(tokens, selected_experts, num_experts, None, align_size, num_out_rows)
    return permuted, row_id_map


def permute_with_probs(
    tokens: torch.Tensor,
    probs: torch.Tensor,
    selected_experts: torch.Tensor,
    num_experts: int,
    backend: str = "auto",
    *,
    align_size: int = 1,
    num_out_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``permute`` that also carries the routing probs ``[N, K]`` along.

    Returns:
        ``(permuted [M, H], permuted_probs [M] (0 on padding rows), row_id_map [N, K])``.
    """
    _check_permute_args(tokens, selected_experts, num_experts, probs, align_size, num_out_rows)
    name = resolve_backend(backend, tokens.device, align_size)
    permuted, permuted_probs, row_id_map = backend_module(name).permute(
        tokens, selected_experts, num_experts, probs, align_size, num_out_rows
    )
    return permuted, permuted_probs, row_id_map


def unpermute(
    permuted: torch.Tensor,
    row_id_map: torch.Tensor,
    merging_probs: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Inverse of ``permute``: ``out[n] = sum_k merging_probs[n, k] * permuted[row_id_map[n, k]]``.

    Accumulates in fp32; padding rows and dropped slots are ignored.

    Args:
        permuted: ``[M, H]``.
        row_id_map: int64 ``[N, K]`` from ``permute``.
        merging_probs: ``[N, K]`` floating point, or None for a plain sum over k.
        backend: as in ``permute``.

    Returns:
        ``[N, H]`` in ``permuted``'s dtype.
    """
    if not isinstance(permuted, torch.Tensor) or permuted.dim() != 2:
        raise ValueError(f"permuted must be a 2-D tensor [M, H], got {describe(permuted)}")
    if not isinstance(row_id_map, torch.Tensor) or row_id_map.dim() != 2 or row_id_map.dtype != torch.int64:
        raise ValueError(f"row_id_map must be an int64 tensor [N, K] from permute, got {describe(row_id_map)}")
    if merging_probs is not None:
        if not torch.is_floating_point(merging_probs):
            raise TypeError(f"merging_probs must be floating point, got {merging_probs.dtype}")
        if merging_probs.shape != row_id_map.shape:
            raise ValueError(f"merging_probs must have row_id_map's shape {tuple(row_id_map.shape)}, got {tuple(merging_probs.shape)}")
    name = resolve_backend(backend, permuted.device)
    return backend_module(name).unpermute(permuted, row_id_map, merging_probs)
