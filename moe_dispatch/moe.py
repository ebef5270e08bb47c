"""A generic MoE layer: route -> dispatch -> experts -> combine.

Shape legend (as in :mod:`moe_dispatch.protocol`)::

    N  tokens on this rank     H  hidden size     K  top-k
    L  local experts           R  rows received by this rank, grouped by local expert

The layer owns a router and the experts (both ``nn.Module``) and holds a dispatcher (a plain
object that may be shared by every layer of a model). Any :class:`~moe_dispatch.TokenDispatcher`
works; the layer never looks inside the handle.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from .protocol import TokenDispatcher
from .routing import LoadStats

__all__ = ["MoELayer", "MoEOutput"]


@dataclass(frozen=True)
class MoEOutput:
    """What :meth:`MoELayer.forward` returns; unpacks as ``hidden_states, aux_loss = layer(x)``.

    Attributes:
        hidden_states: ``[..., H]`` in the input's dtype.
        aux_loss: fp32 scalar, the router's (already scaled) load-balancing loss; 0 when off.
        router_logits: fp32 ``[N, E]`` gate logits (N = tokens of the input, flattened), when
            the router reports them (``TopKRouter`` does), else None.
        load_stats: the router's :class:`~moe_dispatch.routing.LoadStats` when it computed
            them (aux loss on, or ``need_load_stats=True``), else None.
    """

    hidden_states: torch.Tensor
    aux_loss: torch.Tensor
    router_logits: torch.Tensor | None = None
    load_stats: LoadStats | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        # The two values every caller wants; the router's details are attributes.
        return iter((self.hidden_states, self.aux_loss))

    def _replace(self, **changes) -> "MoEOutput":
        """A copy with ``changes`` applied (as ``NamedTuple._replace``)."""
        return replace(self, **changes)


def _keep_dtype(fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a ``Module._apply`` function so tensors of ``dtype`` keep it (device moves still apply)."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if t.dtype == dtype and out.is_floating_point() and out.dtype != dtype:
            return t.to(device=out.device)
        return out

    return apply


class MoELayer(nn.Module):
    """Mixture-of-Experts layer on any token dispatcher.

    Args:
        router: ``hidden [N, H] -> (selected_experts int64 [N, K], routing_weights fp32 [N, K],
            aux_loss fp32 scalar)``, e.g. :class:`moe_dispatch.TopKRouter`. A router with a
            ``route(hidden, token_mask, need_load_stats=...)`` method returning a
            :class:`~moe_dispatch.routing.RouterOutput` (as ``TopKRouter``) also reports its
            logits and load statistics.
        experts: ``(expert_input [R, H], tokens_per_expert int64 [L]) -> [R, H]``, e.g.
            :class:`moe_dispatch.experts.SwiGLUExperts`.
        dispatcher: a :class:`~moe_dispatch.TokenDispatcher`.
        router_dtype: the router's parameters stay in this dtype through ``.to()`` /
            ``.bfloat16()`` / ``.half()`` of any parent module, and its input is cast to it, so
            routing decisions are taken in high precision (default fp32). ``None`` routes in the
            input's dtype.

    Attributes:
        last_tokens_per_expert: int64 ``[L]``, detached: rows each local expert received in the
            last forward (summed over all EP ranks, i.e. the global load of the local experts);
            ``None`` before the first forward. For load-balance monitoring only.
    """

    def __init__(
        self,
        router: nn.Module,
        experts: nn.Module,
        dispatcher: TokenDispatcher,
        *,
        router_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(dispatcher, TokenDispatcher):
            raise TypeError(f"dispatcher must implement moe_dispatch.TokenDispatcher, got {type(dispatcher).__name__}")
        self.router = router
        self.experts = experts
        self.dispatcher = dispatcher
        self.router_dtype = router_dtype
        if router_dtype is not None:
            self.router.to(router_dtype)
        self.last_tokens_per_expert: torch.Tensor | None = None

    def _apply(self, fn, recurse: bool = True):
        if self.router_dtype is None or not recurse:
            return super()._apply(fn, recurse)
        for name, child in self.named_children():
            child._apply(_keep_dtype(fn, self.router_dtype) if child is self.router else fn)
        return super()._apply(fn, recurse=False)

    def _fused_experts(self, x_NH, selected_experts_NK, routing_weights_NK):
        """``(out [N, H], tokens_per_expert [L])`` when the dispatcher has one rank (``ep_size == 1``)
        and drops nothing (dropless: a capacity-mode dispatcher's drop policy must still apply),
        and the experts fuse the permute and the combine into their GEMMs (``forward_tokens``
        returns non-None: the ``"fused"`` expert backend), else None (dispatch -> experts -> combine)."""
        forward_tokens = getattr(self.experts, "forward_tokens", None)
        if (forward_tokens is None or getattr(self.dispatcher, "ep_size", None) != 1
                or getattr(self.dispatcher, "dropless", True) is False):
            return None
        return forward_tokens(x_NH, selected_experts_NK, routing_weights_NK)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, *,
                need_load_stats: bool = False) -> MoEOutput:
        """Route every token to its top-k experts and sum their weighted outputs.

        Args:
            hidden_states: ``[..., H]`` (e.g. ``[B, S, H]``), floating point.
            token_mask: bool ``[...]`` (``hidden_states``' leading shape; True: real token) or
                None. Padding is still computed but left out of the router's load statistics.
            need_load_stats: ask the router for its load statistics even when its own aux loss
                is off (a model pooling them over layers does).

        Returns:
            :class:`MoEOutput` with ``hidden_states [..., H]`` in the input's dtype.
        """
        input_shape = hidden_states.shape
        x_NH = hidden_states.reshape(-1, input_shape[-1])
        if token_mask is not None:
            if tuple(token_mask.shape) != tuple(input_shape[:-1]):
                raise ValueError(f"token_mask must have shape {tuple(input_shape[:-1])} (hidden_states without H), "
                                 f"got {tuple(token_mask.shape)}")
            token_mask = token_mask.reshape(-1).bool()

        # route: [N, K] expert ids and fp32 weights, in high precision
        router_input_NH = x_NH if self.router_dtype is None else x_NH.to(self.router_dtype)
        router_logits_NE = load_stats = None
        if hasattr(self.router, "route"):
            routed = self.router.route(router_input_NH, token_mask, need_load_stats=need_load_stats)
            selected_experts_NK, routing_weights_NK, aux_loss = (
                routed.selected_experts, routed.routing_weights, routed.aux_loss)
            router_logits_NE, load_stats = routed.logits, routed.load_stats
        else:
            selected_experts_NK, routing_weights_NK, aux_loss = self.router(router_input_NH)

        fused = self._fused_experts(x_NH, selected_experts_NK, routing_weights_NK)
        if fused is not None:  # one rank, experts that gather and combine by the routing themselves
            out_NH, tokens_per_expert = fused
            self.last_tokens_per_expert = tokens_per_expert.detach()
            return MoEOutput(out_NH.view(input_shape), aux_loss, router_logits_NE, load_stats)

        # dispatch: rows grouped by local expert, [R, H]
        dispatched = self.dispatcher.dispatch(x_NH, selected_experts_NK, routing_weights_NK)
        self.last_tokens_per_expert = dispatched.tokens_per_expert.detach()

        # experts: [R, H]
        expert_output_RH = self.experts(dispatched.expert_input, dispatched.tokens_per_expert)

        # combine: weighted sum back in token order, [N, H]
        out_NH = self.dispatcher.combine(expert_output_RH, dispatched.handle)
        return MoEOutput(out_NH.view(input_shape), aux_loss, router_logits_NE, load_stats)
