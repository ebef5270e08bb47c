"""``NVLinkTokenDispatcher``: fused intranode dispatch/combine over NVLink, on PyTorch symmetric
memory and our own Triton kernels (no NCCL on the data path, no DeepEP).

A dispatch, per rank (kernels in :mod:`moe_dispatch.kernels.nvlink`, buffers in
:mod:`._symm_workspace`):

1. ``route`` (1-2 launches): counting sort of this rank's (token, k) slots, O(N K), deterministic
   (no atomics decide any order): each slot's rank among this rank's slots of its expert, each
   token's slot ``j`` among the tokens going to each destination rank, then this rank's counts
   row (slots per expert, tokens per destination, N, invalid ids, H, dtype) written into every
   rank's symmetric ``counts`` buffer, with a flag.
2. ``layout`` (1 launch, 1 program): waits for all rows, then computes where this rank's slots
   land at each receiver, ``row0(r, l, s) = sum_{l' < l, all s'} C[s', rL+l'] + sum_{s' < s}
   C[s', rL+l]`` (expert-major, source-minor: the protocol's row order), ``tokens_per_expert``,
   and the chunking of the token exchange.
3. Dropless mode only: one device-to-host copy of that small table (**the** host sync of a
   dispatch) to size ``expert_input`` exactly and raise on invalid expert ids on every rank.
4. ``dispatch`` (1 launch, send and receive roles in one grid): each token is written **once per
   destination rank** (not once per expert) into the receiver's staging buffer, with its K
   destination rows and weights; local slots go straight to ``expert_input``; receivers copy
   each staged row to its rows as soon as its chunk's flag arrives (overlapped with the sends).

Combine is the reverse with the weighted sum fused: each receiver sums, in fp32, its local
slots of every staged token and writes one row per (token, receiving rank) back to the token's
rank, which adds its own slots and those partial sums. Partial sums travel in the output dtype
(bf16: one extra rounding per remote rank, well within the 1e-2 tolerance; sending fp32 would
double the combine's NVLink bytes). Backward: dispatch <-> combine without weights; combine's
backward pushes ``grad_out`` like a dispatch, the receiver writes ``w * g`` into the expert rows'
gradient and sends ``<g, y>`` back for the weights' gradient.

Modes: **dropless** (default): ``expert_input`` has exactly ``sum(tokens_per_expert)`` rows, one
host sync per dispatch. **Capacity** (``max_tokens_per_rank`` given, ``dropless=False``): no host
sync at all (CUDA-graph capturable), ``expert_input`` has ``P * max_tokens_per_rank * min(K, L)``
rows of which the first ``sum(tokens_per_expert)`` are meaningful (the rest are uninitialized);
invalid expert ids are treated as dropped slots (reporting them would need a host sync).

The step programs that run these stages (on GPU, and in the CPU simulation) are in
:mod:`._nvlink_programs`; this module is the lifecycle and the protocol.

Synchronisation is by flags in symmetric memory (release/acquire at system scope, see
:mod:`moe_dispatch.kernels.nvlink`); no barrier kernel, no host round trip in capacity mode.
One CUDA stream: every operation of a dispatcher (and of the dispatchers sharing its workspace,
``share_workspace``) must be issued on one stream per rank, in the same order on every rank, as
for any collective. Several micro-batches may be in flight: a handle owns all that combine needs
(but not the workspace: ``close()`` invalidates outstanding handles).
"""
from __future__ import annotations

import torch

from .._checks import check_expert_output
from .._optional import triton_interpreting
from ..kernels.nvlink.wire import MAX_PEERS
from ..protocol import DispatchOutput
from . import _nvlink_programs as programs
from ._base import DispatcherBase
from ._nvlink_programs import (NVLinkHandle, NVLinkLocalHandle, NVLinkTuning, make_tuning,  # noqa: F401
                               run_lockstep, run_to_end)
from ._symm_workspace import SimulatedWorkspace, SymmetricWorkspace, WorkspaceView

__all__ = ["NVLinkTokenDispatcher", "NVLinkHandle", "NVLinkLocalHandle", "NVLinkTuning", "run_lockstep"]

_MAX_SLOTS = 2**31 - 1  # rows and token slots are int32 in the kernels


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------
class _DispatchFn(torch.autograd.Function):
    """expert_input = dispatch(x); backward: the un-weighted combine of the gradient rows."""

    @staticmethod
    def forward(ctx, x, dispatcher, plan):
        ctx.dispatcher, ctx.handle = dispatcher, plan.handle
        return run_to_end(programs.push_program(dispatcher, x, plan))

    @staticmethod
    def backward(ctx, grad_expert_input):
        grad_x = run_to_end(programs.combine_program(ctx.dispatcher, grad_expert_input.contiguous(), ctx.handle,
                                                      use_weights=False))
        return grad_x, None, None


class _CombineFn(torch.autograd.Function):
    """out = combine(y, w); backward: dispatch of grad_out scaled by w, and <grad_out, y> for w."""

    @staticmethod
    def forward(ctx, expert_output, routing_weights, handle, dispatcher):
        ctx.dispatcher, ctx.handle = dispatcher, handle
        ctx.weights_dtype = routing_weights.dtype
        ctx.save_for_backward(expert_output)
        return run_to_end(programs.combine_program(dispatcher, expert_output, handle, use_weights=True))

    @staticmethod
    def backward(ctx, grad_out):
        (expert_output,) = ctx.saved_tensors
        grad_y, grad_w = run_to_end(programs.combine_backward_program(ctx.dispatcher, grad_out.contiguous(), expert_output,
                                                                     ctx.handle))
        return grad_y, grad_w.to(ctx.weights_dtype), None, None


# ------------------------------------------------------------------------------------------------
# the dispatcher
# ------------------------------------------------------------------------------------------------
class NVLinkTokenDispatcher(DispatcherBase):
    """Fused intranode token dispatcher over NVLink (symmetric memory + Triton).

    Same protocol and results as :class:`~moe_dispatch.AllToAllTokenDispatcher` (identical
    ``expert_input`` rows and ``tokens_per_expert``; combine and gradients equal up to fp32
    summation order). Requires every rank of the EP group on one node with P2P access.

    Args:
        num_experts: E, global.
        num_local_experts: L = E / ep_size.
        hidden_size: H.
        ep_size: P; 1 = local permute / unpermute, no communication.
        permute_backend: accepted for compatibility with ``AllToAllTokenDispatcher``; this
            dispatcher fuses the permutation into its own kernels (``"torch"`` forces the
            reference path on CPU).
        max_tokens_per_rank: tokens per rank the buffers are sized for (default: sized, and
            grown, on demand in dropless mode). Required with ``dropless=False``.
        dropless: True (default): exact output size, one host sync per dispatch. False:
            capacity mode (no host sync, CUDA-graph capturable; N must be <= max_tokens_per_rank).

    Buffers: the symmetric workspace is allocated by ``set_ep_group`` (meta) and the first
    dispatch (rows); ``close()`` frees it. Per rank it takes about
    ``2 * P * S * H * elem + 12 * P * S * K`` bytes, S = tokens per rank it is sized for.

    Raises:
        ValueError: bad sizes (as ``AllToAllTokenDispatcher``), ``ep_size`` above 8 (one node:
            ``MAX_PEERS``), ``dropless=False`` without ``max_tokens_per_rank``, or more token
            slots than int32 holds. All checked here, before any buffer is allocated.
    """

    def __init__(self, num_experts: int, num_local_experts: int, hidden_size: int, ep_size: int = 1,
                 permute_backend: str = "auto", *, max_tokens_per_rank: int | None = None,
                 dropless: bool | None = None) -> None:
        self._init_common(num_experts, num_local_experts, hidden_size, ep_size, permute_backend)
        if ep_size > MAX_PEERS:
            raise ValueError(f"ep_size must be at most {MAX_PEERS} for NVLinkTokenDispatcher (the GPUs of one node), "
                             f"got {ep_size}; use AllToAllTokenDispatcher across nodes")
        if max_tokens_per_rank is not None and (
                not isinstance(max_tokens_per_rank, int) or isinstance(max_tokens_per_rank, bool) or max_tokens_per_rank < 1):
            raise ValueError(f"max_tokens_per_rank must be None or a positive int, got {max_tokens_per_rank!r}")
        if max_tokens_per_rank is not None and max_tokens_per_rank * ep_size > _MAX_SLOTS:
            raise ValueError(f"max_tokens_per_rank * ep_size must be < 2**31 (int32 slots), got "
                             f"{max_tokens_per_rank} * {ep_size}")
        if dropless is None:
            dropless = True
        if not isinstance(dropless, bool):
            raise ValueError(f"dropless must be None or a bool, got {dropless!r}")
        if not dropless and max_tokens_per_rank is None:
            raise ValueError("dropless=False (capacity mode) needs max_tokens_per_rank")
        self.max_tokens_per_rank, self.dropless = max_tokens_per_rank, dropless
        self._view: WorkspaceView | None = None       # the EP workspace (P > 1) or attached simulation
        self._owned: SymmetricWorkspace | None = None
        self._local: dict[torch.device, WorkspaceView] = {}  # single-rank workspaces per device
        self.tuning_overrides: dict[str, int] = {}

    _repr_fields = ("num_experts", "num_local_experts", "hidden_size", "ep_size", "max_tokens_per_rank", "dropless")

    def _agreement_fields(self) -> dict[str, int]:
        return {**super()._agreement_fields(), "max_tokens_per_rank": self.max_tokens_per_rank or 0,
                "dropless": int(self.dropless)}

    # --- lifecycle ------------------------------------------------------------------------------
    def set_ep_group(self, group) -> None:
        """Bind to the EP process group (``None`` only when ``ep_size == 1``). Collective.

        Checks (every rank raises alike): group size == ep_size, same sizes / mode on all ranks,
        one host, one GPU per rank, P2P access between all of them. Allocates the small
        symmetric buffers on the current CUDA device.

        Raises:
            ValueError: wrong group size or disagreeing ranks.
            RuntimeError: no P2P access / several hosts / unusable symmetric memory (the
                message names ``AllToAllTokenDispatcher`` as the alternative).
        """
        self.close()
        if not self._check_group(group):
            return
        self._group = group
        if self.ep_size == 1:
            return
        if not torch.cuda.is_available():
            raise RuntimeError("NVLinkTokenDispatcher with ep_size > 1 needs CUDA GPUs with P2P access; "
                               "use AllToAllTokenDispatcher instead")
        device = torch.device("cuda", torch.cuda.current_device())
        self._owned = SymmetricWorkspace(group, self.num_experts, device)
        self._view = self._owned

    def close(self) -> None:
        """Free the symmetric buffers (collective: call on every rank, nothing in flight)."""
        if self._owned is not None:
            self._owned.close()
        self._owned, self._view, self._group = None, None, None
        self._local = {}

    def share_workspace(self, other: "NVLinkTokenDispatcher") -> None:
        """Use ``other``'s EP group and symmetric workspace instead of allocating one (the MoE
        layers of a model should share one: it grows to the largest batch and hidden size any of
        them uses). Needs the same ``num_experts`` and ``ep_size``; ``other`` stays the owner
        (its ``close()`` frees the buffers for both). Call on every rank alike."""
        if other._view is None:
            raise ValueError("other has no workspace yet: call other.set_ep_group(group) first")
        if (other.num_experts, other.ep_size) != (self.num_experts, self.ep_size):
            raise ValueError(f"share_workspace needs the same num_experts and ep_size, got "
                             f"{(self.num_experts, self.ep_size)} and {(other.num_experts, other.ep_size)}")
        self.close()
        self._group, self._view = other._group, other._view

    def _attach_workspace(self, view: WorkspaceView) -> None:
        """Run on a given workspace view (the CPU simulation of P ranks uses this)."""
        if view.world_size != self.ep_size:
            raise ValueError(f"workspace has {view.world_size} ranks, dispatcher ep_size={self.ep_size}")
        self.close()
        self._view = view

    def check_health(self) -> None:
        """Raise ``RuntimeError`` if a kernel gave up waiting for a peer (a host sync)."""
        for view in [self._view, *self._local.values()]:
            if view is not None and int(view.status[0].item()) != 0:  # host sync
                raise RuntimeError("NVLinkTokenDispatcher: a kernel timed out waiting for a peer rank "
                                   f"(status {view.status.tolist()}); results since then are invalid")

    def tuning(self, view: WorkspaceView, hidden: int) -> NVLinkTuning:
        """Launch parameters for ``view`` and hidden size ``hidden`` (``tuning_overrides`` win)."""
        return make_tuning(view, hidden, self.tuning_overrides)

    # --- protocol -------------------------------------------------------------------------------
    def dispatch(
        self, hidden_states: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor
    ) -> DispatchOutput:
        """See :meth:`moe_dispatch.TokenDispatcher.dispatch`.

        Dropless: one host sync (sizes; raises ValueError on every rank for expert ids outside
        ``[-1, E)`` on any rank, or for ranks disagreeing on H / dtype). Capacity mode: none.
        """
        self._check_dispatch_args(hidden_states, selected_experts, routing_weights)
        if self._use_reference(hidden_states.device):
            return self._dispatch_reference(hidden_states, selected_experts, routing_weights)
        plan = run_to_end(programs.plan_program(self, hidden_states, selected_experts, routing_weights))
        expert_input = _DispatchFn.apply(hidden_states.contiguous(), self, plan)
        return DispatchOutput(expert_input=expert_input, tokens_per_expert=plan.tokens_per_expert, handle=plan.handle)

    def combine(self, expert_output: torch.Tensor, handle) -> torch.Tensor:
        """See :meth:`moe_dispatch.TokenDispatcher.combine`. No host sync."""
        self._check_combine_args(expert_output, handle)
        if isinstance(handle, NVLinkLocalHandle):
            from ..permute.reference import unpermute_rows

            return unpermute_rows(expert_output, handle.row_id_map, handle.routing_weights).to(handle.hidden_dtype)
        return _CombineFn.apply(expert_output, handle.routing_weights, handle, self)

    # --- argument checks (no communication, no device sync) -----------------------------------
    def _check_bound(self) -> None:
        # bound = has a workspace: its own, a shared one, or a simulated rank's (no group then)
        if self.ep_size > 1 and self._view is None:
            raise RuntimeError(f"ep_size={self.ep_size}: call set_ep_group(group) before dispatch")

    def _check_dispatch_args(self, hidden_states, selected_experts, routing_weights) -> None:
        super()._check_dispatch_args(hidden_states, selected_experts, routing_weights)
        if self._view is not None and hidden_states.device != self._view.device:
            raise ValueError(f"hidden_states is on {hidden_states.device}, the EP workspace on {self._view.device}")
        n = hidden_states.shape[0]
        if not self.dropless and n > self.max_tokens_per_rank:
            raise ValueError(f"hidden_states has {n} tokens, more than max_tokens_per_rank={self.max_tokens_per_rank} "
                             "(capacity mode); raise max_tokens_per_rank or use dropless=True")
        if self.dropless and hidden_states.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a dropless dispatch syncs with the host and cannot be captured in a CUDA graph; "
                               "use dropless=False with max_tokens_per_rank")

    def _check_combine_args(self, expert_output, handle) -> None:
        if not isinstance(handle, (NVLinkHandle, NVLinkLocalHandle)):
            raise TypeError(f"handle must be the handle of this dispatcher's dispatch, got {type(handle).__name__}")
        check_expert_output(expert_output, handle.num_rows, self.hidden_size)
        if isinstance(handle, NVLinkHandle) and expert_output.device != handle.snap.device:
            raise ValueError(f"expert_output is on {expert_output.device}, the dispatch ran on {handle.snap.device}")

    # --- single rank on CPU without Triton --------------------------------------------------------
    def _use_reference(self, device: torch.device) -> bool:
        if self.ep_size > 1 or self._view is not None:
            return False
        return device.type == "cpu" and (not triton_interpreting() or self.permute_backend == "torch")

    def _dispatch_reference(self, x, selected_experts, routing_weights) -> DispatchOutput:
        from .._checks import check_expert_ids_range
        from ..permute import count_tokens_per_expert
        from ..permute.reference import make_row_id_map, permute_rows

        check_expert_ids_range(selected_experts, self.num_experts)
        k = selected_experts.shape[1]
        cap_rows = None if self.dropless else self.max_tokens_per_rank * min(k, self.num_local_experts)
        row_id_map, num_rows = make_row_id_map(selected_experts, self.num_experts, 1, cap_rows)
        expert_input = permute_rows(x, row_id_map, num_rows)
        handle = NVLinkLocalHandle(row_id_map, routing_weights, num_rows, x.dtype)
        tpe = count_tokens_per_expert(selected_experts, self.num_experts)
        return DispatchOutput(expert_input=expert_input, tokens_per_expert=tpe, handle=handle)

    # --- programs: one operation on one rank, ``yield`` where other ranks' writes are needed ------
    def _workspace(self, device: torch.device) -> WorkspaceView:
        if self._view is not None:
            return self._view
        view = self._local.get(device)
        if view is None:
            view = self._local[device] = SimulatedWorkspace(1, self.num_experts, device).rank_view(0)
        return view

    # The step programs (see ._nvlink_programs); the CPU simulation drives them with run_lockstep.
    def _dispatch_program(self, hidden_states, selected_experts, routing_weights):
        return programs.dispatch_program(self, hidden_states, selected_experts, routing_weights)

    def _combine_program(self, y, handle: NVLinkHandle, *, use_weights: bool):
        return programs.combine_program(self, y, handle, use_weights=use_weights)

    def _combine_backward_program(self, grad_out, expert_output, handle: NVLinkHandle):
        return programs.combine_backward_program(self, grad_out, expert_output, handle)
