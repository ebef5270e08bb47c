"""Eager autograd for a permute backend made of kernels: one ``autograd.Function`` per op, built
once per backend around its kernel functions, with no ``torch.library`` dispatch in the way (in
eager mode the custom-op dispatcher's host cost would be most of a call).

A kernel set is any object with these functions (the Triton kernels of
:mod:`moe_dispatch.kernels.permute` and the CUDA extension's wrappers in
:mod:`moe_dispatch.permute.cuda` both are)::

    permute(tokens [N, H], selected_experts [N, K], num_experts, probs [N, K] | None,
            align_size, num_out_rows | None) -> (permuted [M, H], permuted_probs [M] | None,
                                                 row_id_map int64 [N, K])
    unpermute(permuted [M, H], row_id_map, merging_probs | None) -> [N, H]
    unpermute_backward(grad_out [N, H], permuted [M, H], row_id_map, merging_probs | None,
                       probs_grad) -> (grad_permuted [M, H], grad_merging_probs [N, K] | None)
    permute_by_map(tokens [N, H], row_id_map, num_rows) -> [num_rows, H]
    permute_counted(same as permute) -> (permuted, permuted_probs, row_id_map,
                                         tokens_per_expert int64 [E])   (optional)

Backward of ``permute``: w.r.t. ``tokens`` an unpermute without weights (sum over k); w.r.t.
``probs`` a gather of ``grad_permuted_probs`` at ``row_id_map``. Backward of ``unpermute``: the
kernel set's ``unpermute_backward``. Backward of ``permute_by_map``: an unpermute without weights.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

__all__ = ["EagerOps", "needs_grad", "grad_of_permuted_probs"]


def needs_grad(a: torch.Tensor, b: torch.Tensor | None = None) -> bool:
    """Whether autograd must record a call on ``a`` and ``b`` (None ignored). Spelled out, not a
    generator over ``*tensors``: it runs on every eager call."""
    return torch.is_grad_enabled() and (a.requires_grad or (b is not None and b.requires_grad))


def grad_of_permuted_probs(grad_permuted_probs: torch.Tensor, row_id_map: torch.Tensor) -> torch.Tensor:
    """Backward of the probs' permute: a gather of N*K values (torch is enough). Dropped slots
    read the zero appended at row M."""
    padded = torch.cat([grad_permuted_probs, grad_permuted_probs.new_zeros(1)])
    return padded[torch.where(row_id_map >= 0, row_id_map, grad_permuted_probs.shape[0])]


class EagerOps:
    """``permute`` / ``unpermute`` / ``permute_by_map`` of one kernel set, differentiable in eager
    mode: a plain kernel call when no gradient is needed, else an ``autograd.Function``.

    Args:
        kernels: a zero-argument callable returning the kernel set (called on first use, so that
            importing a backend does not import its kernels).
    """

    def __init__(self, kernels: Callable[[], object]) -> None:
        self._get_kernels = kernels
        self._k = None
        ops = self

        class PermuteFn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, tokens, selected_experts, probs, num_experts, align_size, num_out_rows, counted):
                kernels = ops.kernels
                fn = kernels.permute_counted if counted else kernels.permute
                outs = tuple(fn(tokens, selected_experts, num_experts, probs, align_size, num_out_rows))
                ctx.mark_non_differentiable(*outs[2:])
                ctx.save_for_backward(outs[2])
                ctx.dtypes = (tokens.dtype, None if probs is None else probs.dtype)
                return outs

            @staticmethod
            def backward(ctx, grad_permuted, grad_permuted_probs, *_grads_of_maps):
                (row_id_map,) = ctx.saved_tensors
                grad_tokens = grad_probs = None
                if ctx.needs_input_grad[0] and grad_permuted is not None:
                    grad_tokens = ops.unpermute(grad_permuted, row_id_map, None).to(ctx.dtypes[0])
                if ctx.needs_input_grad[2] and grad_permuted_probs is not None:
                    grad_probs = grad_of_permuted_probs(grad_permuted_probs, row_id_map).to(ctx.dtypes[1])
                return grad_tokens, None, grad_probs, None, None, None, None

        class UnpermuteFn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, permuted, row_id_map, merging_probs):
                ctx.save_for_backward(permuted, row_id_map, merging_probs)
                return ops.kernels.unpermute(permuted, row_id_map, merging_probs)

            @staticmethod
            def backward(ctx, grad_out):
                permuted, row_id_map, merging_probs = ctx.saved_tensors
                probs_grad = merging_probs is not None and ctx.needs_input_grad[2]
                grad_permuted, grad_probs = ops.kernels.unpermute_backward(
                    grad_out, permuted, row_id_map, merging_probs, probs_grad)
                return grad_permuted, None, grad_probs

        class PermuteByMapFn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, tokens, row_id_map, num_rows):
                ctx.save_for_backward(row_id_map)
                return ops.kernels.permute_by_map(tokens, row_id_map, num_rows)

            @staticmethod
            def backward(ctx, grad_out):
                (row_id_map,) = ctx.saved_tensors
                return ops.unpermute(grad_out, row_id_map, None), None, None

        self._fns = SimpleNamespace(permute=PermuteFn, unpermute=UnpermuteFn, permute_by_map=PermuteByMapFn)

    @property
    def kernels(self):
        if self._k is None:
            self._k = self._get_kernels()
        return self._k

    def permute(self, tokens, selected_experts, num_experts, probs, align_size, num_out_rows):
        """``(permuted [M, H], permuted_probs [M] or None, row_id_map int64 [N, K])``."""
        if needs_grad(tokens, probs):
            return self._fns.permute.apply(tokens, selected_experts, probs, num_experts, align_size, num_out_rows, False)
        return self.kernels.permute(tokens, selected_experts, num_experts, probs, align_size, num_out_rows)

    def permute_counted(self, tokens, selected_experts, num_experts, probs, align_size, num_out_rows):
        """``permute``'s outputs and ``tokens_per_expert`` int64 ``[E]`` (rows of each expert, from
        the sort itself: no extra kernels, no host sync)."""
        if needs_grad(tokens, probs):
            return self._fns.permute.apply(tokens, selected_experts, probs, num_experts, align_size, num_out_rows, True)
        return self.kernels.permute_counted(tokens, selected_experts, num_experts, probs, align_size, num_out_rows)

    def unpermute(self, permuted, row_id_map, merging_probs):
        """``[N, H]`` in permuted's dtype."""
        if needs_grad(permuted, merging_probs):
            return self._fns.unpermute.apply(permuted, row_id_map, merging_probs)
        return self.kernels.unpermute(permuted, row_id_map, merging_probs)

    def permute_by_map(self, tokens, row_id_map, num_rows):
        """``[num_rows, H]``."""
        if needs_grad(tokens):
            return self._fns.permute_by_map.apply(tokens, row_id_map, num_rows)
        return self.kernels.permute_by_map(tokens, row_id_map, num_rows)
