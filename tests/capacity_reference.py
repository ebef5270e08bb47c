"""An independent, loop-based reference of the all-to-all capacity mode (drop policy and the
rows a rank receives), for the single-process and the gloo tests."""
from __future__ import annotations

import torch


def reference_keep(se: torch.Tensor, w: torch.Tensor, num_experts: int, num_local: int, capacity: int) -> torch.Tensor:
    """bool ``[N, K]``: per destination rank, the ``capacity`` valid slots of highest weight,
    ties by (token, k); plain Python sorting."""
    n, k = se.shape
    keep = torch.zeros(n, k, dtype=torch.bool)
    for d in range(num_experts // num_local):
        cand = sorted((-float(w[i, j]), i, j) for i in range(n) for j in range(k)
                      if 0 <= int(se[i, j]) < num_experts and int(se[i, j]) // num_local == d)
        for _, i, j in cand[:capacity]:
            keep[i, j] = True
    return keep


def kept_routing(se, w, num_experts, num_local, capacity):
    """``se`` with the dropped (and invalid) slots set to -1, and the dropped mask."""
    keep = reference_keep(se, w, num_experts, num_local, capacity)
    valid = (se >= 0) & (se < num_experts)
    return torch.where(keep, se, -1), valid & ~keep


def routing(kind: str, n: int, k: int, e: int, g: torch.Generator, tied: bool = False):
    """``(selected [n, k], weights [n, k])``: kinds random (repeats, -1), topk (distinct),
    one_expert (every slot to one expert). ``tied``: weights from {0.25, 0.5} (many ties)."""
    if kind == "topk":
        se = torch.rand(n, e, generator=g).topk(min(k, e), -1).indices
        se = torch.cat([se, torch.full((n, k - se.shape[1]), -1, dtype=torch.long)], 1)
    elif kind == "one_expert":
        se = torch.full((n, k), int(torch.randint(e, (1,), generator=g)), dtype=torch.long)
    else:
        se = torch.randint(-1, e, (n, k), generator=g)
    if tied:
        w = torch.randint(1, 3, (n, k), generator=g).float() / 4
    else:
        w = torch.rand(n, k, generator=g) + 0.05
    return se, w
