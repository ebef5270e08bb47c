"""The dispatcher protocol: what every token-dispatch backend implements.

Shape legend (used in every module of the package)
    N  tokens on this rank            H  hidden size
    K  top-k (experts per token)      E  experts, global
    L  experts local to this rank     P  expert-parallel size (ranks in the EP group)
    R  rows received by this rank, grouped by local expert (sum of ``tokens_per_expert``)

Rank ``r`` of the EP group owns global experts ``[r * L, (r + 1) * L)``.

Row-order contract (identical for every backend): ``expert_input`` holds the rows of local
expert 0, then local expert 1, ...; within one expert, rows are ordered by
(source rank, source token index, k).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["DispatchOutput", "TokenDispatcher"]


@dataclass(frozen=True)
class DispatchOutput:
    """What ``TokenDispatcher.dispatch`` returns.

    Attributes:
        expert_input: ``[R, H]`` rows grouped by local expert, ascending, in ``hidden_states``'
            dtype. A backend may return more rows than ``tokens_per_expert`` sums to; rows past
            that sum are padding (zero) and must be ignored: a capacity-bound backend (its fixed
            blocks), and ``AllToAllTokenDispatcher`` at EP=1 without a group in dropless mode
            (``R = N * K`` so that no host sync is needed: one padding row per -1 slot).
        tokens_per_expert: int64 ``[L]`` on the input's device: rows of each local expert.
        handle: opaque, immutable; pass it unchanged to ``combine``.
    """

    expert_input: torch.Tensor
    tokens_per_expert: torch.Tensor
    handle: Any

    def tokens_per_expert_list(self) -> list[int]:
        """``tokens_per_expert`` as Python ints (a device-to-host sync on GPU)."""
        return [int(c) for c in self.tokens_per_expert.tolist()]  # host sync


@runtime_checkable
class TokenDispatcher(Protocol):
    """Moves tokens to the experts that routing chose and brings the results back.

    ``combine(dispatch(x, e, w).expert_input mapped row-wise by f, handle)[n]``
    equals ``sum_k w[n, k] * f_{e[n, k]}(x[n])``, with ``e[n, k] == -1`` contributing zero.

    Dispatchers are plain objects (no parameters), bound to a group after construction
    (``set_ep_group``) and freed with ``close()``. A dispatcher keeps no per-step state:
    everything ``combine`` needs travels in the handle, so several micro-batches may be in
    flight at once.
    """

    def dispatch(
        self,
        hidden_states: torch.Tensor,
        selected_experts: torch.Tensor,
        routing_weights: torch.Tensor,
    ) -> DispatchOutput:
        """Send each token to the ranks owning its experts, grouped by local expert.

        Args:
            hidden_states: ``[N, H]`` floating point.
            selected_experts: ``[N, K]`` integer global expert ids in ``[-1, E)``; -1 drops
                that slot.
            routing_weights: ``[N, K]`` floating point; applied (in fp32) by ``combine``.

        Returns:
            ``DispatchOutput`` with ``expert_input [R, H]``.

        Raises:
            TypeError / ValueError naming the argument, before any token moves.
        """
        ...

    def combine(self, expert_output: torch.Tensor, handle: Any) -> torch.Tensor:
        """Weighted sum of each token's expert outputs, back in token order.

        Args:
            expert_output: ``[R, H]``, row-aligned with ``DispatchOutput.expert_input``.
            handle: the ``DispatchOutput.handle`` of the matching ``dispatch``.

        Returns:
            ``[N, H]`` in ``hidden_states``' dtype; weights applied and summed in fp32.
        """
        ...

    def set_ep_group(self, group: Any) -> None:
        """Bind to an expert-parallel ``ProcessGroup`` (``None``: single rank, no communication).

        One verb family binds groups across the package: ``set_ep_group`` on a dispatcher and on
        ``TopKRouter``; ``set_ep_groups`` on a model binds all its dispatchers and routers.
        """
        ...

    def close(self) -> None:
        """Free what the dispatcher holds (buffers, communicators); a no-op where it holds nothing.
        Handles of earlier dispatches cannot be combined afterwards. Every dispatcher is also a
        context manager: ``with Dispatcher(...) as d:`` calls ``close()`` on the way out."""
        ...
