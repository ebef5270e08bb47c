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

Synchronisation is by flags in symmetric memory (release/acquire at system scope, see
:mod:`moe_dispatch.kernels.nvlink`); no barrier kernel, no host round trip in capacity mode.
One CUDA stream: every operation of a dispatcher (and of the dispatchers sharing its workspace,
``share_workspace``) must be issued on one stream per rank, in the same order on every rank, as
for any collective. Several micro-batches may be in flight: a handle owns all that combine needs
(but not the workspace: ``close()`` invalidates outstanding handles).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Generator

import torch

from .._checks import check_expert_output, check_routing
from ..protocol import DispatchOutput
from ._common import DTYPE_CODES, check_group_agreement, check_sizes
from ._symm_workspace import SimulatedWorkspace, SymmetricWorkspace, WorkspaceView

__all__ = ["NVLinkTokenDispatcher", "NVLinkHandle", "NVLinkLocalHandle", "NVLinkTuning"]

_PERMUTE_BACKENDS = ("torch", "triton", "te")


def _kernels():
    from ..kernels import nvlink as k  # lazy: importing moe_dispatch must not need triton

    return k


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# handles
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NVLinkHandle:
    """Everything combine (and the backward passes) need; per dispatch, immutable.

    Attributes:
        routing_weights: ``[N, K]`` as passed to dispatch (combine differentiates w.r.t. it).
        selected_experts: ``[N, K]`` integer, contiguous.
        send_slot: int32 ``[N, P]``: position of token n among the tokens sent to rank r, -1 if none.
        local_rows: int32 ``[N, K]``: row of ``expert_input`` of slot (n, k) when its expert is
            local, else -1.
        snap: int32 layout table (``kernels.nvlink.snap_layout``): the exchanged counts, the
            receivers' row bases, the chunking.
        recv_rows / recv_w: int32 / fp32 ``[P, S_rows, K]``: for token j staged here by rank s,
            its K rows here (-1: not here) and weights.
        recv_chunk: int32 ``[P, C, 2]``: (first j, count) of each chunk staged here by rank s.
        num_rows: rows of ``expert_input``.
        hidden_dtype: combine returns this dtype.
        view: the workspace view the operations run on.
    """

    routing_weights: torch.Tensor
    selected_experts: torch.Tensor
    send_slot: torch.Tensor
    local_rows: torch.Tensor
    snap: torch.Tensor
    recv_rows: torch.Tensor
    recv_w: torch.Tensor
    recv_chunk: torch.Tensor
    num_rows: int
    hidden_dtype: torch.dtype
    view: Any = field(repr=False)


@dataclass(frozen=True)
class NVLinkLocalHandle:
    """Handle of the single-rank path on CPU without Triton (torch reference permute)."""

    row_id_map: torch.Tensor
    routing_weights: torch.Tensor
    num_rows: int
    hidden_dtype: torch.dtype


@dataclass(frozen=True)
class NVLinkTuning:
    """Launch parameters. Must be identical on every rank (``chunk_target`` decides the chunking
    both sides of an exchange agree on); derived from the device unless overridden."""

    n_send: int          # programs of the send role of the fused kernels
    n_recv: int          # programs of the receive role
    route_ctas: int      # programs of the routing kernels
    block_t: int         # tokens per tile
    block_h: int         # hidden columns per tile
    num_warps: int
    chunk_target: int    # chunks per source rank (<= NCHUNK); chunk = ceil(max N / chunk_target) tokens
    max_spins: int       # flag polls before a kernel gives up (status bit, no hang)
    route_block_n: int = 0   # tokens per routing step (0: from E and K)
    route_block_g: int = 0   # histogram rows per prefix step (0: from E)


@dataclass
class _Plan:
    handle: NVLinkHandle
    tokens_per_expert: torch.Tensor
    rank_in_expert: torch.Tensor
    capacity_rows: bool


def _to_host(t: torch.Tensor, view: WorkspaceView) -> list[int]:
    """Small int32 device tensor -> Python ints through a pinned buffer kept on the view (one
    copy and one stream sync: the dispatch's host sync in dropless mode)."""
    if not t.is_cuda:
        return t.tolist()
    buf = getattr(view, "_pinned_table", None)
    if buf is None or buf.numel() < t.numel():
        buf = torch.empty(max(t.numel(), 256), dtype=torch.int32, pin_memory=True)
        view._pinned_table = buf
    host = buf[: t.numel()]
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()  # host sync (dropless sizing)
    return host.tolist()


def _run(gen: Generator):
    """Run an operation's program to the end on this rank (the real, concurrent GPU case)."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def run_lockstep(programs: list[Generator]) -> list:
    """Run one operation's programs of all simulated ranks phase by phase: every rank runs up to
    its next ``yield`` (a point where it needs the other ranks' writes) before any continues.
    Returns the per-rank results. CPU simulation only."""
    results: list = [None] * len(programs)
    active = list(range(len(programs)))
    while active:
        still = []
        for i in active:
            try:
                next(programs[i])
                still.append(i)
            except StopIteration as stop:
                results[i] = stop.value
        active = still
    return results


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------
class _DispatchFn(torch.autograd.Function):
    """expert_input = dispatch(x); backward: the un-weighted combine of the gradient rows."""

    @staticmethod
    def forward(ctx, x, dispatcher, plan):
        ctx.dispatcher, ctx.handle = dispatcher, plan.handle
        return _run(dispatcher._push_program(x, plan))

    @staticmethod
    def backward(ctx, grad_expert_input):
        grad_x = _run(ctx.dispatcher._combine_program(grad_expert_input.contiguous(), ctx.handle, use_weights=False))
        return grad_x, None, None


class _CombineFn(torch.autograd.Function):
    """out = combine(y, w); backward: dispatch of grad_out scaled by w, and <grad_out, y> for w."""

    @staticmethod
    def forward(ctx, expert_output, routing_weights, handle, dispatcher):
        ctx.dispatcher, ctx.handle = dispatcher, handle
        ctx.weights_dtype = routing_weights.dtype
        ctx.save_for_backward(expert_output)
        return _run(dispatcher._combine_program(expert_output, handle, use_weights=True))

    @staticmethod
    def backward(ctx, grad_out):
        (expert_output,) = ctx.saved_tensors
        grad_y, grad_w = _run(ctx.dispatcher._combine_backward_program(grad_out.contiguous(), expert_output, ctx.handle))
        return grad_y, grad_w.to(ctx.weights_dtype), None, None


# ------------------------------------------------------------------------------------------------
# the dispatcher
# ------------------------------------------------------------------------------------------------
class NVLinkTokenDispatcher:
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
        ValueError: bad sizes (as ``AllToAllTokenDispatcher``), ``dropless=False`` without
            ``max_tokens_per_rank``.
    """

    def __init__(
        self,
        num_experts: int,
        num_local_experts: int,
        hidden_size: int,
        ep_size: int = 1,
        permute_backend: str = "auto",
        *,
        max_tokens_per_rank: int | None = None,
        dropless: bool | None = None,
    ) -> None:
        check_sizes(num_experts, num_local_experts, hidden_size, ep_size)
        if permute_backend != "auto" and permute_backend not in _PERMUTE_BACKENDS:
            raise ValueError(f"permute_backend must be one of {('auto',) + _PERMUTE_BACKENDS}, got {permute_backend!r}")
        if max_tokens_per_rank is not None and (
                not isinstance(max_tokens_per_rank, int) or isinstance(max_tokens_per_rank, bool) or max_tokens_per_rank < 1):
            raise ValueError(f"max_tokens_per_rank must be None or a positive int, got {max_tokens_per_rank!r}")
        if dropless is None:
            dropless = True
        if not isinstance(dropless, bool):
            raise ValueError(f"dropless must be None or a bool, got {dropless!r}")
        if not dropless and max_tokens_per_rank is None:
            raise ValueError("dropless=False (capacity mode) needs max_tokens_per_rank")
        self.num_experts, self.num_local_experts = num_experts, num_local_experts
        self.hidden_size, self.ep_size, self.permute_backend = hidden_size, ep_size, permute_backend
        self.max_tokens_per_rank, self.dropless = max_tokens_per_rank, dropless
        self._group = None
        self._view: WorkspaceView | None = None       # the EP workspace (P > 1) or attached simulation
        self._owned: SymmetricWorkspace | None = None
        self._local: dict[torch.device, WorkspaceView] = {}  # single-rank workspaces per device
        self.tuning_overrides: dict[str, int] = {}

    def __repr__(self) -> str:
        return (f"NVLinkTokenDispatcher(num_experts={self.num_experts}, num_local_experts={self.num_local_experts}, "
                f"hidden_size={self.hidden_size}, ep_size={self.ep_size}, max_tokens_per_rank={self.max_tokens_per_rank}, "
                f"dropless={self.dropless})")

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
        if group is None:
            if self.ep_size != 1:
                raise ValueError(f"group must be a ProcessGroup of {self.ep_size} ranks for ep_size={self.ep_size}, got None")
            return
        check_group_agreement(group, self.ep_size, {
            "num_experts": self.num_experts, "num_local_experts": self.num_local_experts,
            "hidden_size": self.hidden_size, "ep_size": self.ep_size,
            "max_tokens_per_rank": self.max_tokens_per_rank or 0, "dropless": int(self.dropless),
        })
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
        k = _kernels()
        sms = max(1, view.num_sms)
        if view.simulated:  # small, so the interpreter exercises several programs and chunks
            t = NVLinkTuning(n_send=2, n_recv=2 if view.world_size > 1 else 0, route_ctas=3, block_t=2,
                             block_h=min(16, k._np2(hidden)), num_warps=4, chunk_target=3, max_spins=20000,
                             route_block_n=2, route_block_g=2)
        else:
            multi = view.world_size > 1
            t = NVLinkTuning(n_send=max(1, sms // 2) if multi else sms, n_recv=max(1, sms // 2) if multi else 0,
                             route_ctas=sms, block_t=4, block_h=min(2048, k._np2(hidden)), num_warps=8,
                             chunk_target=256, max_spins=1 << 24)
        if self.tuning_overrides:
            t = replace(t, **self.tuning_overrides)
        if not 1 <= t.chunk_target <= view.nchunk:
            raise ValueError(f"chunk_target must be in [1, {view.nchunk}], got {t.chunk_target}")
        return t

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
        plan = _run(self._plan_program(hidden_states, selected_experts, routing_weights))
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
    def _check_dispatch_args(self, hidden_states, selected_experts, routing_weights) -> None:
        check_routing(hidden_states, selected_experts, routing_weights, hidden_size=self.hidden_size)
        if hidden_states.dtype not in DTYPE_CODES:
            raise TypeError(f"hidden_states dtype must be one of {list(DTYPE_CODES)}, got {hidden_states.dtype}")
        if self.ep_size > 1 and self._view is None:
            raise RuntimeError(f"ep_size={self.ep_size}: call set_ep_group(group) before dispatch")
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
        return device.type == "cpu" and (not _interpreting() or self.permute_backend == "torch")

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

    def _plan_program(self, hidden_states, selected_experts, routing_weights):
        """Stages 1-3 of a dispatch: routing metadata, counts exchange, layout (+ host sync)."""
        k_ = _kernels()
        x = hidden_states
        view = self._workspace(x.device)
        sel = selected_experts.contiguous()
        p, me = view.world_size, view.rank
        n, topk = sel.shape
        E, L, H = self.num_experts, self.num_local_experts, self.hidden_size
        t = self.tuning(view, H)
        rank_in_expert, send_slot = k_.route(
            sel, [view.counts(r) for r in range(p)], [view.count_flags(r) for r in range(p)], view.status,
            rank=me, num_experts=E, num_local_experts=L, hidden_size=H, dtype_code=DTYPE_CODES[x.dtype],
            max_ctas=t.route_ctas, max_spins=t.max_spins, block_n=t.route_block_n, block_g=t.route_block_g)
        if p > 1:
            yield  # every rank's counts row must have landed before the layout kernel runs
        snap, tpe = k_.layout(view.counts(me), view.count_flags(me), view.status, rank=me, num_experts=E,
                              num_local_experts=L, chunk_target=t.chunk_target, max_spins=t.max_spins)
        lay = k_.snap_layout(E, p)
        row_bytes = H * x.element_size()
        if self.dropless:
            table = _to_host(snap[: lay["host"]], view)  # host sync: output size, error flags (dropless mode)
            self._raise_on_bad_counts(table, lay, p)
            num_rows = table[lay["misc"]]
            s_rows = max(1, table[lay["misc"] + 1])
        else:
            num_rows = p * self.max_tokens_per_rank * min(topk, L)
            s_rows = self.max_tokens_per_rank
        if p == 1:  # the staging buffers are never touched, only passed: keep them tiny
            s_rows = 1
            view.ensure_data(1, row_bytes, topk)
        else:  # collective when it grows: every rank computes the same sizes from the same table
            view.ensure_data(max(s_rows, self.max_tokens_per_rank or 0), row_bytes, topk)
        dev = x.device
        handle = NVLinkHandle(
            routing_weights=routing_weights, selected_experts=sel, send_slot=send_slot,
            local_rows=torch.empty((n, topk), dtype=torch.int32, device=dev), snap=snap,
            recv_rows=torch.empty((p, s_rows, topk), dtype=torch.int32, device=dev),
            recv_w=torch.empty((p, s_rows, topk), dtype=torch.float32, device=dev),
            recv_chunk=torch.empty((p, view.nchunk, 2), dtype=torch.int32, device=dev),
            num_rows=num_rows, hidden_dtype=x.dtype, view=view,
        )
        return _Plan(handle, tpe, rank_in_expert, capacity_rows=not self.dropless)

    def _raise_on_bad_counts(self, table: list[int], lay: dict, p: int) -> None:
        if table[lay["misc"] + 4] != 0:
            raise RuntimeError("NVLinkTokenDispatcher: a kernel timed out waiting for a peer rank "
                               f"(status {table[lay['misc'] + 4]}); results are invalid")
        cs, E = lay["cs"], self.num_experts
        rows = [table[r * cs:(r + 1) * cs] for r in range(p)]
        bad = [r for r, row in enumerate(rows) if row[E + p + 1]]
        if bad:
            raise ValueError(f"selected_experts must be in [-1, {E}); rank(s) {bad} passed ids outside it")
        sizes, codes = [row[E + p + 2] for row in rows], [row[E + p + 3] for row in rows]
        if len(set(sizes)) > 1 or len(set(codes)) > 1:
            names = {v: str(k) for k, v in DTYPE_CODES.items()}
            raise ValueError(f"EP ranks disagree on hidden_states: hidden sizes {sizes}, dtypes "
                             f"{[names.get(c, c) for c in codes]}")

    def _fused(self, launch, view: WorkspaceView, n_send: int, n_recv: int):
        """Launch a fused kernel: both roles in one grid, or (simulation) role by role."""
        if view.split_roles and n_send > 0 and n_recv > 0:
            launch(n_send, 0)
            yield  # every rank's send role runs before any receive role (the interpreter is serial)
            launch(0, n_recv)
        else:
            launch(n_send, n_recv)

    def _push_program(self, x, plan: _Plan):
        """Stage 4 of a dispatch: the fused push / expand kernel. Returns ``expert_input``."""
        k_ = _kernels()
        h = plan.handle
        view = h.view
        p, me, H = view.world_size, view.rank, self.hidden_size
        t = self.tuning(view, H)
        topk = h.selected_experts.shape[1]
        expert_input = x.new_empty((h.num_rows, H))
        row_limit = h.num_rows if plan.capacity_rows else 2**31 - 1
        stage = [view.rows("stage", r, x.dtype, H) for r in range(p)]
        meta = [view.stage_meta(r, topk) for r in range(p)]
        ctl = [view.ctl("stage", r) for r in range(p)]
        n_recv = t.n_recv if p > 1 else 0

        def launch(n_send, n_recv_):
            k_.dispatch_fused(
                x, h.selected_experts, h.routing_weights.detach().contiguous(), plan.rank_in_expert, h.send_slot, h.snap,
                expert_input, h.local_rows, h.recv_rows, h.recv_w, h.recv_chunk, view.status, stage, meta, ctl,
                rank=me, num_experts=self.num_experts, num_local_experts=self.num_local_experts, row_limit=row_limit,
                n_send=n_send, n_recv=n_recv_, max_spins=t.max_spins, block_t=t.block_t, block_h=t.block_h,
                num_warps=t.num_warps)

        yield from self._fused(launch, view, t.n_send, n_recv)
        return expert_input

    def _dispatch_program(self, hidden_states, selected_experts, routing_weights):
        """A whole dispatch on one rank without autograd: ``(expert_input, tokens_per_expert, handle)``."""
        plan = yield from self._plan_program(hidden_states, selected_experts, routing_weights)
        expert_input = yield from self._push_program(hidden_states.contiguous(), plan)
        return expert_input, plan.tokens_per_expert, plan.handle

    def _combine_program(self, y, handle: NVLinkHandle, *, use_weights: bool):
        """Combine (``use_weights``) or the backward of dispatch (plain sum): ``[N, H]``."""
        k_ = _kernels()
        view = handle.view
        p, me, H = view.world_size, view.rank, self.hidden_size
        t = self.tuning(view, H)
        y = y.contiguous()
        n = handle.selected_experts.shape[0]
        out = torch.empty((n, H), dtype=handle.hidden_dtype, device=y.device)
        comb = [view.rows("comb", r, handle.hidden_dtype, H) for r in range(p)]
        ctl = [view.ctl("comb", r) for r in range(p)]
        weights = handle.routing_weights.detach().contiguous()
        n_send = t.n_send if p > 1 else 0
        n_recv = t.n_recv if p > 1 else t.n_send

        def launch(n_send_, n_recv_):
            k_.combine_fused(
                y, out, weights, handle.local_rows, handle.send_slot, handle.snap, handle.recv_rows, handle.recv_w,
                handle.recv_chunk, view.status, comb, ctl, rank=me, num_experts=self.num_experts,
                use_weights=use_weights, n_send=n_send_, n_recv=n_recv_, max_spins=t.max_spins, block_t=t.block_t,
                block_h=t.block_h, num_warps=t.num_warps)

        yield from self._fused(launch, view, n_send, n_recv)
        return out

    def _combine_backward_program(self, grad_out, expert_output, handle: NVLinkHandle):
        """Backward of combine: ``(grad expert_output [R, H], grad routing_weights fp32 [N, K])``."""
        k_ = _kernels()
        view = handle.view
        p, me, H = view.world_size, view.rank, self.hidden_size
        t = self.tuning(view, H)
        g = grad_out.to(handle.hidden_dtype).contiguous()
        y = expert_output.contiguous()
        n, topk = handle.selected_experts.shape
        # Capacity mode: rows past sum(tokens_per_expert) get no gradient, so they must be zeros.
        make = torch.empty if self.dropless else torch.zeros
        grad_y = make(y.shape, dtype=y.dtype, device=y.device)
        grad_w = torch.zeros((n, topk), dtype=torch.float32, device=y.device)
        stage = [view.rows("stage", r, g.dtype, H) for r in range(p)]
        sctl = [view.ctl("stage", r) for r in range(p)]
        gw = [view.gw(r, topk) for r in range(p)]
        gctl = [view.ctl("gw", r) for r in range(p)]
        weights = handle.routing_weights.detach().contiguous()
        n_recv = t.n_recv if p > 1 else 0

        def launch(n_send, n_recv_):
            k_.combine_backward_fused(
                g, y, grad_y, grad_w, weights, handle.local_rows, handle.send_slot, handle.snap, handle.recv_rows,
                handle.recv_w, handle.recv_chunk, view.status, stage, sctl, gw, gctl, rank=me,
                num_experts=self.num_experts, n_send=n_send, n_recv=n_recv_, max_spins=t.max_spins, block_t=t.block_t,
                block_h=t.block_h, num_warps=t.num_warps)

        yield from self._fused(launch, view, t.n_send, n_recv)
        if p > 1:
            if view.split_roles:
                yield  # the weight gradients come from the other ranks' receive role
            k_.gather_weight_grads(grad_w, handle.selected_experts, handle.send_slot, handle.snap, gw[me], gctl[me],
                                   view.status, rank=me, num_experts=self.num_experts,
                                   num_local_experts=self.num_local_experts, world_size=p, programs=t.n_recv,
                                   max_spins=t.max_spins, block_t=t.block_t)
        return grad_y, grad_w
