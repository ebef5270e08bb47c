"""Triton backend: fused counting sort + row-copy / weighted-reduce kernels.

Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests).
Triton is imported lazily: importing this module needs only torch. The kernels live in
:mod:`moe_dispatch.kernels.permute`; under ``torch.compile`` this module calls them through
``torch.library`` custom ops (traceable) with their autograd; in eager mode it calls them
directly, or through an ``autograd.Function`` with the same backward when a gradient is needed
(the custom-op dispatcher's host cost would be most of an eager call):

* ``permute``: a counting sort fused with the row copy, three kernels (no host sync when
  ``num_out_rows`` is given; see :mod:`moe_dispatch.kernels.permute`). Backward: w.r.t. ``tokens``, an unpermute without weights (sum over k); w.r.t. ``probs``, a
  gather of ``grad_permuted_probs`` at ``row_id_map``.
* ``unpermute``: ``out[n] = sum_k p[n, k] * permuted[row_id_map[n, k]]`` in fp32.
  Backward: w.r.t. ``permuted``, ``grad_out[n] * p[n, k]`` into row ``row_id_map[n, k]`` (zero
  on rows no slot maps to); w.r.t. ``merging_probs``, ``<grad_out[n], permuted[row]>`` in fp32.

Same ``row_id_map`` format as :mod:`moe_dispatch.permute.reference`, bit-identical to it.
"""
from typing import Optional

import torch

from .._optional import TRITON_INSTALL_HINT, triton_interpreting
from ._eager import EagerOps, grad_of_permuted_probs

__all__ = ["is_available", "why_unavailable", "permute", "permute_counted", "unpermute", "permute_by_map"]

_INSTALL = f"triton is not importable: {TRITON_INSTALL_HINT}"


_kernels_module = None  # moe_dispatch.kernels.permute once imported (an import statement costs ~1 us a call)


def _kernels():
    kernels = _kernels_module
    if kernels is None:
        kernels = _import_kernels()
    return kernels


def _import_kernels():
    global _kernels_module
    try:
        from ..kernels import permute as kernels
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(f"{_INSTALL} ({exc})") from exc
    _kernels_module = kernels
    return kernels


def why_unavailable(device: torch.device) -> str:
    """Why the backend cannot run on ``device``, or "" when it can."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
    elif device.type == "cpu":
        if not triton_interpreting():
            return "on CPU the triton backend runs only under Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"
    else:
        return f"the triton backend runs on CUDA (or CPU under TRITON_INTERPRET=1), not on {device.type}"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"{_INSTALL} ({exc})"
    return ""


def is_available(device: torch.device) -> bool:
    """True on CUDA when triton imports; on CPU only under ``TRITON_INTERPRET=1``."""
    return not why_unavailable(device)


# --- custom ops -------------------------------------------------------------------------------
# Custom-op schemas are inferred from the annotations, so this module avoids
# `from __future__ import annotations`. One op per direction keeps the per-call overhead low.

@torch.library.custom_op("moe_dispatch::triton_permute", mutates_args=())
def _permute_op(
    tokens: torch.Tensor,
    selected_experts: torch.Tensor,
    probs: Optional[torch.Tensor],
    num_experts: int,
    align_size: int,
    num_out_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(permuted [M, H], permuted_probs [M] (or [0] without probs), row_id_map int64 [N, K])``.

    ``num_out_rows = -1``: exactly the rows needed (a host sync).
    """
    permuted, permuted_probs, row_id_map = _kernels().permute(
        tokens, selected_experts, num_experts, probs, align_size, None if num_out_rows < 0 else num_out_rows
    )
    if permuted_probs is None:
        permuted_probs = tokens.new_empty(0)
    return permuted, permuted_probs, row_id_map


@_permute_op.register_fake
def _permute_fake(tokens, selected_experts, probs, num_experts, align_size, num_out_rows):
    rows = torch.library.get_ctx().new_dynamic_size() if num_out_rows < 0 else num_out_rows
    permuted_probs = tokens.new_empty(0) if probs is None else probs.new_empty(rows)
    row_id_map = selected_experts.new_empty(selected_experts.shape, dtype=torch.int64)
    return tokens.new_empty(rows, tokens.shape[1]), permuted_probs, row_id_map


@torch.library.custom_op("moe_dispatch::triton_permute_counted", mutates_args=())
def _permute_counted_op(
    tokens: torch.Tensor,
    selected_experts: torch.Tensor,
    probs: Optional[torch.Tensor],
    num_experts: int,
    align_size: int,
    num_out_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_permute_op`` and ``tokens_per_expert`` int64 ``[E]`` (see :func:`permute_counted`)."""
    permuted, permuted_probs, row_id_map, counts = _kernels().permute_counted(
        tokens, selected_experts, num_experts, probs, align_size, None if num_out_rows < 0 else num_out_rows
    )
    if permuted_probs is None:
        permuted_probs = tokens.new_empty(0)
    return permuted, permuted_probs, row_id_map, counts


@_permute_counted_op.register_fake
def _(tokens, selected_experts, probs, num_experts, align_size, num_out_rows):
    permuted, permuted_probs, row_id_map = _permute_fake(tokens, selected_experts, probs, num_experts, align_size,
                                                         num_out_rows)
    return permuted, permuted_probs, row_id_map, selected_experts.new_empty(num_experts, dtype=torch.int64)


def _permute_setup(ctx, inputs, output):
    tokens, _, probs, _, _, _ = inputs
    ctx.save_for_backward(output[2])
    ctx.tokens_dtype = tokens.dtype
    ctx.probs_dtype = None if probs is None else probs.dtype


def _permute_backward(ctx, grad_permuted, grad_permuted_probs, _grad_row_id_map, *_grad_counts):
    (row_id_map,) = ctx.saved_tensors
    grad_tokens = grad_probs = None
    if ctx.needs_input_grad[0] and grad_permuted is not None:
        grad_tokens = _unpermute_op(grad_permuted, row_id_map, None).to(ctx.tokens_dtype)
    if ctx.needs_input_grad[2] and grad_permuted_probs is not None:
        grad_probs = grad_of_permuted_probs(grad_permuted_probs, row_id_map).to(ctx.probs_dtype)
    return grad_tokens, None, grad_probs, None, None, None


@torch.library.custom_op("moe_dispatch::triton_unpermute_rows", mutates_args=())
def _unpermute_op(permuted: torch.Tensor, row_id_map: torch.Tensor, merging_probs: Optional[torch.Tensor]) -> torch.Tensor:
    """``[N, H]`` in permuted's dtype."""
    return _kernels().unpermute(permuted, row_id_map, merging_probs)


@_unpermute_op.register_fake
def _(permuted, row_id_map, merging_probs):
    return permuted.new_empty(row_id_map.shape[0], permuted.shape[1])


@torch.library.custom_op("moe_dispatch::triton_unpermute_rows_backward", mutates_args=())
def _unpermute_backward_op(
    grad_out: torch.Tensor,
    permuted: torch.Tensor,
    row_id_map: torch.Tensor,
    merging_probs: Optional[torch.Tensor],
    probs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_permuted [M, H], grad_merging_probs [N, K], or [0] when not probs_grad)``."""
    grad_permuted, grad_probs = _kernels().unpermute_backward(grad_out, permuted, row_id_map, merging_probs, probs_grad)
    if grad_probs is None:
        grad_probs = permuted.new_empty(0)
    return grad_permuted, grad_probs


@_unpermute_backward_op.register_fake
def _(grad_out, permuted, row_id_map, merging_probs, probs_grad):
    grad_probs = merging_probs.new_empty(merging_probs.shape) if probs_grad else permuted.new_empty(0)
    return permuted.new_empty(permuted.shape), grad_probs


def _unpermute_setup(ctx, inputs, output):
    permuted, row_id_map, merging_probs = inputs
    ctx.save_for_backward(permuted, row_id_map, merging_probs)


def _unpermute_backward(ctx, grad_out):
    permuted, row_id_map, merging_probs = ctx.saved_tensors
    probs_grad = merging_probs is not None and ctx.needs_input_grad[2]
    grad_permuted, grad_probs = _unpermute_backward_op(grad_out, permuted, row_id_map, merging_probs, probs_grad)
    return grad_permuted, None, grad_probs if probs_grad else None


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)
_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)
_permute_counted_op.register_autograd(_permute_backward, setup_context=_permute_setup)


# --- eager path: the same kernels without the custom-op dispatcher --------------------------
# ``torch.library.custom_op`` costs tens of microseconds of host time per call in eager mode;
# outside ``torch.compile`` the kernels are called directly (no autograd needed) or through the
# plain ``autograd.Function``s of :mod:`._eager`, with the same backward as the custom ops'.
_EAGER = EagerOps(_kernels)


# --- backend interface (see moe_dispatch.permute) ---------------------------------------------
def permute(
    tokens: torch.Tensor,
    selected_experts: torch.Tensor,
    num_experts: int,
    probs: Optional[torch.Tensor],
    align_size: int,
    num_out_rows: Optional[int],
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """``(permuted [M, H], permuted_probs [M] or None, row_id_map int64 [N, K])``; see
    :func:`moe_dispatch.permute.permute`. No host sync when ``num_out_rows`` is given."""
    if torch.compiler.is_compiling():
        permuted, permuted_probs, row_id_map = _permute_op(
            tokens, selected_experts, probs, num_experts, align_size, -1 if num_out_rows is None else num_out_rows
        )
        return permuted, None if probs is None else permuted_probs, row_id_map
    return _EAGER.permute(tokens, selected_experts, num_experts, probs, align_size, num_out_rows)


def permute_counted(
    tokens: torch.Tensor,
    selected_experts: torch.Tensor,
    num_experts: int,
    probs: Optional[torch.Tensor],
    align_size: int,
    num_out_rows: Optional[int],
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """:func:`permute` and ``tokens_per_expert`` int64 ``[E]`` (rows of each expert that are filled;
    see :func:`moe_dispatch.kernels.permute.permute_counted`), written by the count kernel itself:
    the same launches as :func:`permute`. Not differentiable (the other outputs are, as in permute)."""
    if torch.compiler.is_compiling():
        permuted, permuted_probs, row_id_map, counts = _permute_counted_op(
            tokens, selected_experts, probs, num_experts, align_size, -1 if num_out_rows is None else num_out_rows
        )
        return permuted, None if probs is None else permuted_probs, row_id_map, counts
    return _EAGER.permute_counted(tokens, selected_experts, num_experts, probs, align_size, num_out_rows)


def unpermute(
    permuted: torch.Tensor, row_id_map: torch.Tensor, merging_probs: Optional[torch.Tensor]
) -> torch.Tensor:
    """``[N, H]`` in permuted's dtype: ``sum_k merging_probs[n, k] * permuted[row_id_map[n, k]]``
    in fp32; see :func:`moe_dispatch.permute.unpermute`."""
    if torch.compiler.is_compiling():
        return _unpermute_op(permuted, row_id_map, merging_probs)
    return _EAGER.unpermute(permuted, row_id_map, merging_probs)


def permute_by_map(tokens: torch.Tensor, row_id_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[num_rows, H]``: ``out[row_id_map[n, k]] = tokens[n]``, zero rows elsewhere, for a
    ``row_id_map`` computed elsewhere (e.g. the all-to-all capacity layout); each row used at most
    once. Differentiable w.r.t. ``tokens`` (backward: an unpermute without weights). No host sync."""
    return _EAGER.permute_by_map(tokens, row_id_map, num_rows)
