"""Top-k routing: gate logits -> (selected_experts, routing_weights, aux_loss).

Normalization modes follow TensorRT-LLM's MoE routing names:

- ``"none"``: top-k of the softmax over all experts (weights do not sum to 1).
- ``"renorm"``: top-k of the softmax, renormalised to sum to 1 (Mixtral); equal to the softmax
  over the top-k logits.
- ``"sparse_mixer"``: Phi-3.5-MoE SparseMixer, inference form: expert i is the arg-max of the
  logits not yet chosen; its weight is the softmax over the remaining logits within a relative
  margin ``2 * sparse_mixer_epsilon`` of that max.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum

__all__ = ["TopKRouter", "RouterOutput", "LoadStats", "NORMALIZATIONS", "AUX_LOSS_CONVENTIONS",
           "router_load_stats", "pool_load_stats", "load_balancing_loss", "switch_load_balancing_loss"]

NORMALIZATIONS = ("none", "renorm", "sparse_mixer")
AUX_LOSS_CONVENTIONS = ("switch", "megatron")


def _sparse_mixer(logits: torch.Tensor, top_k: int, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` fp32 ``[N, E]`` -> ``(weights [N, K] fp32, selected [N, K] int64)``."""
    remaining = logits
    weights, selected = [], []
    for _ in range(top_k):
        top, idx = remaining.max(dim=-1, keepdim=True)
        # Relative distance to the current max; experts farther than 2*eps are masked out.
        factor = logits.abs().clamp(min=top)
        masked = remaining.masked_fill((top - logits) / factor > 2 * epsilon, float("-inf"))
        weights.append(torch.softmax(masked, dim=-1).gather(-1, idx))
        selected.append(idx)
        remaining = remaining.scatter(-1, idx, float("-inf"))
    return torch.cat(weights, -1), torch.cat(selected, -1)


class LoadStats(NamedTuple):
    """Router load statistics of one layer (or of several, pooled with :func:`pool_load_stats`).

    Summed over the router's group (EP and/or DP ranks) when it has one, so every rank holds the
    statistics of the unsharded batch. Padding tokens (``token_mask == False``) are left out.

    Attributes:
        assignments: fp32 ``[E]`` top-k assignments per expert (a token counts once per slot
            that chose the expert; dropped ``-1`` slots count nowhere). No gradient.
        prob_sum: fp32 ``[E]`` router probability mass per expert (differentiable).
        tokens: fp32 scalar, tokens counted.
    """

    assignments: torch.Tensor
    prob_sum: torch.Tensor
    tokens: torch.Tensor


def router_load_stats(probs: torch.Tensor, selected_experts: torch.Tensor, token_mask: torch.Tensor | None = None,
                      group=None) -> LoadStats:
    """The :class:`LoadStats` of one routing decision.

    Args:
        probs: fp32 ``[N, E]`` softmax over all experts.
        selected_experts: int ``[N, K]`` in ``[-1, E)``.
        token_mask: bool ``[N]`` (True: a real token) or None (every token counts).
        group: process group to sum the statistics over, or None.
    """
    num_tokens, num_experts = probs.shape
    slot_weight_NK = (selected_experts >= 0).to(probs.dtype)
    if token_mask is not None:
        if token_mask.shape != (num_tokens,):
            raise ValueError(f"token_mask must be [N] = [{num_tokens}], got {tuple(token_mask.shape)}")
        keep_N = token_mask.to(probs.dtype)
        slot_weight_NK = slot_weight_NK * keep_N[:, None]
        probs = probs * keep_N[:, None]
        tokens = keep_N.sum()
    else:
        tokens = probs.new_tensor(float(num_tokens))
    # scatter_add, not one_hot: O(N*K) memory, and no device-to-host sync (unlike bincount)
    assignments = probs.new_zeros(num_experts).scatter_add_(
        0, selected_experts.clamp(min=0).reshape(-1), slot_weight_NK.reshape(-1)).detach()
    stats = torch.cat([assignments, probs.sum(0), tokens.reshape(1)])
    stats = all_reduce_sum(stats, group)
    return LoadStats(stats[:num_experts], stats[num_experts:-1], stats[-1])


def pool_load_stats(stats: Sequence[LoadStats]) -> LoadStats:
    """Sum the statistics of several layers into one (HF's "global" load-balancing loss)."""
    if not stats:
        raise ValueError("pool_load_stats needs at least one LoadStats")
    return LoadStats(*(torch.stack(field).sum(0) for field in zip(*stats)))


def load_balancing_loss(stats: LoadStats, top_k: int, convention: str = "switch") -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (unscaled), fp32 scalar.

    ``P_e = prob_sum_e / tokens`` is the mean router probability of expert e, and ``f_e`` the
    fraction of routing slots it received, counted one of two ways:

    - ``"switch"`` (HF transformers' ``load_balancing_loss_func``, and this package's default):
      ``f_e = assignments_e / tokens``, so ``sum_e f_e = K``. Uniform routing gives ``K``.
    - ``"megatron"`` (Megatron-Core's ``switch_load_balancing_loss_func``):
      ``f_e = assignments_e / (tokens * K)``, so ``sum_e f_e = 1``. Uniform routing gives 1.

    At equal coefficient the ``"switch"`` loss is ``K`` times the ``"megatron"`` one: divide
    the coefficient by K to carry a Megatron recipe over to ``"switch"``.
    """
    if convention not in AUX_LOSS_CONVENTIONS:
        raise ValueError(f"convention must be one of {AUX_LOSS_CONVENTIONS}, got {convention!r}")
    tokens = stats.tokens.clamp(min=1)
    frac = stats.assignments / (tokens * top_k if convention == "megatron" else tokens)
    return stats.prob_sum.numel() * (frac * (stats.prob_sum / tokens)).sum()


def switch_load_balancing_loss(
    probs: torch.Tensor, selected_experts: torch.Tensor, group=None, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`load_balancing_loss` (``"switch"``) of one routing decision: ``E * sum_e f_e * P_e``.

    Args:
        probs: fp32 ``[N, E]`` softmax over all experts.
        selected_experts: int ``[N, K]``.
        group: statistics summed over it first, so every rank gets the unsharded batch's loss.
        token_mask: bool ``[N]``; padding (False) is left out of both statistics.
    """
    return load_balancing_loss(router_load_stats(probs, selected_experts, token_mask, group),
                               selected_experts.shape[-1])


@dataclass(frozen=True)
class RouterOutput:
    """What :meth:`TopKRouter.route` returns.

    Attributes:
        selected_experts: int64 ``[N, K]``.
        routing_weights: fp32 ``[N, K]``.
        logits: fp32 ``[N, E]`` gate output (HF's ``router_logits``).
        aux_loss: fp32 scalar, ``aux_loss_coeff * load_balancing_loss`` (0 when the coefficient is 0).
        load_stats: :class:`LoadStats` when the aux loss is on or they were asked for, else None.
    """

    selected_experts: torch.Tensor
    routing_weights: torch.Tensor
    logits: torch.Tensor
    aux_loss: torch.Tensor
    load_stats: LoadStats | None = None


class TopKRouter(nn.Module):
    """Linear gate + top-k selection + optional load-balancing loss.

    Args:
        hidden_size: H.
        num_experts: E.
        top_k: K, ``1 <= K <= E``.
        normalization: ``"none" | "renorm" | "sparse_mixer"`` (see module docstring).
        jitter_noise: in training, multiply the router input by U(1-j, 1+j) noise.
        aux_loss_coeff: scale of the Switch load-balancing loss (0 disables it).
        sparse_mixer_epsilon: SparseMixer's margin (Phi-3.5-MoE uses 0.01).
        aux_loss_convention: ``"switch"`` (HF, default) or ``"megatron"``: how the fraction of
            tokens per expert is normalised (see :func:`load_balancing_loss`; ``"switch"`` is
            K times ``"megatron"`` at equal coefficient).

    ``forward(hidden_states [N, H], token_mask=None)`` returns ``(selected_experts int64 [N, K],
    routing_weights fp32 [N, K], aux_loss fp32 scalar)``; :meth:`route` returns the same and
    more as a :class:`RouterOutput`. The gate runs in the input's dtype (pass an fp32 input to
    route in high precision); softmax and weights are fp32.

    Raises:
        ValueError naming the argument on a bad value.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        normalization: str = "renorm",
        jitter_noise: float = 0.0,
        aux_loss_coeff: float = 0.0,
        *,
        sparse_mixer_epsilon: float = 0.01,
        aux_loss_convention: str = "switch",
    ) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if jitter_noise < 0 or aux_loss_coeff < 0:
            raise ValueError(f"jitter_noise and aux_loss_coeff must be >= 0, got {jitter_noise}, {aux_loss_coeff}")
        if aux_loss_convention not in AUX_LOSS_CONVENTIONS:
            raise ValueError(f"aux_loss_convention must be one of {AUX_LOSS_CONVENTIONS}, got {aux_loss_convention!r}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.normalization, self.jitter_noise, self.aux_loss_coeff = normalization, jitter_noise, aux_loss_coeff
        self.sparse_mixer_epsilon = sparse_mixer_epsilon
        self.aux_loss_convention = aux_loss_convention
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self._group = None

    def set_ep_group(self, group) -> None:
        """Sum the load-balancing statistics over ``group`` (EP and/or DP ranks); None: local only."""
        self._group = group

    set_group = set_ep_group  # the earlier name, kept for existing callers

    def load_balancing_loss(self, stats: LoadStats) -> torch.Tensor:
        """The unscaled :func:`load_balancing_loss` of ``stats`` in this router's convention."""
        return load_balancing_loss(stats, self.top_k, self.aux_loss_convention)

    def route(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, *,
              need_load_stats: bool = False) -> RouterOutput:
        """Route ``hidden_states [N, H]``.

        Args:
            token_mask: bool ``[N]``; False marks padding, left out of the load statistics
                (it is still routed: its output is simply not used).
            need_load_stats: compute :class:`LoadStats` even when ``aux_loss_coeff == 0``
                (a model that pools them over layers asks for them).
        """
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [N, {self.hidden_size}], got {tuple(hidden_states.shape)}")
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        logits = F.linear(hidden_states, self.gate.weight.to(hidden_states.dtype)).float()  # [N, E]
        probs = torch.softmax(logits, dim=-1)
        if self.normalization == "sparse_mixer":
            weights, selected = _sparse_mixer(logits, self.top_k, self.sparse_mixer_epsilon)
        else:
            weights, selected = torch.topk(probs, self.top_k, dim=-1)
            if self.normalization == "renorm":
                weights = weights / weights.sum(dim=-1, keepdim=True)
        stats = None
        if self.aux_loss_coeff > 0 or need_load_stats:
            stats = router_load_stats(probs, selected, token_mask, self._group)
        if self.aux_loss_coeff > 0:
            aux_loss = self.aux_loss_coeff * self.load_balancing_loss(stats)
        else:
            aux_loss = logits.new_zeros(())
        return RouterOutput(selected, weights, logits, aux_loss, stats)

    def forward(self, hidden_states: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(selected_experts int64 [N, K], routing_weights fp32 [N, K], aux_loss fp32 scalar)``."""
        out = self.route(hidden_states, token_mask)
        return out.selected_experts, out.routing_weights, out.aux_loss
