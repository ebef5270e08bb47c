"""Buffers of :class:`~moe_dispatch.dispatchers.nvlink.NVLinkTokenDispatcher`: who owns them,
how they are laid out, and how a rank sees its peers' copies.

Every rank holds two regions of the same layout (see ``_meta_layout`` / ``_data_layout``):

* **meta** (allocated once, small): ``counts [P, CS]`` int32, ``count_flags [P]`` int32 and three
  control channels ``ctl_<stage|comb|gw> [P, C, 4]`` int32 (C = ``NCHUNK``); the fields of each
  are in :mod:`moe_dispatch.kernels.nvlink.wire`. Flags start at 0
  and the protocol returns them to 0 after every operation, so meta is zeroed only once.
* **data** (grown on demand): ``stage [P, S, row_bytes]``, ``comb [P, S, row_bytes]``,
  ``stage_meta [P, S, 2K]`` int32 and ``gw [P, S, K]`` fp32, S = tokens per source.

Two owners implement the same per-rank interface (:class:`WorkspaceView`):

* :class:`SymmetricWorkspace`: PyTorch symmetric memory (CUDA / P2P backend) over an EP group on
  one node; ``peer`` views are tensors on this GPU mapped onto the peer's memory
  (``_SymmetricMemory.get_buffer``). Allocation and growth are collectives.
* :class:`SimulatedWorkspace`: P sets of tensors in one process (CPU, or one GPU), for the CPU
  simulation of the protocol under ``TRITON_INTERPRET=1`` (``rank_view(r)``), and with P = 1 as
  the real workspace of the single-rank (no communication) path.

Every owner has an explicit ``close()``; nothing is cached at module level.
"""
from __future__ import annotations

import socket
from typing import Any

import torch

from ..kernels.nvlink.wire import CTL_WIDTH, NCHUNK, counts_stride

__all__ = ["NCHUNK", "WorkspaceView", "SymmetricWorkspace", "SimulatedWorkspace", "check_peer_access"]

_ALIGN = 256   # byte alignment of every region (16-byte vector access, any dtype view)
_CHANNELS = ("stage", "comb", "gw")


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _meta_layout(world_size: int, num_experts: int, nchunk: int) -> tuple[dict[str, tuple[int, tuple, torch.dtype]], int]:
    """name -> (byte offset, shape, dtype), and the total size in bytes."""
    p = world_size
    entries = [("counts", (p, counts_stride(num_experts, p)), torch.int32), ("count_flags", (p,), torch.int32)]
    entries += [(f"ctl_{c}", (p, nchunk, CTL_WIDTH), torch.int32) for c in _CHANNELS]
    return _place(entries)


def _data_layout(world_size: int, s_cap: int, row_bytes: int, topk: int):
    p = world_size
    return _place([
        ("stage", (p, s_cap, row_bytes), torch.uint8),
        ("comb", (p, s_cap, row_bytes), torch.uint8),
        ("stage_meta", (p, s_cap, 2 * topk), torch.int32),
        ("gw", (p, s_cap, topk), torch.float32),
    ])


def _place(entries):
    out, off = {}, 0
    for name, shape, dtype in entries:
        out[name] = (off, shape, dtype)
        numel = 1
        for d in shape:
            numel *= d
        off = _align(off + numel * torch.empty((), dtype=dtype).element_size())
    return out, max(off, _ALIGN)


def _region(buf: torch.Tensor, entry, dtype: torch.dtype | None = None, shape: tuple | None = None) -> torch.Tensor:
    """A typed view of one region of a uint8 buffer (``dtype``/``shape`` override a row region)."""
    off, full_shape, base_dtype = entry
    dtype = base_dtype if dtype is None else dtype
    shape = full_shape if shape is None else shape
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return buf[off:off + nbytes].view(dtype).view(shape)


class WorkspaceView:
    """One rank's view of a workspace: its own buffers and typed views of every peer's.

    Subclasses provide ``_meta_bytes(peer)``, ``_data_bytes(peer)`` (uint8 tensors, this rank's
    device) and ``ensure_data``. Attributes: ``rank``, ``world_size``, ``device``,
    ``num_experts``, ``nchunk``, ``split_roles`` (True: fused kernels must be launched role by
    role, the CPU simulation), ``status`` (int32 [4] on this rank: bit 0 of ``status[0]`` =
    a spin timed out), ``num_sms`` (programs to aim for), ``simulated``.
    """

    rank: int
    world_size: int
    device: torch.device
    num_experts: int
    nchunk: int
    split_roles: bool
    status: torch.Tensor
    num_sms: int
    simulated: bool

    def _init_layout(self) -> None:
        self._meta_entries, self.meta_nbytes = _meta_layout(self.world_size, self.num_experts, self.nchunk)
        self._data_entries = None
        self.s_cap = 0
        self.row_bytes = 0
        self.topk = 0
        self.s_cap_align = 4 if getattr(self, "simulated", False) else 64
        self._views: dict[Any, torch.Tensor] = {}

    def _cached(self, key, make):
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = make()
        return v

    # --- meta region --------------------------------------------------------------------------
    def counts(self, peer: int) -> torch.Tensor:
        """int32 ``[P, CS]`` of rank ``peer``."""
        return self._cached(("counts", peer), lambda: _region(self._meta_bytes(peer), self._meta_entries["counts"]))

    def count_flags(self, peer: int) -> torch.Tensor:
        return self._cached(("count_flags", peer),
                            lambda: _region(self._meta_bytes(peer), self._meta_entries["count_flags"]))

    def ctl(self, channel: str, peer: int) -> torch.Tensor:
        """int32 ``[P, C, 4]`` control channel ``stage | comb | gw`` of rank ``peer``."""
        return self._cached(("ctl", channel, peer),
                            lambda: _region(self._meta_bytes(peer), self._meta_entries[f"ctl_{channel}"]))

    # --- data region --------------------------------------------------------------------------
    def _data(self, name: str, peer: int, dtype=None, shape=None) -> torch.Tensor:
        if self._data_entries is None:
            raise RuntimeError("the data region is not allocated (ensure_data was not called)")
        return self._cached(("data", self._generation, name, peer, dtype, shape),
                            lambda: _region(self._data_bytes(peer), self._data_entries[name], dtype, shape))

    def rows(self, name: str, peer: int, dtype: torch.dtype, hidden: int) -> torch.Tensor:
        """``[P, S, hidden]`` of ``dtype``: region ``stage`` or ``comb`` of rank ``peer``."""
        if hidden * torch.empty((), dtype=dtype).element_size() > self.row_bytes:
            raise RuntimeError(f"rows of {hidden} x {dtype} exceed the workspace's {self.row_bytes} bytes per row")
        return self._data(name, peer, dtype, (self.world_size, self.s_cap, hidden))

    def stage_meta(self, peer: int, topk: int) -> torch.Tensor:
        return self._data("stage_meta", peer, torch.int32, (self.world_size, self.s_cap, 2 * topk))

    def gw(self, peer: int, topk: int) -> torch.Tensor:
        return self._data("gw", peer, torch.float32, (self.world_size, self.s_cap, topk))

    def needs_growth(self, s_cap: int, row_bytes: int, topk: int) -> bool:
        return self._data_entries is None or s_cap > self.s_cap or row_bytes > self.row_bytes or topk > self.topk

    def _grown_sizes(self, s_cap: int, row_bytes: int, topk: int) -> tuple[int, int, int]:
        # Deterministic on every rank (same arguments, same old sizes): grow by >= 1.5x so a slowly
        # increasing batch size does not re-rendezvous every step.
        if self._data_entries is not None and s_cap > self.s_cap:
            s_cap = max(s_cap, self.s_cap * 3 // 2)
        align = self.s_cap_align
        s_cap = (max(s_cap, self.s_cap, 1) + align - 1) // align * align
        return s_cap, _align(max(row_bytes, self.row_bytes, 16)), max(topk, self.topk, 1)

    def _meta_bytes(self, peer: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _data_bytes(self, peer: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensure_data(self, s_cap: int, row_bytes: int, topk: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# in-process workspace (CPU simulation; single rank)
# ------------------------------------------------------------------------------------------------
class SimulatedWorkspace:
    """P ranks' buffers in one process. ``rank_view(r)`` is rank r's :class:`WorkspaceView`.

    Growth is "collective" in the simulated sense: the first rank that asks grows every rank's
    data region (the others then find it large enough). The data region is filled with 0xFF
    bytes (NaN / -1), so a read of a row nobody wrote shows up in the tests.
    """

    def __init__(self, world_size: int, num_experts: int, device: torch.device | str = "cpu", *,
                 nchunk: int = NCHUNK, num_sms: int = 4) -> None:
        self.world_size, self.num_experts, self.nchunk = world_size, num_experts, nchunk
        self.device = torch.device(device)
        _, nbytes = _meta_layout(world_size, num_experts, nchunk)
        self.meta = [torch.zeros(nbytes, dtype=torch.uint8, device=self.device) for _ in range(world_size)]
        self.data: list[torch.Tensor] | None = None
        self.generation = 0
        self.sizes = (0, 0, 0)
        self._views = [_SimulatedRankView(self, r, num_sms) for r in range(world_size)]

    def rank_view(self, rank: int) -> "WorkspaceView":
        return self._views[rank]

    def _grow(self, sizes: tuple[int, int, int]) -> None:
        _, nbytes = _data_layout(self.world_size, *sizes)
        self.data = [torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=self.device) for _ in range(self.world_size)]
        self.generation += 1
        self.sizes = sizes

    def close(self) -> None:
        self.meta, self.data = [], None


class _SimulatedRankView(WorkspaceView):
    def __init__(self, owner: SimulatedWorkspace, rank: int, num_sms: int) -> None:
        self._owner = owner
        self.rank, self.world_size, self.device = rank, owner.world_size, owner.device
        self.num_experts, self.nchunk = owner.num_experts, owner.nchunk
        self.split_roles = owner.world_size > 1
        self.simulated = owner.device.type == "cpu"
        self.num_sms = num_sms if self.simulated else torch.cuda.get_device_properties(owner.device).multi_processor_count
        self.status = torch.zeros(4, dtype=torch.int32, device=owner.device)
        self._init_layout()
        self._generation = -1

    def _meta_bytes(self, peer: int) -> torch.Tensor:
        return self._owner.meta[peer]

    def _data_bytes(self, peer: int) -> torch.Tensor:
        return self._owner.data[peer]

    def ensure_data(self, s_cap: int, row_bytes: int, topk: int) -> None:
        owner = self._owner
        if self.needs_growth(s_cap, row_bytes, topk) and (
                owner.data is None or s_cap > owner.sizes[0] or row_bytes > owner.sizes[1] or topk > owner.sizes[2]):
            owner._grow(self._grown_sizes(s_cap, row_bytes, topk))
        if self._generation != owner.generation:
            self.s_cap, self.row_bytes, self.topk = owner.sizes
            self._data_entries, _ = _data_layout(self.world_size, *owner.sizes)
            self._generation = owner.generation


# ------------------------------------------------------------------------------------------------
# symmetric memory (CUDA, P2P)
# ------------------------------------------------------------------------------------------------
def check_peer_access(group, device: torch.device) -> None:
    """Raise ``RuntimeError`` (on every rank alike) unless all ranks of ``group`` are distinct GPUs
    of this host with P2P access to each other. One ``all_gather_object``."""
    import torch.distributed as dist

    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", device.index))
    infos: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(infos, (socket.gethostname(), uuid), group=group)
    alt = "use AllToAllTokenDispatcher (NCCL) instead"
    hosts = sorted({h for h, _ in infos})
    if len(hosts) > 1:
        raise RuntimeError(f"NVLinkTokenDispatcher works within one node; the EP group spans hosts {hosts}: {alt}")
    uuids = [u for _, u in infos]
    if len(set(uuids)) != len(uuids):
        raise RuntimeError(f"NVLinkTokenDispatcher needs one GPU per rank; ranks share GPUs {uuids}: {alt}")
    local = {str(getattr(torch.cuda.get_device_properties(i), "uuid", i)): i for i in range(torch.cuda.device_count())}
    if all(u in local for u in uuids):  # every peer visible here: check each pair
        for a in uuids:
            for b in uuids:
                if a != b and not torch.cuda.can_device_access_peer(local[a], local[b]):
                    raise RuntimeError(
                        f"GPU {local[a]} cannot access GPU {local[b]} directly (no P2P / NVLink): "
                        f"NVLinkTokenDispatcher needs peer access between all EP ranks; {alt}")
    # else: peers hidden by CUDA_VISIBLE_DEVICES; symmetric memory's rendezvous checks access itself


def _use_cuda_backend(device: torch.device) -> None:
    """Select the CUDA (P2P) symmetric-memory backend; NVSHMEM's put path measured ~28 GB/s here."""
    import torch.distributed._symmetric_memory as symm_mem

    set_backend = getattr(symm_mem, "set_backend", None)
    if set_backend is None:  # older torch: CUDA is the only backend
        return
    get_backend = getattr(symm_mem, "get_backend", None)
    current = get_backend(device) if get_backend is not None else None
    if current == "CUDA":
        return
    try:
        set_backend("CUDA")
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise RuntimeError(
            f"NVLinkTokenDispatcher needs the CUDA (P2P) symmetric-memory backend, but the backend is {current!r} "
            f"and cannot be switched ({exc}); construct the dispatcher before any other symmetric-memory "
            "allocation in this process, or use AllToAllTokenDispatcher") from exc


class _SymmRegion:
    """One symmetric allocation: the local tensor, its handle, and uint8 views of every rank's copy."""

    def __init__(self, nbytes: int, group, device: torch.device, zero: bool) -> None:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        self.tensor = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        if zero:
            self.tensor.zero_()
        self.handle = symm_mem.rendezvous(self.tensor, group)
        hdl = self.handle
        ptrs = list(hdl.buffer_ptrs)
        # get_buffer offsets count from the allocation's base; the tensor may sit at an offset in
        # it (memory pools). All ranks allocate alike, so the offset is the same on every rank;
        # check that instead of assuming it.
        base_off = self.tensor.data_ptr() - ptrs[hdl.rank]
        offs = [None] * hdl.world_size
        dist.all_gather_object(offs, base_off, group=group)
        if len(set(offs)) != 1 or base_off < 0:
            raise RuntimeError(f"symmetric buffer offsets differ across ranks ({offs}); cannot map peer buffers")
        self.peers = []
        for peer in range(hdl.world_size):
            view = hdl.get_buffer(peer, (nbytes,), torch.uint8, base_off)
            if view.data_ptr() != ptrs[peer] + base_off:
                view = hdl.get_buffer(peer, (nbytes,), torch.uint8, 0)  # API variant relative to the tensor
                if view.data_ptr() != ptrs[peer] + base_off:
                    raise RuntimeError("symmetric memory get_buffer returned an unexpected address")
            self.peers.append(view)

    def close(self) -> None:
        self.peers, self.handle, self.tensor = [], None, None


class SymmetricWorkspace(WorkspaceView):
    """Symmetric-memory workspace of one EP group on one node (this process's view of it).

    Construction and :meth:`ensure_data` are collectives: every rank of ``group`` must call
    them, in the same order, with the same arguments. All operations using the workspace must be
    issued on one CUDA stream per rank (the protocol relies on stream order between them).

    Raises:
        RuntimeError: ranks on several hosts, shared GPUs, no P2P access, or a symmetric-memory
            backend other than CUDA already in use; each message names AllToAllTokenDispatcher.
    """

    def __init__(self, group, num_experts: int, device: torch.device, *, nchunk: int = NCHUNK) -> None:
        import torch.distributed as dist

        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.device = torch.device(device)
        self.num_experts, self.nchunk = num_experts, nchunk
        self.split_roles = False
        self.simulated = False
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._init_layout()
        self._generation = 0
        check_peer_access(group, self.device)
        _use_cuda_backend(self.device)
        self.status = torch.zeros(4, dtype=torch.int32, device=self.device)
        with torch.cuda.device(self.device):
            self._meta = _SymmRegion(self.meta_nbytes, group, self.device, zero=True)
            self._data_region: _SymmRegion | None = None
            # No rank may raise a flag in our meta region before we zeroed it: the zeroing is
            # ordered before this barrier on our stream, peers' first writes come after theirs.
            self._meta.handle.barrier(channel=0)

    def _meta_bytes(self, peer: int) -> torch.Tensor:
        return self._meta.peers[peer]

    def _data_bytes(self, peer: int) -> torch.Tensor:
        return self._data_region.peers[peer]

    def ensure_data(self, s_cap: int, row_bytes: int, topk: int) -> None:
        """Collective when it grows: (re)allocate the data region for ``s_cap`` tokens per source,
        ``row_bytes`` bytes per row and top-k ``topk``. A no-op when already large enough."""
        if not self.needs_growth(s_cap, row_bytes, topk):
            return
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("NVLinkTokenDispatcher's workspace must grow, which cannot happen during CUDA graph "
                               "capture: run one eager dispatch of the largest batch before capturing")
        sizes = self._grown_sizes(s_cap, row_bytes, topk)
        entries, nbytes = _data_layout(self.world_size, *sizes)
        # Every earlier operation finished on every rank: they completed before the host sync
        # that told us to grow (ours) and before the peers reached this collective (theirs).
        torch.cuda.synchronize(self.device)
        if self._data_region is not None:
            self._data_region.close()
            self._data_region = None
        self._views.clear()
        with torch.cuda.device(self.device):
            self._data_region = _SymmRegion(nbytes, self.group, self.device, zero=False)
        self._data_entries = entries
        self.s_cap, self.row_bytes, self.topk = sizes
        self._generation += 1

    def close(self) -> None:
        """Free the buffers (call on every rank once no operation is in flight)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
        for region in (getattr(self, "_data_region", None), getattr(self, "_meta", None)):
            if region is not None:
                region.close()
        self._data_region, self._meta = None, None
        self._views = {}
        self._data_entries = None
