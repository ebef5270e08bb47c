"""Triton kernels: top-k expert ids -> multi-hot routing map + dense probs, and its backward.

Imports torch and triton only (nothing else of ours). Import this module lazily: it imports
triton at the top, and under ``TRITON_INTERPRET=1`` Triton decides how to run the kernels when
they are defined, i.e. when this module is first imported.

Shape legend: R rows (tokens received by this rank), K top-k, L local experts.

What the kernels compute (``moe_dispatch.routing_maps`` holds the torch reference)::

    routing_map[r, e] = any_k (topk_idx[r, k] == e)                  bool [R, L]
    dense_probs[r, e] = sum_k (topk_idx[r, k] == e) * topk_weights[r, k]  fp32 [R, L]
    grad_topk_weights[r, k] = grad_dense_probs[r, topk_idx[r, k]]   if 0 <= topk_idx[r, k] < L
                              0                                       otherwise

Worked example, R=2, K=2, L=3::

    topk_idx     = [[2, 0], [-1, 1]]      routing_map = [[1, 0, 1], [0, 1, 0]]
    topk_weights = [[.7, .3], [.5, .9]]   dense_probs = [[.3, 0, .7], [0, .9, 0]]

Ids outside ``[0, L)`` (-1: expert on another rank) select nothing and get zero gradient.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .launcher import launch

__all__ = ["indices_to_multihot", "multihot_probs_backward"]


@triton.jit(do_not_specialize=["num_rows"])
def _indices_to_multihot_kernel(
    idx_ptr, weight_ptr, map_ptr, probs_ptr,
    num_rows, num_experts, topk,
    stride_idx_r, stride_idx_k, stride_w_r, stride_w_k,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program writes a ``[BLOCK_R, BLOCK_E]`` tile of both outputs (contiguous ``[R, L]``),
    comparing the tile's columns with each of the rows' K ids: every output byte written once,
    no zero-fill pass, no scattered stores."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = rows < num_rows
    rows64 = rows.to(tl.int64)  # int64 offsets: R * L and R * stride can pass 2**31
    hit = tl.zeros([BLOCK_R, BLOCK_E], dtype=tl.int32)
    acc = tl.zeros([BLOCK_R, BLOCK_E], dtype=tl.float32)
    for k in range(topk):
        e = tl.load(idx_ptr + rows64 * stride_idx_r + k * stride_idx_k, mask=row_ok, other=-1)
        w = tl.load(weight_ptr + rows64 * stride_w_r + k * stride_w_k, mask=row_ok, other=0.0)
        eq = e[:, None] == cols[None, :]
        hit = hit | eq.to(tl.int32)
        acc += tl.where(eq, w[:, None], 0.0)
    out = rows64[:, None] * num_experts + cols[None, :]
    mask = row_ok[:, None] & (cols[None, :] < num_experts)
    tl.store(map_ptr + out, hit.to(tl.int8), mask=mask)
    tl.store(probs_ptr + out, acc, mask=mask)


@triton.jit(do_not_specialize=["num_rows"])
def _multihot_probs_backward_kernel(
    grad_ptr, idx_ptr, out_ptr,
    num_rows, num_experts, topk,
    stride_g_r, stride_g_e, stride_idx_r, stride_idx_k,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program gathers ``grad[r, idx[r, k]]`` for ``BLOCK_R`` rows and all K slots."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    mask = (rows < num_rows)[:, None] & (ks < topk)[None, :]
    e = tl.load(idx_ptr + rows64[:, None] * stride_idx_r + ks[None, :] * stride_idx_k, mask=mask, other=-1)
    valid = mask & (e >= 0) & (e < num_experts)
    g = tl.load(grad_ptr + rows64[:, None] * stride_g_r + e * stride_g_e, mask=valid, other=0.0)
    tl.store(out_ptr + rows64[:, None] * topk + ks[None, :], g.to(tl.float32), mask=mask)


def _on_device(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current CUDA device); no context switch
    (host time) when it is the current one already."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_idx(topk_idx: torch.Tensor) -> None:
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_idx must be int32 or int64, got {topk_idx.dtype}")
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be 2-D [R, K], got shape {tuple(topk_idx.shape)}")


def indices_to_multihot(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_local_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher of the forward kernel.

    Args:
        topk_idx: int32/int64 ``[R, K]`` local expert ids, -1 (or any id outside ``[0, L)``)
            for none; any strides.
        topk_weights: fp32 ``[R, K]``, same device; any strides.
        num_local_experts: L.

    Returns:
        ``(routing_map bool [R, L], dense_probs fp32 [R, L])``, contiguous, on the inputs' device.
    """
    _check_idx(topk_idx)
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights must be float32, got {topk_weights.dtype}")
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"topk_weights must have topk_idx's shape {tuple(topk_idx.shape)}, got {tuple(topk_weights.shape)}")
    if topk_weights.device != topk_idx.device:
        raise ValueError(f"topk_weights is on {topk_weights.device} but topk_idx on {topk_idx.device}")
    num_rows, topk = topk_idx.shape
    device = topk_idx.device
    routing_map = torch.empty(num_rows, num_local_experts, dtype=torch.int8, device=device)
    dense_probs = torch.empty(num_rows, num_local_experts, dtype=torch.float32, device=device)
    if num_rows > 0 and num_local_experts > 0:
        block_e = min(128, 1 << (num_local_experts - 1).bit_length())
        block_r = max(1, min(64, 4096 // block_e))
        grid = (-(-num_rows // block_r), -(-num_local_experts // block_e))  # (triton.cdiv is a jit function: slow on the host)
        with _on_device(device):
            launch(_indices_to_multihot_kernel, grid, (
                topk_idx, topk_weights, routing_map, dense_probs,
                num_rows, num_local_experts, topk,
                topk_idx.stride(0), topk_idx.stride(1), topk_weights.stride(0), topk_weights.stride(1),
            ), dict(BLOCK_R=block_r, BLOCK_E=block_e), 4)
    return routing_map.view(torch.bool), dense_probs


def multihot_probs_backward(grad_dense_probs: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """Launcher of the backward kernel: ``grad [R, L]`` -> fp32 ``[R, K]``.

    Args:
        grad_dense_probs: floating ``[R, L]``, any strides (autograd may hand in expanded,
            stride-0 gradients).
        topk_idx: int32/int64 ``[R, K]``, as given to the forward.

    Returns:
        fp32 ``[R, K]``: ``grad[r, topk_idx[r, k]]``, 0 where the id is outside ``[0, L)``.
    """
    _check_idx(topk_idx)
    if not torch.is_floating_point(grad_dense_probs) or grad_dense_probs.dim() != 2:
        raise TypeError(f"grad_dense_probs must be a 2-D floating tensor, got {grad_dense_probs.dtype} {tuple(grad_dense_probs.shape)}")
    if grad_dense_probs.shape[0] != topk_idx.shape[0]:
        raise ValueError(f"grad_dense_probs has {grad_dense_probs.shape[0]} rows, topk_idx {topk_idx.shape[0]}")
    num_rows, topk = topk_idx.shape
    num_experts = grad_dense_probs.shape[1]
    out = torch.empty(num_rows, topk, dtype=torch.float32, device=topk_idx.device)
    if num_rows > 0 and topk > 0:
        block_k = 1 << (topk - 1).bit_length()
        block_r = max(1, min(64, 2048 // block_k))
        grid = (-(-num_rows // block_r),)
        with _on_device(topk_idx.device):
            launch(_multihot_probs_backward_kernel, grid, (
                grad_dense_probs, topk_idx, out,
                num_rows, num_experts, topk,
                grad_dense_probs.stride(0), grad_dense_probs.stride(1), topk_idx.stride(0), topk_idx.stride(1),
            ), dict(BLOCK_R=block_r, BLOCK_K=block_k), 4)
    return out
