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

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum

__all__ = ["TopKRouter", "NORMALIZATIONS", "switch_load_balancing_loss"]

NORMALIZATIONS = ("none", "renorm", "sparse_mixer")


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


def switch_load_balancing_loss(
    probs: torch.Tensor, selected_experts: torch.Tensor, group=None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (unscaled).

    ``f_e``: fraction of tokens routed to expert e (summed over k, as in HF Mixtral);
    ``P_e``: mean router probability of expert e. With ``group``, both statistics are summed
    over the group first, so every rank gets the loss of the unsharded batch.

    Args:
        probs: fp32 ``[N, E]`` softmax over all experts.
        selected_experts: int ``[N, K]``.
    """
    num_experts = probs.shape[-1]
    counts = F.one_hot(selected_experts.clamp(min=0), num_experts).mul_((selected_experts >= 0).unsqueeze(-1))
    stats = torch.cat([
        counts.sum((0, 1)).to(probs.dtype),  # tokens per expert (no gradient)
        probs.sum(0),                        # router probability mass per expert
        probs.new_tensor([probs.shape[0]]),  # tokens
    ])
    stats = all_reduce_sum(stats, group)
    tokens = stats[-1].clamp(min=1)
    frac_tokens, mean_prob = stats[:num_experts] / tokens, stats[num_experts:-1] / tokens
    return num_experts * (frac_tokens * mean_prob).sum()


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

    ``forward(hidden_states [N, H])`` returns ``(selected_experts int64 [N, K],
    routing_weights fp32 [N, K], aux_loss fp32 scalar)``. The gate runs in the input's dtype
    (pass an fp32 input to route in high precision); softmax and weights are fp32.
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
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.normalization, self.jitter_noise, self.aux_loss_coeff = normalization, jitter_noise, aux_loss_coeff
        self.sparse_mixer_epsilon = sparse_mixer_epsilon
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self._group = None

    def set_group(self, group) -> None:
        """All-reduce the load-balancing statistics over ``group`` (EP and/or DP ranks)."""
        self._group = group

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        if self.aux_loss_coeff > 0:
            aux_loss = self.aux_loss_coeff * switch_load_balancing_loss(probs, selected, self._group)
        else:
            aux_loss = logits.new_zeros(())
        return selected, weights, aux_loss
