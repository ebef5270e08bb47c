"""``AllToAllTokenDispatcher``: permute locally, ``all_to_all_single``, regroup by local expert.

Stages of a dispatch (each a private method, so each can be timed and later overlapped):

1. ``_exchange_counts``: one all-gather of every rank's tokens-per-expert row (plus an error
   flag, the hidden size and dtype, so a bad rank makes every rank raise instead of hanging),
   then one device-to-host copy: the only host sync of a dispatch.
2. ``_permute``: local permute by global expert; global experts are rank-major, so this also
   groups rows by destination rank.
3. ``_exchange_tokens``: ``all_to_all_single`` with uneven splits (differentiable: backward is
   the reverse exchange).
4. ``_regroup``: received rows come as (source rank, local expert) chunks; reorder them to
   (local expert, source rank), the row-order contract of the protocol.

Combine runs the stages backwards and applies the routing weights in fp32 in the unpermute.
Works on NCCL (CUDA) and gloo (CPU).

**One rank** (``ep_size == 1`` and no process group, dropless): there is nothing to exchange, so dispatch is the
permute alone -- ``permute_counted`` with ``N * K`` output rows (the most the routing can
fill), its own per-expert counts as ``tokens_per_expert`` -- and combine the unpermute alone:
no host sync, no launch besides the permute kernels (two for the triton backend, one more for
combine), CUDA-graph capturable. ``expert_input`` has ``N * K`` rows: the
``sum(tokens_per_expert)`` rows of the contract's order, then one zero padding row per slot
with id -1 (none when every slot has an expert; combine ignores them, their gradient is zero).
Expert ids outside ``[-1, E)`` raise ValueError on CPU (free to check); on CUDA they would
need a host sync to be reported and select nothing, as in capacity mode.

**Capacity mode** (``max_tokens_per_rank=C, dropless=False``): no host sync at all, CUDA-graph
capturable end to end. Every rank sends every rank one block of B = C * min(K, L) rows (the
NVLink dispatcher's capacity), so the splits are equal and known without looking at the
routing; slots beyond B for one destination are dropped by the policy of
:mod:`.capacity` (lowest routing weight first, ties: higher token index first) and reported
in ``handle.dropped_slots``. ``expert_input`` has ``P * B`` rows: the
``sum(tokens_per_expert)`` rows of the contract's order, then zero padding rows (combine
ignores them; their gradient is zero). Unlike the NVLink dispatcher, N may exceed C (the excess
is dropped). Expert ids outside ``[-1, E)`` select nothing; on CPU (gloo, or no group) they
raise on every rank, on CUDA they cannot be reported without a host sync. When nothing
overflows, everything equals dropless mode bitwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_expert_ids_range, check_expert_output, expert_ids_out_of_range
from ..distributed import all_gather_rows, all_to_all, collective_device, group_rank
from ..permute import backend_module, count_tokens_per_expert, resolve_backend
from ..permute.reference import exclusive_cumsum
from ..protocol import DispatchOutput
from ._base import DTYPE_CODES, DispatcherBase, raise_on_bad_ranks
from .capacity import capacity_layout, capacity_regroup_index, capacity_slots

__all__ = ["AllToAllTokenDispatcher", "AllToAllHandle"]


@dataclass(frozen=True)
class AllToAllHandle:
    """Everything ``combine`` needs; immutable, so several micro-batches can be in flight.

    Attributes:
        row_id_map: int64 ``[N, K]``: row of the local permuted buffer for each (token, k).
        routing_weights: ``[N, K]`` weights applied by combine.
        send_splits: rows sent to each rank in dispatch (= received back in combine).
        recv_splits: rows received from each rank in dispatch.
        rank_major_index: int64 ``[R]`` gather index from expert-major rows back to the
            received (source rank, local expert) order; None when no regrouping was needed.
        num_received_rows: R, the rows of ``expert_input`` (``N * K`` at EP=1 without a group).
        hidden_dtype: dtype of ``hidden_states``; combine returns it.
        permute_backend: the resolved permute backend dispatch used (combine's unpermute too).
        dropped_slots: capacity mode: bool ``[N, K]``, slots with a valid expert that the drop
            policy left out (device tensor, no host sync); None in dropless mode.
    """

    row_id_map: torch.Tensor
    routing_weights: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    rank_major_index: torch.Tensor | None
    num_received_rows: int
    hidden_dtype: torch.dtype
    group: object
    permute_backend: str
    dropped_slots: torch.Tensor | None = None


def chunk_transpose_index(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Gather index that turns rows laid out as chunks ``(a, b)`` (a-major) into ``(b, a)`` order.

    Args:
        counts: int64 ``[A, B]`` on the rows' device; chunk (a, b) has ``counts[a, b]`` rows.
        total: ``counts.sum()``, known on the host.

    Returns:
        int64 ``[total]``: ``out = rows[index]`` is b-major. No host sync.

    Example: counts ``[[1, 2], [3, 0]]`` (rows ``a0b0 | a0b1 a0b1 | a1b0 a1b0 a1b0``) ->
    index ``[0, 3, 4, 5, 1, 2]``.
    """
    src_start = exclusive_cumsum(counts.reshape(-1)).view_as(counts)
    lengths = counts.t().reshape(-1)
    shift = src_start.t().reshape(-1) - exclusive_cumsum(lengths)
    return torch.repeat_interleave(shift, lengths, output_size=total) + torch.arange(total, device=counts.device)


class AllToAllTokenDispatcher(DispatcherBase):
    """Token dispatcher on ``torch.distributed.all_to_all_single`` and the permute kernels.

    Args:
        num_experts: E, global.
        num_local_experts: L = E / ep_size, experts on each rank.
        hidden_size: H.
        ep_size: ranks of the EP group; 1 means no communication.
        permute_backend: ``"auto" | "torch" | "triton" | "cuda" | "te"`` (see ``moe_dispatch.permute``).
        max_tokens_per_rank: C, the capacity (see the module docstring); required with
            ``dropless=False``, unused in dropless mode.
        dropless: True (default): exact rows, one host sync per dispatch (none at
            ``ep_size == 1`` without a group: ``N * K`` rows, trailing padding for -1 slots; see
            the module docstring). False: capacity mode, no host sync, CUDA-graph capturable.

    Raises:
        ValueError: ``num_experts % ep_size != 0``, ``num_local_experts * ep_size != num_experts``,
            non-positive sizes, an unknown permute backend, ``dropless=False`` without a positive
            int ``max_tokens_per_rank``.
    """

    _repr_fields = DispatcherBase._repr_fields + ("max_tokens_per_rank", "dropless")

    def __init__(
        self,
        num_experts: int,
        num_local_experts: int,
        hidden_size: int,
        ep_size: int = 1,
        permute_backend: str = "auto",
        max_tokens_per_rank: int | None = None,
        dropless: bool | None = None,
    ) -> None:
        self._init_common(num_experts, num_local_experts, hidden_size, ep_size, permute_backend)
        if max_tokens_per_rank is not None and (
                not isinstance(max_tokens_per_rank, int) or isinstance(max_tokens_per_rank, bool) or max_tokens_per_rank < 1):
            raise ValueError(f"max_tokens_per_rank must be None or a positive int, got {max_tokens_per_rank!r}")
        dropless = True if dropless is None else dropless
        if not isinstance(dropless, bool):
            raise ValueError(f"dropless must be None or a bool, got {dropless!r}")
        if not dropless and max_tokens_per_rank is None:
            raise ValueError("dropless=False (capacity mode) needs max_tokens_per_rank")
        self.max_tokens_per_rank, self.dropless = max_tokens_per_rank, dropless

    def _agreement_fields(self) -> dict[str, int]:
        return {**super()._agreement_fields(), "max_tokens_per_rank": self.max_tokens_per_rank or 0,
                "dropless": int(self.dropless)}

    # --- protocol -----------------------------------------------------------------------------
    def set_ep_group(self, group) -> None:
        """Bind to the EP process group (``None`` only when ``ep_size == 1``).

        Every rank checks, with one small all-gather, that all ranks agree on the number of
        experts, local experts, hidden size and EP size; on disagreement all raise ValueError.
        """
        self._group = group if self._check_group(group) else None

    def dispatch(
        self, hidden_states: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor
    ) -> DispatchOutput:
        """See :meth:`moe_dispatch.TokenDispatcher.dispatch`. One host sync (the counts) in
        dropless mode with a process group; none without one (``ep_size == 1``: ``expert_input``
        then has ``N * K`` rows, zero padding rows at the end for -1 slots) and none in capacity
        mode."""
        self._check_dispatch_args(hidden_states, selected_experts, routing_weights)
        backend = self._backend_on(hidden_states.device)
        if not self.dropless:
            return self._dispatch_capacity(hidden_states, selected_experts, routing_weights, backend)
        if self._group is None:  # ep_size == 1 (checked above), no process group
            return self._dispatch_one_rank(hidden_states, selected_experts, routing_weights, backend)
        if hidden_states.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a dropless dispatch at ep_size > 1 syncs with the host and cannot be captured in a "
                               "CUDA graph; use dropless=False with max_tokens_per_rank")
        counts_all, counts_host = self._exchange_counts(hidden_states, selected_experts)
        rank = group_rank(self._group)
        send_splits = counts_host[rank].view(self.ep_size, self.num_local_experts).sum(1).tolist()
        recv_counts_host = counts_host[:, rank * self.num_local_experts:(rank + 1) * self.num_local_experts]  # [P, L]
        recv_splits = recv_counts_host.sum(1).tolist()
        num_received = sum(recv_splits)

        permuted, _, row_id_map = backend_module(backend).permute(
            hidden_states, selected_experts, self.num_experts, None, 1, sum(send_splits))
        received = self._exchange_tokens(permuted, recv_splits, send_splits)

        recv_counts = counts_all[:, rank * self.num_local_experts:(rank + 1) * self.num_local_experts]
        recv_counts = recv_counts.to(hidden_states.device)
        expert_input, rank_major_index = self._regroup(received, recv_counts, num_received)
        handle = AllToAllHandle(
            row_id_map=row_id_map, routing_weights=routing_weights,
            send_splits=tuple(send_splits), recv_splits=tuple(recv_splits),
            rank_major_index=rank_major_index, num_received_rows=num_received,
            hidden_dtype=hidden_states.dtype, group=self._group, permute_backend=backend,
        )
        return DispatchOutput(expert_input=expert_input, tokens_per_expert=recv_counts.sum(0), handle=handle)

    def combine(self, expert_output: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        """See :meth:`moe_dispatch.TokenDispatcher.combine`. No host sync."""
        if not isinstance(handle, AllToAllHandle):
            raise TypeError(f"handle must be the AllToAllHandle from this dispatcher's dispatch, got {type(handle).__name__}")
        check_expert_output(expert_output, handle.num_received_rows, self.hidden_size)
        rows = expert_output
        if handle.rank_major_index is not None:
            rows = rows.index_select(0, handle.rank_major_index)
        back = self._exchange_tokens(rows, handle.send_splits, handle.recv_splits, group=handle.group)
        out = backend_module(handle.permute_backend).unpermute(back, handle.row_id_map, handle.routing_weights)
        return out if out.dtype == handle.hidden_dtype else out.to(handle.hidden_dtype)  # .to costs ~1 us even as a no-op

    def _backend_on(self, device: torch.device) -> str:
        """The permute backend ``self.permute_backend`` resolves to on ``device`` (resolved once
        per device: availability does not change while the process runs)."""
        resolved = self.__dict__.setdefault("_resolved_backends", {})
        backend = resolved.get(device)
        if backend is None:
            backend = resolved[device] = resolve_backend(self.permute_backend, device)
        return backend

    # --- one rank -------------------------------------------------------------------------------
    def _dispatch_one_rank(self, x, selected_experts, routing_weights, backend: str) -> DispatchOutput:
        """Dropless dispatch at ``ep_size == 1`` without a group (module docstring): the permute alone, on the
        ``N * K`` rows the routing can fill at most; no host sync on CUDA."""
        if x.device.type == "cpu":
            check_expert_ids_range(selected_experts, self.num_experts)  # free on CPU; on CUDA a host sync
        rows = selected_experts.numel()
        expert_input, _, row_id_map, tokens_per_expert = backend_module(backend).permute_counted(
            x, selected_experts, self.num_experts, None, 1, rows)
        handle = AllToAllHandle(
            row_id_map=row_id_map, routing_weights=routing_weights, send_splits=(rows,), recv_splits=(rows,),
            rank_major_index=None, num_received_rows=rows, hidden_dtype=x.dtype, group=None, permute_backend=backend,
        )
        return DispatchOutput(expert_input=expert_input, tokens_per_expert=tokens_per_expert, handle=handle)

    # --- capacity mode ------------------------------------------------------------------------
    def _dispatch_capacity(self, x, selected_experts, routing_weights, backend: str) -> DispatchOutput:
        """Capacity-mode dispatch (module docstring): fixed blocks, equal splits, no host sync."""
        P, L = self.ep_size, self.num_local_experts
        B = capacity_slots(self.max_tokens_per_rank, selected_experts.shape[1], L)
        row_id_map, dropped, send_counts = capacity_layout(selected_experts, routing_weights, self.num_experts, L, B)
        recv_counts = self._exchange_capacity_counts(send_counts, x, selected_experts)
        send = backend_module(backend).permute_by_map(x, row_id_map, P * B)
        splits = (B,) * P
        received = self._exchange_tokens(send, splits, splits)
        rank_major = None
        if P > 1:
            expert_major, rank_major = capacity_regroup_index(recv_counts, B)
            received = received.index_select(0, expert_major)
        handle = AllToAllHandle(
            row_id_map=row_id_map, routing_weights=routing_weights, send_splits=splits, recv_splits=splits,
            rank_major_index=rank_major, num_received_rows=P * B, hidden_dtype=x.dtype, group=self._group,
            permute_backend=backend, dropped_slots=dropped,
        )
        return DispatchOutput(expert_input=received, tokens_per_expert=recv_counts.sum(0), handle=handle)

    def _exchange_capacity_counts(self, send_counts: torch.Tensor, x: torch.Tensor, selected_experts: torch.Tensor):
        """``send_counts [P, L]`` (this rank's kept rows per destination and local expert) ->
        ``recv_counts [P, L]`` on x's device (rows from each source), with one equal-split
        all-to-all. Each row carries the sender's invalid-id count, H and dtype: checked, and
        raised on every rank, only where reading them costs no device sync (CPU)."""
        P = self.ep_size
        extra = torch.stack([expert_ids_out_of_range(selected_experts, self.num_experts),
                             torch.full((), x.shape[1], dtype=torch.int64, device=x.device),
                             torch.full((), DTYPE_CODES[x.dtype], dtype=torch.int64, device=x.device)])
        rows = torch.cat([send_counts, extra.expand(P, 3)], 1)
        if self._group is not None:
            rows = rows.to(collective_device(self._group))
            table = torch.empty_like(rows)
            torch.distributed.all_to_all_single(table, rows.contiguous(), group=self._group)
        else:
            table = rows
        if table.device.type == "cpu":
            self._raise_on_bad_ranks(table[:, -3:])  # free on CPU; on CUDA it would be a host sync
        return table[:, :-3].to(x.device)

    # --- stages ---------------------------------------------------------------------------------
    def _exchange_counts(self, hidden_states: torch.Tensor, selected_experts: torch.Tensor):
        """-> ``(counts [P, E] on the collective device, the same on the host)``; raises on
        every rank if any rank passed bad expert ids or a different hidden size / dtype."""
        counts = count_tokens_per_expert(selected_experts, self.num_experts)
        # Hidden size and dtype ride along so every rank can check them; torch.full is a fill
        # kernel, where torch.tensor(int, device=cuda) would be a blocking host-to-device copy.
        shape_and_dtype = torch.full((2,), hidden_states.shape[1], dtype=torch.int64, device=counts.device)
        shape_and_dtype[1:] = DTYPE_CODES[hidden_states.dtype]
        row = torch.cat([counts, expert_ids_out_of_range(selected_experts, self.num_experts).view(1), shape_and_dtype])
        if self._group is None:
            table = row.unsqueeze(0)
        else:
            table = all_gather_rows(row.to(collective_device(self._group)), self._group)
        host = table.cpu()  # host sync: the split sizes of the token exchange
        self._raise_on_bad_ranks(host[:, self.num_experts:])
        return table[:, : self.num_experts], host[:, : self.num_experts]

    def _raise_on_bad_ranks(self, meta: torch.Tensor) -> None:
        """``meta`` host ``[P, 3]``: per rank, out-of-range expert ids, hidden size, dtype code."""
        bad_ids, sizes, codes = meta.t().tolist()
        raise_on_bad_ranks(self.num_experts, bad_ids, sizes, codes)

    def _exchange_tokens(self, rows: torch.Tensor, output_splits, input_splits, group=None) -> torch.Tensor:
        group = self._group if group is None else group
        if group is None:
            return rows
        return all_to_all(rows, output_splits, input_splits, group)

    def _regroup(self, received: torch.Tensor, recv_counts: torch.Tensor, num_received: int):
        """(source rank, local expert) chunks -> (local expert, source rank). Returns the
        expert-major rows and the inverse index combine uses (None when the order is the same)."""
        if self.ep_size == 1 or self.num_local_experts == 1:
            return received, None
        expert_major = chunk_transpose_index(recv_counts, num_received)
        rank_major = chunk_transpose_index(recv_counts.t().contiguous(), num_received)
        return received.index_select(0, expert_major), rank_major
