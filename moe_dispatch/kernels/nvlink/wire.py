"""The NVLink wire format: what the ranks' kernels write into each other's symmetric memory.

Pure Python (torch only, no triton): the kernels (as compile-time constants, see ``sync.py``),
the workspace that allocates the buffers (:mod:`moe_dispatch.dispatchers._symm_workspace`) and
the dispatcher that reads the layout table back (:mod:`moe_dispatch.dispatchers.nvlink`) all take
the field positions from here, so no module carries a magic offset.

Shape legend: E experts (global), L local experts, P ranks, C = ``NCHUNK`` chunk slots.

``counts [P, CS]`` int32, in every rank's meta region; row s is written by rank s::

    [ slots per global expert (E) | tokens sent to each rank (P) | N | bad ids | H | dtype code ]
      0 ..                          E ..                           E+P+ROW_NUM_TOKENS ...

``ctl [P, C, CTL_WIDTH]`` int32 per channel (stage, comb, gw), one entry per (source, chunk)::

    [ flag (0 free / 1 published) | first token slot j | count of slots | unused ]

``snap`` int32, per dispatch (written by the layout kernel on this rank, read by the later
kernels and, in dropless mode, by the host)::

    [ counts copy (P * CS) | base (E): first row at rank e // L of this rank's slots of e
      | misc: rows here, max N over ranks, chunk tokens, bad ids over all ranks, status, pad ]

Worked example, E = 4, P = 2: CS = 4 + 2 + 4 = 10; ``snap`` has ``counts`` at 0..19, ``base`` at
20..23, ``misc`` at 24.., the host reads the first 24 + 5 = 29 elements, the table has 32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MAX_PEERS", "NCHUNK", "DTYPE_CODES", "CODE_DTYPES", "ROW_NUM_TOKENS", "ROW_BAD_IDS", "ROW_HIDDEN",
    "ROW_DTYPE", "ROW_TAIL", "CTL_FLAG", "CTL_FIRST", "CTL_COUNT", "CTL_WIDTH", "SNAP_ROWS_HERE",
    "SNAP_MAX_TOKENS", "SNAP_CHUNK_TOKENS", "SNAP_BAD_IDS", "SNAP_STATUS", "SNAP_HOST_FIELDS", "SNAP_MISC_WIDTH",
    "counts_stride", "snap_layout", "SnapLayout", "CountsRow", "SnapTable",
]

MAX_PEERS = 8   # single node: up to 8 GPUs; the kernels take one pointer argument per peer buffer
NCHUNK = 1024   # chunk slots per (source, channel); the dispatcher's chunk_target must not exceed it

# A stable code per dtype so ranks can compare dtypes inside an integer exchange (every backend's
# count exchange carries it; the NVLink counts row in column ROW_DTYPE).
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}

# counts row: fields after the E expert counts and the P token counts (column E + P + field)
ROW_NUM_TOKENS = 0  # N, tokens of the writing rank
ROW_BAD_IDS = 1     # expert ids outside [-1, E) the writing rank passed
ROW_HIDDEN = 2      # its hidden size
ROW_DTYPE = 3       # its DTYPE_CODES entry
ROW_TAIL = 4

# ctl entry of one (source, chunk)
CTL_FLAG = 0
CTL_FIRST = 1
CTL_COUNT = 2
CTL_WIDTH = 4

# snap misc fields (offset SnapLayout.misc + field)
SNAP_ROWS_HERE = 0     # rows of expert_input on this rank
SNAP_MAX_TOKENS = 1    # max N over ranks
SNAP_CHUNK_TOKENS = 2  # tokens per chunk, the same on every rank
SNAP_BAD_IDS = 3       # bad expert ids over all ranks
SNAP_STATUS = 4        # this rank's status word when the layout ran (bit 0: a spin timed out)
SNAP_HOST_FIELDS = 5   # misc fields the host reads
SNAP_MISC_WIDTH = 8


def counts_stride(num_experts: int, world_size: int) -> int:
    """Columns of a counts row: E expert counts, P token counts, then the ``ROW_*`` fields."""
    return num_experts + world_size + ROW_TAIL


@dataclass(frozen=True)
class CountsRow:
    """One rank's counts row, decoded on the host."""

    expert_slots: list[int]   # [E]
    tokens_to: list[int]      # [P]
    num_tokens: int
    bad_ids: int
    hidden_size: int
    dtype_code: int


@dataclass(frozen=True)
class SnapTable:
    """The host's copy of a ``snap`` table (dropless mode), decoded."""

    rows: list[CountsRow]     # [P], every rank's counts row
    rows_here: int
    max_tokens: int
    chunk_tokens: int
    bad_ids: int
    status: int


@dataclass(frozen=True)
class SnapLayout:
    """Offsets (int32 elements) in the per-dispatch ``snap`` tensor.

    Attributes:
        cs: columns of a counts row (``counts_stride``).
        counts: offset of the ``[P, CS]`` copy of the exchanged counts (0).
        base: offset of ``base [E]``.
        misc: offset of the ``SNAP_*`` fields.
        host: elements the host reads (dropless mode).
        size: elements of the table.
    """

    num_experts: int
    world_size: int

    @property
    def cs(self) -> int:
        return counts_stride(self.num_experts, self.world_size)

    counts = 0

    @property
    def base(self) -> int:
        return self.world_size * self.cs

    @property
    def misc(self) -> int:
        return self.base + self.num_experts

    @property
    def host(self) -> int:
        return self.misc + SNAP_HOST_FIELDS

    @property
    def size(self) -> int:
        return self.misc + SNAP_MISC_WIDTH

    def decode(self, table: list[int]) -> SnapTable:
        """The first ``host`` elements of a snap table -> named fields."""
        E, P, cs, misc = self.num_experts, self.world_size, self.cs, self.misc
        rows = []
        for r in range(P):
            row = table[r * cs:(r + 1) * cs]
            tail = row[E + P:]
            rows.append(CountsRow(expert_slots=row[:E], tokens_to=row[E:E + P], num_tokens=tail[ROW_NUM_TOKENS],
                                  bad_ids=tail[ROW_BAD_IDS], hidden_size=tail[ROW_HIDDEN], dtype_code=tail[ROW_DTYPE]))
        return SnapTable(rows=rows, rows_here=table[misc + SNAP_ROWS_HERE], max_tokens=table[misc + SNAP_MAX_TOKENS],
                         chunk_tokens=table[misc + SNAP_CHUNK_TOKENS], bad_ids=table[misc + SNAP_BAD_IDS],
                         status=table[misc + SNAP_STATUS])


def snap_layout(num_experts: int, world_size: int) -> SnapLayout:
    """The ``snap`` layout for E experts over P ranks."""
    return SnapLayout(num_experts, world_size)
