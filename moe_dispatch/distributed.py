"""Differentiable collectives and small helpers shared by the dispatchers and the router.

Every collective here works on NCCL (CUDA tensors) and gloo (CPU tensors).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["all_to_all", "all_reduce_sum", "all_gather_rows", "collective_device", "group_rank", "group_size"]


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def collective_device(group) -> torch.device:
    """Where tensors for ``group``'s collectives must live (NCCL: the current CUDA device)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(row: torch.Tensor, group) -> torch.Tensor:
    """``[C]`` on every rank -> ``[P, C]`` (same C on every rank). Not differentiable.

    One all-gather into a flat buffer (NCCL and gloo): the list form costs a tensor per rank and
    a stack, which showed up as host time in every dispatch."""
    size = dist.get_world_size(group)
    out = row.new_empty(size * row.numel())
    _all_gather_single()(out, row.contiguous(), group=group)
    return out.view(size, row.numel())


def _all_gather_single():
    """``dist.all_gather_single`` where torch has it (newer torch warns that
    ``all_gather_into_tensor`` is deprecated), else ``all_gather_into_tensor`` (same signature)."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # The reverse exchange: what we received from rank s goes back to rank s.
        grad_in = _AllToAll.apply(grad_out.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` over dim 0 with uneven splits.

    Args:
        x: ``[sum(input_splits), ...]``; rows ``input_splits[r]`` go to rank r.
        output_splits: rows received from each rank.
        input_splits: rows sent to each rank.

    Returns:
        ``[sum(output_splits), ...]``, rank-major.
    """
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # Each rank holds the same replicated result and back-propagates its own copy; training
        # averages gradients over those ranks, so summing the copies here makes the average
        # equal to the gradient of one unsharded model.
        grad = grad_out.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over ``group`` (identity when ``group`` is None)."""
    if group is None:
        return x
    return _AllReduceSum.apply(x, group)
