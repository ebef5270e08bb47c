"""Argument checks shared by the permute ops and the dispatchers.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value)
naming the argument, and runs before any collective so a bad rank never hangs the others.
"""
from __future__ import annotations

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_routing(
    hidden: torch.Tensor,
    selected_experts: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    hidden_name: str = "hidden_states",
    weights_name: str = "routing_weights",
    hidden_size: int | None = None,
) -> None:
    """Static checks (no device sync) of ``hidden [N, H]``, ``selected_experts [N, K]`` and
    ``weights [N, K]``."""
    for name, t in ((hidden_name, hidden), ("selected_experts", selected_experts)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not torch.is_floating_point(hidden):
        raise TypeError(f"{hidden_name} must be floating point, got {hidden.dtype}")
    if hidden.dim() != 2:
        raise ValueError(f"{hidden_name} must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if hidden_size is not None and hidden.shape[1] != hidden_size:
        raise ValueError(f"{hidden_name} must have hidden size {hidden_size}, got shape {tuple(hidden.shape)}")
    if selected_experts.dtype not in _INT_DTYPES:
        raise TypeError(f"selected_experts must be an integer tensor, got {selected_experts.dtype}")
    if selected_experts.dim() != 2 or selected_experts.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"selected_experts must be [N, K] with N = {hidden_name}.shape[0] = {hidden.shape[0]}, "
            f"got shape {tuple(selected_experts.shape)}"
        )
    if selected_experts.device != hidden.device:
        raise ValueError(f"selected_experts is on {selected_experts.device} but {hidden_name} on {hidden.device}")
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{weights_name} must be a torch.Tensor, got {type(weights).__name__}")
    if not torch.is_floating_point(weights):
        raise TypeError(f"{weights_name} must be floating point, got {weights.dtype}")
    if weights.shape != selected_experts.shape:
        raise ValueError(
            f"{weights_name} must have selected_experts' shape {tuple(selected_experts.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    if weights.device != hidden.device:
        raise ValueError(f"{weights_name} is on {weights.device} but {hidden_name} on {hidden.device}")


def expert_ids_out_of_range(selected_experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 scalar tensor: how many ids fall outside ``[-1, num_experts)``. No host sync."""
    return ((selected_experts < -1) | (selected_experts >= num_experts)).sum()


def check_expert_ids_range(selected_experts: torch.Tensor, num_experts: int) -> None:
    """Raise ``ValueError`` if an id falls outside ``[-1, num_experts)`` (a host sync on GPU)."""
    if selected_experts.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(selected_experts.long()))  # host sync
    if lo < -1 or hi >= num_experts:
        bad = lo if lo < -1 else hi
        raise ValueError(f"selected_experts must be in [-1, {num_experts}), got {bad}")


def check_expert_output(expert_output: torch.Tensor, num_rows: int, hidden_size: int) -> None:
    """``combine``'s input must be a floating ``[R, H]`` tensor row-aligned with the dispatch."""
    if not isinstance(expert_output, torch.Tensor) or not torch.is_floating_point(expert_output):
        raise TypeError(f"expert_output must be a floating-point tensor, got {type(expert_output).__name__}")
    if expert_output.dim() != 2 or tuple(expert_output.shape) != (num_rows, hidden_size):
        raise ValueError(f"expert_output must be [R={num_rows}, H={hidden_size}] (R from the handle), "
                         f"got {tuple(expert_output.shape)}")


def describe(x) -> str:
    """``"<dtype> tensor of shape (..)"`` for a tensor, else the type's name (for error messages)."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
