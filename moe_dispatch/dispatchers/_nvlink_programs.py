"""The step programs of :class:`~moe_dispatch.dispatchers.nvlink.NVLinkTokenDispatcher`: one
operation on one rank, written as a generator that ``yield``s where it needs the other ranks'
writes. The same program serves both ways of running it:

* on GPU, :func:`run_to_end` runs it straight through (the ranks are concurrent processes and
  the kernels wait on each other's flags);
* in the CPU simulation (``TRITON_INTERPRET=1``, one process, P simulated ranks),
  :func:`run_lockstep` runs every rank up to its next ``yield`` before any rank continues, so a
  kernel never spins on a flag the serial interpreter has not set yet.

Stages (kernels in :mod:`moe_dispatch.kernels.nvlink`, field positions in its ``wire``):
``plan_program`` = route + counts exchange + layout (+ the dropless host sync);
``push_program`` = the fused push / expand; ``combine_program``; ``combine_backward_program``.
Also here: the handles and the launch tuning, which the programs create. Every program takes
``d``, the dispatcher (its sizes, mode, ``tuning`` and workspace).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Generator

import torch

from .._optional import import_triton_kernels
from ..kernels.nvlink.wire import DTYPE_CODES, SnapTable, snap_layout
from ._base import raise_on_bad_ranks
from ._symm_workspace import WorkspaceView

__all__ = ["NVLinkHandle", "NVLinkLocalHandle", "NVLinkTuning", "make_tuning", "run_to_end", "run_lockstep",
           "plan_program", "push_program", "dispatch_program", "combine_program", "combine_backward_program"]


def _launchers():
    return import_triton_kernels("nvlink.launch")  # lazy: importing moe_dispatch must not need triton


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


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
        snap: int32 layout table (``kernels.nvlink.wire.SnapLayout``): the exchanged counts, the
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


def run_to_end(gen: Generator):
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


def make_tuning(view: WorkspaceView, hidden: int, overrides: dict[str, int]) -> NVLinkTuning:
    """Launch parameters for ``view`` and hidden size ``hidden`` (``overrides`` win)."""
    sms = max(1, view.num_sms)
    if view.simulated:  # small, so the interpreter exercises several programs and chunks
        t = NVLinkTuning(n_send=2, n_recv=2 if view.world_size > 1 else 0, route_ctas=3, block_t=2,
                         block_h=min(16, _next_pow2(hidden)), num_warps=4, chunk_target=3, max_spins=20000,
                         route_block_n=2, route_block_g=2)
    else:
        multi = view.world_size > 1
        t = NVLinkTuning(n_send=max(1, sms // 2) if multi else sms, n_recv=max(1, sms // 2) if multi else 0,
                         route_ctas=sms, block_t=4, block_h=min(2048, _next_pow2(hidden)), num_warps=8,
                         chunk_target=256, max_spins=1 << 24)
    if overrides:
        t = replace(t, **overrides)
    if not 1 <= t.chunk_target <= view.nchunk:
        raise ValueError(f"chunk_target must be in [1, {view.nchunk}], got {t.chunk_target}")
    return t


def plan_program(d, hidden_states, selected_experts, routing_weights):
    """Stages 1-3 of a dispatch: routing metadata, counts exchange, layout (+ host sync)."""
    k_ = _launchers()
    x = hidden_states
    view = d._workspace(x.device)
    sel = selected_experts.contiguous()
    p, me = view.world_size, view.rank
    n, topk = sel.shape
    E, L, H = d.num_experts, d.num_local_experts, d.hidden_size
    t = d.tuning(view, H)
    rank_in_expert, send_slot = k_.route(
        sel, [view.counts(r) for r in range(p)], [view.count_flags(r) for r in range(p)], view.status,
        rank=me, num_experts=E, num_local_experts=L, hidden_size=H, dtype_code=DTYPE_CODES[x.dtype],
        max_ctas=t.route_ctas, max_spins=t.max_spins, block_n=t.route_block_n, block_g=t.route_block_g)
    if p > 1:
        yield  # every rank's counts row must have landed before the layout kernel runs
    snap, tpe = k_.layout(view.counts(me), view.count_flags(me), view.status, rank=me, num_experts=E,
                          num_local_experts=L, chunk_target=t.chunk_target, max_spins=t.max_spins)
    lay = snap_layout(E, p)
    row_bytes = H * x.element_size()
    if d.dropless:
        table = lay.decode(_to_host(snap[: lay.host], view))  # host sync: output size, error flags (dropless mode)
        _raise_on_bad_counts(table, E)
        num_rows = table.rows_here
        s_rows = max(1, table.max_tokens)
    else:
        num_rows = p * d.max_tokens_per_rank * min(topk, L)
        s_rows = d.max_tokens_per_rank
    if p == 1:  # the staging buffers are never touched, only passed: keep them tiny
        s_rows = 1
        view.ensure_data(1, row_bytes, topk)
    else:  # collective when it grows: every rank computes the same sizes from the same table
        view.ensure_data(max(s_rows, d.max_tokens_per_rank or 0), row_bytes, topk)
    dev = x.device
    handle = NVLinkHandle(
        routing_weights=routing_weights, selected_experts=sel, send_slot=send_slot,
        local_rows=torch.empty((n, topk), dtype=torch.int32, device=dev), snap=snap,
        recv_rows=torch.empty((p, s_rows, topk), dtype=torch.int32, device=dev),
        recv_w=torch.empty((p, s_rows, topk), dtype=torch.float32, device=dev),
        recv_chunk=torch.empty((p, view.nchunk, 2), dtype=torch.int32, device=dev),
        num_rows=num_rows, hidden_dtype=x.dtype, view=view,
    )
    return _Plan(handle, tpe, rank_in_expert, capacity_rows=not d.dropless)


def _raise_on_bad_counts(table: SnapTable, num_experts: int) -> None:
    """Dropless mode, every rank alike: a timed-out spin, bad expert ids or disagreeing ranks."""
    if table.status != 0:
        raise RuntimeError("NVLinkTokenDispatcher: a kernel timed out waiting for a peer rank "
                           f"(status {table.status}); results are invalid")
    raise_on_bad_ranks(num_experts, [r.bad_ids for r in table.rows], [r.hidden_size for r in table.rows],
                       [r.dtype_code for r in table.rows])


def _fused(launch, view: WorkspaceView, n_send: int, n_recv: int):
    """Launch a fused kernel: both roles in one grid, or (simulation) role by role."""
    if view.split_roles and n_send > 0 and n_recv > 0:
        launch(n_send, 0)
        yield  # every rank's send role runs before any receive role (the interpreter is serial)
        launch(0, n_recv)
    else:
        launch(n_send, n_recv)


def push_program(d, x, plan: _Plan):
    """Stage 4 of a dispatch: the fused push / expand kernel. Returns ``expert_input``."""
    k_ = _launchers()
    h = plan.handle
    view = h.view
    p, me, H = view.world_size, view.rank, d.hidden_size
    t = d.tuning(view, H)
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
            rank=me, num_experts=d.num_experts, num_local_experts=d.num_local_experts, row_limit=row_limit,
            n_send=n_send, n_recv=n_recv_, max_spins=t.max_spins, block_t=t.block_t, block_h=t.block_h,
            num_warps=t.num_warps)

    yield from _fused(launch, view, t.n_send, n_recv)
    return expert_input


def dispatch_program(d, hidden_states, selected_experts, routing_weights):
    """A whole dispatch on one rank without autograd: ``(expert_input, tokens_per_expert, handle)``."""
    plan = yield from plan_program(d, hidden_states, selected_experts, routing_weights)
    expert_input = yield from push_program(d, hidden_states.contiguous(), plan)
    return expert_input, plan.tokens_per_expert, plan.handle


def combine_program(d, y, handle: NVLinkHandle, *, use_weights: bool):
    """Combine (``use_weights``) or the backward of dispatch (plain sum): ``[N, H]``."""
    k_ = _launchers()
    view = handle.view
    p, me, H = view.world_size, view.rank, d.hidden_size
    t = d.tuning(view, H)
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
            handle.recv_chunk, view.status, comb, ctl, rank=me, num_experts=d.num_experts,
            use_weights=use_weights, n_send=n_send_, n_recv=n_recv_, max_spins=t.max_spins, block_t=t.block_t,
            block_h=t.block_h, num_warps=t.num_warps)

    yield from _fused(launch, view, n_send, n_recv)
    return out


def combine_backward_program(d, grad_out, expert_output, handle: NVLinkHandle):
    """Backward of combine: ``(grad expert_output [R, H], grad routing_weights fp32 [N, K])``."""
    k_ = _launchers()
    view = handle.view
    p, me, H = view.world_size, view.rank, d.hidden_size
    t = d.tuning(view, H)
    g = grad_out.to(handle.hidden_dtype).contiguous()
    y = expert_output.contiguous()
    n, topk = handle.selected_experts.shape
    # Capacity mode: rows past sum(tokens_per_expert) get no gradient, so they must be zeros.
    make = torch.empty if d.dropless else torch.zeros
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
            num_experts=d.num_experts, n_send=n_send, n_recv=n_recv_, max_spins=t.max_spins, block_t=t.block_t,
            block_h=t.block_h, num_warps=t.num_warps)

    yield from _fused(launch, view, t.n_send, n_recv)
    if p > 1:
        if view.split_roles:
            yield  # the weight gradients come from the other ranks' receive role
        k_.gather_weight_grads(grad_w, handle.selected_experts, handle.send_slot, handle.snap, gw[me], gctl[me],
                               view.status, rank=me, num_experts=d.num_experts,
                               num_local_experts=d.num_local_experts, world_size=p, programs=t.n_recv,
                               max_spins=t.max_spins, block_t=t.block_t)
    return grad_y, grad_w
