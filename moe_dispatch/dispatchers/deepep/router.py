"""``FusedTokenRouter``: token dispatch on DeepEP's normal-mode (V1) kernels.

DeepEP (``deep_ep``, https://github.com/deepseek-ai/DeepEP, V1 ``Buffer`` API as of v1.2.1) is
the one optional dependency of this module, imported when a router is constructed; without it
the constructor raises ``ImportError`` saying to run ``install_hybridep.sh``.

Stages of a dispatch (each a private helper, so each can be timed and later overlapped):

1. ``_exchange_tokens``: ``Buffer.get_dispatch_layout`` (per-rank / per-expert counts, which
   ranks each token goes to) then ``Buffer.dispatch``: every token goes once to each rank that
   holds one of its experts, with its top-k ids rewritten to that rank's *local* ids (-1 for
   experts elsewhere) and its weights (0 at those -1 slots). Inside, DeepEP's CPU waits for the
   received counts (a host sync; the other one of a dispatch is the range check of the ids).
2. ``_permute``: the library permute (``moe_dispatch.permute``) of the received tokens by their
   local ids ``[R_tok, K]`` into rows grouped by local expert.

Combine runs them backwards: unpermute with the received weights (fp32 weighted sum over each
token's local experts, i.e. the weights are applied on the receiving rank), then
``Buffer.combine``, which *sums* the partial results over the ranks a token went to. Backward of
the token exchange is its dual (DeepEP combine with the cached handle, and DeepEP dispatch with
``handle=``), written as two ``torch.autograd.Function``.

Combine row width. DeepEP v1.2.1's intranode combine kernel (``csrc/kernels/intranode.cu``, the
receiver's ``for (int i = lane_id; i < hidden_int4; i += 32)`` loop) stages each output row
through shared memory for a TMA store with three full-warp ``__syncwarp()`` inside that loop; when
a row is not a whole number of 32 16-byte vectors (bf16: ``hidden % 256 != 0``) the last pass runs
on part of the warp only, which is undefined behaviour and on H100/H200 silently corrupts rows of
the combined output, nondeterministically (DeepEP fixed it after v1.2.1, upstream PR #413). So
every DeepEP combine here (the forward combine and the backward of dispatch) moves rows zero-padded
to a multiple of 256 elements (``_COMBINE_ALIGN``) and slices the padding off the result; nothing
in DeepEP's handle depends on the row width, and the dispatch kernels are not affected, so
dispatch rows keep their own width. Hidden sizes that are multiples of 256 (most models) pay
nothing.

Row order. DeepEP's intranode dispatch (v1.2.1 ``csrc/kernels/intranode.cu``) writes the tokens
from source rank ``s`` at offset ``rank_prefix_matrix[s - 1][this rank]``, i.e. grouped by source
rank in rank order; within a source rank, channel ``c`` handles the contiguous source-token range
``get_channel_task_range(c)`` and lands at ``channel_prefix_matrix`` offsets in channel order,
and a channel's sender walks its tokens in increasing index and the receiver keeps that order.
So received tokens are ordered by (source rank, source token index). The permute is stable by
(received token, k) within an expert, which gives the protocol's (source rank, source token
index, k) order. (Verified for intranode only; the internode kernels are not checked here.)

``FusedTokenRouter.routing_map(handle)`` turns the received local ids and weights into the
multi-hot ``routing_map [R_tok, L]`` and ``dense_probs [R_tok, L]`` that mask-based consumers
want (the Triton converter of :mod:`moe_dispatch.dispatchers.deepep.routing_maps`). Dispatch and combine do not
need it: the index-based ``row_id_map`` and the ``[R_tok, K]`` weights are exact even for repeated
ids and save two ``[R_tok, L]`` passes.

Shape legend (see :mod:`moe_dispatch.protocol`): N tokens here, H hidden, K top-k, E experts,
L local experts, P EP ranks, R_tok tokens received by this rank, R rows (= sum over received
tokens of their local experts).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..._checks import check_expert_ids_range, check_expert_output, check_routing
from ..._optional import DEEP_EP_INSTALL_HINT, import_deep_ep
from ...distributed import group_size
from ...permute import backend_module as _permute_module
from ...permute import count_tokens_per_expert, resolve_backend
from ...protocol import DispatchOutput
from .._base import DispatcherBase
from .routing_maps import indices_to_multihot

__all__ = ["FusedTokenRouter", "DeepEPTokenDispatcher", "FusedRouterHandle", "SMS_ENV_VAR", "DEFAULT_NUM_SMS"]

SMS_ENV_VAR = "MOE_DISPATCH_DEEPEP_SMS"
DEFAULT_NUM_SMS = 20
_INSTALL_HINT = DEEP_EP_INSTALL_HINT

# Limits of DeepEP v1.2.1's intranode normal kernels, checked here because DeepEP checks them with
# device-side traps (a dead CUDA context and hung peers) or not at all:
_MAX_TOPK = 32  # one warp lane per top-k slot (EP_DEVICE_ASSERT(num_topk <= 32))
_MAX_LOCAL_EXPERTS = 128  # notify_dispatch: num_experts / num_ranks <= 128 threads
_ROW_ALIGN = 16  # SM90 TMA copy moves each row in two halves of whole 16-byte vectors
_MAX_ROW_BYTES = 2 * (8192 - 8)  # each half + an 8-byte mbarrier must fit 8 KiB of shared memory
_TRANSPORT_DTYPE = torch.bfloat16  # DeepEP's intranode combine reduces bf16 only
# DeepEP v1.2.1's intranode combine is correct only for rows of whole warps of 16-byte vectors
# (32 x 16 B = 256 bf16): see "Combine row width" above. Combine rows are zero-padded to this.
_COMBINE_ALIGN = 32 * 16 // _TRANSPORT_DTYPE.itemsize


def _combine_width(hidden_size: int) -> int:
    """Row width (elements) of the rows DeepEP combines for ``hidden_size``."""
    return -(-hidden_size // _COMBINE_ALIGN) * _COMBINE_ALIGN


def _resolve_num_sms(num_sms: int | None) -> int:
    source = "num_sms"
    if num_sms is None:
        raw = os.environ.get(SMS_ENV_VAR)
        if raw is None:
            return DEFAULT_NUM_SMS
        source = f"environment variable {SMS_ENV_VAR}"
        try:
            num_sms = int(raw)
        except ValueError:
            raise ValueError(f"{source} must be an even positive int, got {raw!r}") from None
    if not isinstance(num_sms, int) or isinstance(num_sms, bool) or num_sms < 2 or num_sms % 2:
        # DeepEP runs one channel per pair of SMs (a sender and a receiver block).
        raise ValueError(f"{source} must be an even positive int (DeepEP pairs SMs), got {num_sms!r}")
    return num_sms


@dataclass(frozen=True)
class _DeepEPComm:
    """The DeepEP ``Buffer`` a router owns, with the configs every call passes explicitly."""

    buffer: Any
    dispatch_config: Any
    combine_config: Any
    group: Any
    hidden_bytes: int
    num_sms: int
    combine_hidden: int  # row width DeepEP combines (hidden size padded to _COMBINE_ALIGN)


def _deepep_combine(comm: _DeepEPComm, x: torch.Tensor, deepep_handle, topk_weights=None):
    """DeepEP combine of ``x [R_tok, H]`` (received order) -> ``([N, H] bf16, summed weights or
    None)``, moving rows zero-padded to ``comm.combine_hidden`` (see "Combine row width")."""
    num_rows, hidden = x.shape
    width = comm.combine_hidden
    if width == hidden:
        x = x.to(_TRANSPORT_DTYPE).contiguous()
    else:
        padded = torch.empty((num_rows, width), dtype=_TRANSPORT_DTYPE, device=x.device)
        padded[:, hidden:].zero_()
        padded[:, :hidden].copy_(x)
        x = padded
    combined, combined_weights, _ = comm.buffer.combine(
        x, deepep_handle, topk_weights=topk_weights, config=comm.combine_config)
    if width != hidden:
        combined = combined[:, :hidden].contiguous()
    return combined, combined_weights


@dataclass(frozen=True)
class FusedRouterHandle:
    """Everything ``combine`` needs; immutable, so several micro-batches can be in flight.

    Attributes:
        comm: the DeepEP buffer and configs the dispatch used; None for a single rank without
            a group (no communication).
        deepep_handle: DeepEP's communication handle (opaque tuple of tensors), or None.
        row_id_map: int64 ``[R_tok, K]``: row of ``expert_input`` for each received (token, k).
        recv_topk_idx: int64 ``[R_tok, K]`` local expert ids of the received tokens (-1: elsewhere).
        recv_topk_weights: fp32 ``[R_tok, K]`` their weights (0 at -1 slots); combine applies them.
        num_rows: R.
        num_tokens: N, tokens this rank dispatched.
        hidden_dtype: dtype of ``hidden_states``; combine returns it.
    """

    comm: _DeepEPComm | None
    deepep_handle: tuple | None
    row_id_map: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_rows: int
    num_tokens: int
    hidden_dtype: torch.dtype


class _DeepEPDispatch(torch.autograd.Function):
    """``(x [N, H] bf16, w fp32 [N, K], idx int64 [N, K])`` -> received ``(x [R_tok, H],
    w fp32 [R_tok, K], local idx int64 [R_tok, K], DeepEP handle, counts per local expert)``.
    Backward: DeepEP combine of the gradients with the cached handle."""

    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, comm: _DeepEPComm, num_experts: int):
        buffer = comm.buffer
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        # Host sync inside: DeepEP's CPU waits for the received-token counts to size recv_x.
        recv_x, recv_idx, recv_w, counts, deepep_handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights,
            num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=comm.dispatch_config,
        )
        ctx.comm, ctx.deepep_handle = comm, deepep_handle
        ctx.save_for_backward(recv_idx)
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_w, recv_idx, deepep_handle, list(counts)

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_w, _grad_idx, _grad_handle, _grad_counts):
        (recv_idx,) = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            # A -1 slot's received weight is the constant 0 DeepEP wrote, not the sender's
            # weight: its gradient must not reach the sender, where combine sums over ranks.
            grad_w = grad_recv_w.float().masked_fill(recv_idx < 0, 0.0).contiguous()
        grad_x, grad_w_sum = _deepep_combine(ctx.comm, grad_recv_x, ctx.deepep_handle, topk_weights=grad_w)
        return grad_x, grad_w_sum, None, None, None


class _DeepEPCombine(torch.autograd.Function):
    """Received per-token partial sums ``[R_tok, H]`` (any float dtype, sent as bf16) ->
    ``[N, H]`` bf16 summed over ranks (through rows padded to ``comm.combine_hidden``).
    Backward: DeepEP dispatch of the gradient (``[N, H]``, unpadded) with the cached handle."""

    @staticmethod
    def forward(ctx, partial, comm: _DeepEPComm, deepep_handle):
        combined, _ = _deepep_combine(comm, partial, deepep_handle)
        ctx.comm, ctx.deepep_handle, ctx.partial_dtype = comm, deepep_handle, partial.dtype
        return combined

    @staticmethod
    def backward(ctx, grad_combined):
        grad_partial, *_ = ctx.comm.buffer.dispatch(
            grad_combined.to(_TRANSPORT_DTYPE).contiguous(), handle=ctx.deepep_handle, config=ctx.comm.dispatch_config)
        return grad_partial.to(ctx.partial_dtype), None, None


_MAX_NVL_PEERS = 8  # DeepEP's NUM_MAX_NVL_PEERS: ranks of one NVLink domain


class FusedTokenRouter(DispatcherBase):
    """Token dispatcher on DeepEP's normal-mode kernels (NVLink within a node).

    Args:
        num_experts: E, global.
        num_local_experts: L = E / ep_size (at most 128: DeepEP's intranode limit).
        hidden_size: H; a multiple of 16 and at most 8176 (DeepEP v1.2.1 SM90 kernels: rows are
            copied through 8 KiB of shared memory per half in 16-byte vectors). Combines move
            rows zero-padded to a multiple of 256 (a DeepEP v1.2.1 combine bug, see the module
            docstring), so other sizes cost up to 255 extra columns there.
        ep_size: P, ranks of the EP group. DeepEP runs 2, 4 or 8 ranks within a node (more
            across nodes when built with NVSHMEM); ``ep_size=1`` with ``set_ep_group(None)``
            runs locally, without DeepEP.
        num_sms: SMs DeepEP's kernels use (even); default: environment variable
            ``MOE_DISPATCH_DEEPEP_SMS``, else 20. Applies to this router's configs only.
        permute_backend: ``"auto" | "torch" | "triton" | "cuda" | "te"`` (see ``moe_dispatch.permute``).

    ``hidden_states`` must be bf16 once a group is bound (DeepEP's combine reduces bf16 only);
    ``routing_weights`` travel and are applied in fp32. The router owns one DeepEP ``Buffer``
    per (group, row bytes), built by ``set_ep_group`` (collective) and freed by ``close()``
    (collective).

    Raises:
        ImportError: ``deep_ep`` is not importable (run ``install_hybridep.sh``).
        ValueError: inconsistent or out-of-range sizes, odd ``num_sms``, unknown permute backend.
    """

    def __init__(
        self,
        num_experts: int,
        num_local_experts: int,
        hidden_size: int,
        ep_size: int,
        *,
        num_sms: int | None = None,
        permute_backend: str = "auto",
    ) -> None:
        self._init_common(num_experts, num_local_experts, hidden_size, ep_size, permute_backend)
        if num_local_experts > _MAX_LOCAL_EXPERTS:
            raise ValueError(f"num_local_experts must be <= {_MAX_LOCAL_EXPERTS} for DeepEP's intranode kernels, "
                             f"got {num_local_experts}")
        row_bytes = hidden_size * _TRANSPORT_DTYPE.itemsize
        if row_bytes % (2 * _ROW_ALIGN) or row_bytes > _MAX_ROW_BYTES:
            raise ValueError(f"hidden_size must be a multiple of 16 and at most {_MAX_ROW_BYTES // _TRANSPORT_DTYPE.itemsize} "
                             f"for DeepEP's bf16 rows, got {hidden_size}")
        self.num_sms = _resolve_num_sms(num_sms)
        self._deep_ep = import_deep_ep()
        self._comm: _DeepEPComm | None = None

    _repr_fields = ("num_experts", "num_local_experts", "hidden_size", "ep_size", "num_sms", "permute_backend")

    def _agreement_fields(self) -> dict[str, int]:
        return {**super()._agreement_fields(), "num_sms": self.num_sms}

    # --- protocol -----------------------------------------------------------------------------
    def set_ep_group(self, group) -> None:
        """Bind to the EP process group; collective (call on every rank of ``group``).

        Checks with one small all-gather that every rank agrees on the sizes, then builds the
        DeepEP ``Buffer`` for ``group`` (itself collective), freeing the previous one. Binding
        the group already bound keeps its buffer. ``None`` (only for ``ep_size == 1``): run
        locally, without DeepEP.
        """
        if not self._check_group(group):
            self.close()
            self._group = None
            return
        hidden_bytes = self.hidden_size * _TRANSPORT_DTYPE.itemsize
        comm = self._comm
        if comm is None or comm.group is not group or comm.hidden_bytes != hidden_bytes:
            self.close()
            self._comm = self._build_comm(group, hidden_bytes)
        self._group = group

    def close(self) -> None:
        """Free the DeepEP buffer (collective: DeepEP synchronizes the ranks). Idempotent.
        Dispatching again needs ``set_ep_group``; handles from before cannot be combined."""
        comm, self._comm = self._comm, None
        if comm is not None:
            comm.buffer.destroy()

    def dispatch(
        self, hidden_states: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor
    ) -> DispatchOutput:
        """See :meth:`moe_dispatch.TokenDispatcher.dispatch`.

        Host syncs: the range check of ``selected_experts`` and DeepEP's wait for the received
        counts (locally, without a group: the row count). Every argument is checked before any
        collective; a rank that raises leaves its peers waiting in DeepEP until its timeout.
        """
        # Not the base's check: locally any float dtype runs; bound, DeepEP takes bf16 only.
        check_routing(hidden_states, selected_experts, routing_weights, hidden_size=self.hidden_size)
        self._check_bound()
        comm = self._comm
        if self._group is not None:
            if comm is None:
                raise RuntimeError("this FusedTokenRouter was closed: call set_ep_group(group) to build a new DeepEP buffer")
            if hidden_states.dtype != _TRANSPORT_DTYPE:
                raise TypeError(f"hidden_states must be torch.bfloat16 for DeepEP (its combine reduces bf16 only), "
                                f"got {hidden_states.dtype}")
            if selected_experts.shape[1] > _MAX_TOPK:
                raise ValueError(f"selected_experts may have at most {_MAX_TOPK} columns (top-k) for DeepEP, "
                                 f"got {selected_experts.shape[1]}")
        check_expert_ids_range(selected_experts, self.num_experts)  # host sync
        backend = resolve_backend(self.permute_backend, hidden_states.device)

        recv_x, recv_w, recv_idx, deepep_handle, counts = self._exchange_tokens(
            comm, hidden_states, selected_experts, routing_weights)
        tokens_per_expert = torch.tensor(counts, dtype=torch.int64, device=hidden_states.device)
        expert_input, row_id_map = self._permute(backend, recv_x, recv_idx, sum(counts))
        handle = FusedRouterHandle(
            comm=comm, deepep_handle=deepep_handle, row_id_map=row_id_map, recv_topk_idx=recv_idx,
            recv_topk_weights=recv_w, num_rows=sum(counts), num_tokens=hidden_states.shape[0],
            hidden_dtype=hidden_states.dtype,
        )
        return DispatchOutput(expert_input=expert_input, tokens_per_expert=tokens_per_expert, handle=handle)

    def combine(self, expert_output: torch.Tensor, handle: FusedRouterHandle) -> torch.Tensor:
        """See :meth:`moe_dispatch.TokenDispatcher.combine`. No host sync.

        Weights are applied (fp32) on this rank to each received token's rows, then DeepEP sums
        the per-rank partial results: ``out[n] = sum_k w[n, k] f(x[n])`` in ``hidden_states``'
        dtype, -1 slots contributing 0.
        """
        if not isinstance(handle, FusedRouterHandle):
            raise TypeError(f"handle must be the FusedRouterHandle from this router's dispatch, got {type(handle).__name__}")
        check_expert_output(expert_output, handle.num_rows, self.hidden_size)
        if handle.comm is not self._comm:
            raise ValueError("handle comes from a DeepEP buffer this router has closed or replaced since the dispatch")
        backend = resolve_backend(self.permute_backend, expert_output.device)
        partial = _permute_module(backend).unpermute(expert_output, handle.row_id_map, handle.recv_topk_weights)
        if handle.comm is None:
            return partial.to(handle.hidden_dtype)
        # _DeepEPCombine casts to bf16 (and pads, where needed) in one copy.
        return _DeepEPCombine.apply(partial, handle.comm, handle.deepep_handle).to(handle.hidden_dtype)

    # --- extras -------------------------------------------------------------------------------
    def routing_map(self, handle: FusedRouterHandle, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """The received routing as a mask, for mask-based consumers (e.g. Megatron-style
        permutes, per-expert load statistics).

        Returns:
            ``(routing_map bool [R_tok, L], dense_probs fp32 [R_tok, L])`` from the handle's
            local top-k ids and weights (see :mod:`moe_dispatch.dispatchers.deepep.routing_maps`); ``dense_probs``
            is differentiable back to ``routing_weights``.
        """
        if not isinstance(handle, FusedRouterHandle):
            raise TypeError(f"handle must be a FusedRouterHandle, got {type(handle).__name__}")
        return indices_to_multihot(handle.recv_topk_idx, handle.recv_topk_weights, self.num_local_experts, backend)

    # --- stages ---------------------------------------------------------------------------------
    def _build_comm(self, group, hidden_bytes: int) -> _DeepEPComm:
        """Size and build a DeepEP ``Buffer`` for ``group`` (collective)."""
        buffer_cls = self._deep_ep.Buffer
        num_ranks = group_size(group)
        # DeepEP keeps the SM count process-wide (``Buffer.set_num_sms``) and bakes it into the
        # configs it hands out; take configs for ours, pass them on every call, and put the
        # process-wide value back so other DeepEP users are not affected.
        previous = buffer_cls.num_sms
        try:
            buffer_cls.set_num_sms(self.num_sms)
            dispatch_config = buffer_cls.get_dispatch_config(num_ranks)
            combine_config = buffer_cls.get_combine_config(num_ranks)
        finally:
            buffer_cls.set_num_sms(previous)
        # Combine moves rows padded to a multiple of _COMBINE_ALIGN: size its share for those.
        combine_hidden = _combine_width(self.hidden_size)
        combine_bytes = combine_hidden * _TRANSPORT_DTYPE.itemsize
        sizes = ((dispatch_config, hidden_bytes), (combine_config, combine_bytes))
        num_nvl_bytes = max(c.get_nvl_buffer_size_hint(nbytes, num_ranks) for c, nbytes in sizes)
        # Intranode (<= 8 NVLink peers) needs no RDMA buffer; asking an NVSHMEM-less build for
        # its RDMA size hint is a host assertion inside DeepEP, so don't.
        num_rdma_bytes = 0
        if num_ranks > _MAX_NVL_PEERS:
            num_rdma_bytes = max(c.get_rdma_buffer_size_hint(nbytes, num_ranks) for c, nbytes in sizes)
        buffer = buffer_cls(group, num_nvl_bytes, num_rdma_bytes, explicitly_destroy=True)
        return _DeepEPComm(buffer=buffer, dispatch_config=dispatch_config, combine_config=combine_config,
                           group=group, hidden_bytes=hidden_bytes, num_sms=self.num_sms,
                           combine_hidden=combine_hidden)

    def _exchange_tokens(self, comm, hidden_states, selected_experts, routing_weights):
        """-> ``(recv_x [R_tok, H], recv_w fp32 [R_tok, K], recv_idx int64 [R_tok, K] local ids,
        DeepEP handle or None, rows per local expert as a list of ints)``."""
        idx = selected_experts.long()
        weights = routing_weights.float()
        if comm is None:  # one rank, no group: every expert is local and nothing moves
            counts = count_tokens_per_expert(idx, self.num_local_experts)
            return hidden_states, weights, idx, None, counts.tolist()  # host sync: the row count
        recv_x, recv_w, recv_idx, deepep_handle, counts = _DeepEPDispatch.apply(
            hidden_states.contiguous(), weights.contiguous(), idx.contiguous(), comm, self.num_experts)
        return recv_x, recv_w, recv_idx, deepep_handle, counts

    def _permute(self, backend: str, recv_x, recv_idx, num_rows: int):
        """Received tokens -> rows grouped by local expert, then by (received token, k)."""
        permuted, _, row_id_map = _permute_module(backend).permute(
            recv_x, recv_idx, self.num_local_experts, None, 1, num_rows)
        return permuted, row_id_map


# The name users of other libraries look for; the same class.
DeepEPTokenDispatcher = FusedTokenRouter
