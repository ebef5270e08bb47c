"""What every dispatcher shares, written once: constructor checks, group binding, the checks of
``dispatch`` arguments, the cross-rank errors, ``repr``, ``close`` and ``with`` support.

A backend subclasses :class:`DispatcherBase` and writes only its transport: ``dispatch``,
``combine``, and whatever it holds between them (``close()`` frees it). No dispatcher imports
another; this module imports only the protocol-level helpers and the permute backend list.

The binding verbs (one family, ``set_ep_group*``): a dispatcher and a ``TopKRouter`` are bound
with ``set_ep_group(group)`` (``None``: one rank, no communication); a model binds all its
dispatchers and routers with ``set_ep_groups(...)``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from .._checks import check_routing
from ..distributed import all_gather_rows, collective_device
from ..kernels.nvlink.wire import CODE_DTYPES, DTYPE_CODES
from ..permute import BACKENDS as PERMUTE_BACKENDS

__all__ = ["DispatcherBase", "DTYPE_CODES", "CODE_DTYPES", "PERMUTE_BACKENDS", "check_sizes",
           "check_permute_backend", "check_group_agreement", "raise_on_bad_ranks"]


def check_sizes(num_experts: int, num_local_experts: int, hidden_size: int, ep_size: int) -> None:
    """Validate a dispatcher's constructor arguments (ValueError naming the argument)."""
    for name, value in (("num_experts", num_experts), ("num_local_experts", num_local_experts),
                        ("hidden_size", hidden_size), ("ep_size", ep_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_experts % ep_size != 0:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
    if num_local_experts * ep_size != num_experts:
        raise ValueError(
            f"num_local_experts * ep_size must equal num_experts: {num_local_experts} * {ep_size} != {num_experts}"
        )


def check_permute_backend(permute_backend: str) -> None:
    """``"auto"`` or one of :data:`moe_dispatch.permute.BACKENDS` (ValueError otherwise)."""
    if permute_backend != "auto" and permute_backend not in PERMUTE_BACKENDS:
        raise ValueError(f"permute_backend must be one of {('auto',) + PERMUTE_BACKENDS}, got {permute_backend!r}")


def check_group_agreement(group, ep_size: int, fields: dict[str, int]) -> None:
    """Check ``group.size() == ep_size`` and that every rank passes the same ``fields``.

    Uses one small all-gather; on disagreement every rank raises the same ``ValueError``.
    """
    size = dist.get_world_size(group)
    if size != ep_size:
        raise ValueError(f"the EP group has {size} ranks but the dispatcher was built with ep_size={ep_size}")
    row = torch.tensor(list(fields.values()), dtype=torch.int64, device=collective_device(group))
    table = all_gather_rows(row, group).cpu().tolist()  # host sync, once per set_ep_group
    for col, name in enumerate(fields):
        values = [r[col] for r in table]
        if len(set(values)) > 1:
            raise ValueError(f"EP ranks disagree on {name}: per rank {values}")


def raise_on_bad_ranks(num_experts: int, bad_ids: Sequence[int], hidden_sizes: Sequence[int],
                       dtype_codes: Sequence[int]) -> None:
    """Decode what every rank reported in the count exchange (per rank: bad expert ids, hidden
    size, dtype code) and raise the same ``ValueError`` on every rank when one of them is off."""
    bad = [r for r, n in enumerate(bad_ids) if n]
    if bad:
        raise ValueError(f"selected_experts must be in [-1, {num_experts}); rank(s) {bad} passed ids outside it")
    if len(set(hidden_sizes)) > 1 or len(set(dtype_codes)) > 1:
        dtypes = [str(CODE_DTYPES.get(c, c)) for c in dtype_codes]
        raise ValueError(f"EP ranks disagree on hidden_states: hidden sizes {list(hidden_sizes)}, dtypes {dtypes}")


class DispatcherBase:
    """Plumbing of a :class:`~moe_dispatch.TokenDispatcher`; subclasses add the transport.

    Attributes (set by :meth:`_init_common`): ``num_experts``, ``num_local_experts``,
    ``hidden_size``, ``ep_size``, ``permute_backend``; ``_group`` (None until bound).
    ``_repr_fields`` lists the attributes ``repr`` shows.
    """

    _repr_fields: tuple[str, ...] = ("num_experts", "num_local_experts", "hidden_size", "ep_size", "permute_backend")
    _group: Any = None

    def _init_common(self, num_experts: int, num_local_experts: int, hidden_size: int, ep_size: int,
                     permute_backend: str) -> None:
        """Check and store the sizes every dispatcher takes (ValueError naming the argument)."""
        check_sizes(num_experts, num_local_experts, hidden_size, ep_size)
        check_permute_backend(permute_backend)
        self.num_experts, self.num_local_experts = num_experts, num_local_experts
        self.hidden_size, self.ep_size, self.permute_backend = hidden_size, ep_size, permute_backend
        self._group = None

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._repr_fields)
        return f"{type(self).__name__}({args})"

    # --- binding ------------------------------------------------------------------------------
    def _agreement_fields(self) -> dict[str, int]:
        """What every rank of the EP group must agree on (subclasses add their own)."""
        return {"num_experts": self.num_experts, "num_local_experts": self.num_local_experts,
                "hidden_size": self.hidden_size, "ep_size": self.ep_size}

    def _check_group(self, group) -> bool:
        """The ``set_ep_group`` rules: ``None`` only for ``ep_size == 1`` (returns False); else one
        small all-gather checks the group size and that every rank agrees (returns True)."""
        if group is None:
            if self.ep_size != 1:
                raise ValueError(f"group must be a ProcessGroup of {self.ep_size} ranks for ep_size={self.ep_size}, got None")
            return False
        check_group_agreement(group, self.ep_size, self._agreement_fields())
        return True

    def _check_bound(self) -> None:
        if self.ep_size > 1 and self._group is None:
            raise RuntimeError(f"ep_size={self.ep_size}: call set_ep_group(group) before dispatch")

    # --- dispatch arguments (no communication, no device sync) ---------------------------------
    def _check_dispatch_args(self, hidden_states, selected_experts, routing_weights) -> None:
        """Static checks of ``dispatch``'s arguments, then that the dispatcher is bound."""
        check_routing(hidden_states, selected_experts, routing_weights, hidden_size=self.hidden_size)
        if hidden_states.dtype not in DTYPE_CODES:
            raise TypeError(f"hidden_states dtype must be one of {list(DTYPE_CODES)}, got {hidden_states.dtype}")
        self._check_bound()

    # --- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Free what the dispatcher holds (nothing here); handles from before cannot be combined."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
