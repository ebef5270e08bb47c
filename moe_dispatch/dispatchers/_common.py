"""Pieces every dispatcher needs: constructor checks and the cross-rank agreement check.

Imports only the protocol-level helpers; no dispatcher imports another.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import all_gather_rows, collective_device

# A stable code per dtype so ranks can compare dtypes inside an integer all-gather.
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


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
