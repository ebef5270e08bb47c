"""Top-k expert ids <-> multi-hot routing maps: the torch reference and a differentiable op.

Shape legend: R rows (e.g. tokens a rank received from DeepEP), K top-k, L local experts.

DeepEP's normal-mode dispatch hands each rank, per received token, ``topk_idx [R, K]`` of
*local* expert ids (-1 where the expert lives on another rank) and ``topk_weights [R, K]``.
Mask-based consumers (Megatron-style permutes, per-expert statistics) want instead::

    routing_map[r, e] = any_k (topk_idx[r, k] == e)                       bool [R, L]
    dense_probs[r, e] = sum_k (topk_idx[r, k] == e) * topk_weights[r, k]  fp32 [R, L]

Worked example, R=2, K=2, L=3::

    topk_idx     = [[2, 0], [-1, 1]]      routing_map = [[True, False, True], [False, True, False]]
    topk_weights = [[.7, .3], [.5, .9]]   dense_probs = [[.3, 0., .7], [0., .9, 0.]]

Backward (``dense_probs`` -> ``topk_weights``) gathers at the ids: with ``g = d dense_probs``,
``d topk_weights[r, k] = g[r, topk_idx[r, k]]``, 0 where the id is -1. In the example, for
``g = [[1, 2, 3], [4, 5, 6]]``: ``d topk_weights = [[3, 1], [0, 5]]``.

Ids outside ``[0, L)`` select nothing (like -1). Top-k ids are distinct within a row; were one
repeated, its weights would add up in ``dense_probs`` and each copy would get the same gradient.

``indices_to_multihot`` is a ``torch.library.custom_op`` (traceable by ``torch.compile``) that
runs the Triton kernels of :mod:`moe_dispatch.kernels.indices_converter` on CUDA (and on CPU
under ``TRITON_INTERPRET=1``), else the torch reference below.
"""

# No ``from __future__ import annotations``: custom-op schemas are inferred from the annotations.
import torch

from ..._checks import describe
from ..._optional import import_triton_kernels, triton_interpreting

__all__ = [
    "indices_to_multihot",
    "indices_to_multihot_reference",
    "multihot_probs_backward_reference",
    "resolve_converter_backend",
    "CONVERTER_BACKENDS",
]

CONVERTER_BACKENDS = ("torch", "triton")


# --- reference (ground truth) ------------------------------------------------------------------
def indices_to_multihot_reference(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_local_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure torch, differentiable through ordinary autograd.

    Args:
        topk_idx: integer ``[R, K]`` local expert ids; -1 (any id outside ``[0, L)``) for none.
        topk_weights: floating ``[R, K]``.
        num_local_experts: L.

    Returns:
        ``(routing_map bool [R, L], dense_probs fp32 [R, L])``.
    """
    experts = torch.arange(num_local_experts, device=topk_idx.device)
    hit = topk_idx.long().unsqueeze(-1) == experts  # [R, K, L]
    dense_probs = (hit * topk_weights.float().unsqueeze(-1)).sum(1)
    return hit.any(1), dense_probs


def multihot_probs_backward_reference(grad_dense_probs: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """fp32 ``[R, K]``: ``grad_dense_probs[r, topk_idx[r, k]]``, 0 where the id is outside ``[0, L)``."""
    num_local_experts = grad_dense_probs.shape[1]
    idx = topk_idx.long()
    valid = (idx >= 0) & (idx < num_local_experts)
    gathered = grad_dense_probs.float().gather(1, torch.where(valid, idx, 0))
    return torch.where(valid, gathered, torch.zeros_like(gathered))


# --- backend choice ------------------------------------------------------------------------------
def _triton_module():
    """The kernels module, or the ImportError saying why not (imported lazily: it imports triton)."""
    try:
        return import_triton_kernels("indices_converter")
    except ImportError as exc:
        return exc


def resolve_converter_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA (and on CPU under ``TRITON_INTERPRET=1``) when triton
    imports, else ``"torch"``.

    Raises:
        ValueError: unknown name, or ``"triton"`` where it cannot run (with why).
    """
    if backend not in ("auto",) + CONVERTER_BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + CONVERTER_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    runs_here = device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    if not runs_here:
        if backend == "triton":
            raise ValueError(f"backend 'triton' cannot run on {device} (CPU needs TRITON_INTERPRET=1)")
        return "torch"
    mod = _triton_module()
    if isinstance(mod, ImportError):
        if backend == "triton":
            raise ValueError(f"backend 'triton' is not available: {mod}")
        return "torch"
    return "triton"


# --- the op --------------------------------------------------------------------------------------
@torch.library.custom_op("moe_dispatch::indices_to_multihot", mutates_args=())
def _indices_to_multihot_op(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_local_experts: int, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton:
        return _triton_module().indices_to_multihot(topk_idx, topk_weights, num_local_experts)
    routing_map, dense_probs = indices_to_multihot_reference(topk_idx, topk_weights, num_local_experts)
    return routing_map, dense_probs


@_indices_to_multihot_op.register_fake
def _(topk_idx, topk_weights, num_local_experts, use_triton):
    rows = topk_idx.shape[0]
    return (topk_idx.new_empty((rows, num_local_experts), dtype=torch.bool),
            topk_weights.new_empty((rows, num_local_experts), dtype=torch.float32))


@torch.library.custom_op("moe_dispatch::multihot_probs_backward", mutates_args=())
def _multihot_probs_backward_op(grad_dense_probs: torch.Tensor, topk_idx: torch.Tensor, use_triton: bool) -> torch.Tensor:
    if use_triton:
        return _triton_module().multihot_probs_backward(grad_dense_probs, topk_idx)
    return multihot_probs_backward_reference(grad_dense_probs, topk_idx)


@_multihot_probs_backward_op.register_fake
def _(grad_dense_probs, topk_idx, use_triton):
    return grad_dense_probs.new_empty(tuple(topk_idx.shape), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    topk_idx, _, _, use_triton = inputs
    ctx.save_for_backward(topk_idx)
    ctx.use_triton = use_triton


def _backward(ctx, grad_routing_map, grad_dense_probs):
    (topk_idx,) = ctx.saved_tensors
    grad_weights = _multihot_probs_backward_op(grad_dense_probs, topk_idx, ctx.use_triton)
    return None, grad_weights, None, None


_indices_to_multihot_op.register_autograd(_backward, setup_context=_setup_context)


def indices_to_multihot(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_local_experts: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable top-k ids -> ``(routing_map, dense_probs)``; see the module docstring.

    Args:
        topk_idx: int32/int64 ``[R, K]`` local expert ids, -1 for experts on other ranks. Ids
            outside ``[0, L)`` select nothing; no host sync checks them.
        topk_weights: floating ``[R, K]`` (made fp32; the gradient comes back in its dtype).
        num_local_experts: L >= 1.
        backend: ``"auto" | "torch" | "triton"`` (see :func:`resolve_converter_backend`).

    Returns:
        ``(routing_map bool [R, L], dense_probs fp32 [R, L])``; gradients flow from
        ``dense_probs`` to ``topk_weights`` (0 at -1 slots).

    Raises:
        TypeError / ValueError naming the bad argument.
    """
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_idx must be an int32 or int64 tensor, got {describe(topk_idx)}")
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be 2-D [R, K], got shape {tuple(topk_idx.shape)}")
    if not isinstance(topk_weights, torch.Tensor) or not torch.is_floating_point(topk_weights):
        raise TypeError(f"topk_weights must be a floating-point tensor, got {describe(topk_weights)}")
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"topk_weights must have topk_idx's shape {tuple(topk_idx.shape)}, got {tuple(topk_weights.shape)}")
    if topk_weights.device != topk_idx.device:
        raise ValueError(f"topk_weights is on {topk_weights.device} but topk_idx on {topk_idx.device}")
    if not isinstance(num_local_experts, int) or isinstance(num_local_experts, bool) or num_local_experts < 1:
        raise ValueError(f"num_local_experts must be a positive int, got {num_local_experts!r}")
    use_triton = resolve_converter_backend(backend, topk_idx.device) == "triton"
    return _indices_to_multihot_op(topk_idx, topk_weights.float(), num_local_experts, use_triton)
