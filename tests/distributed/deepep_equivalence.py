"""FusedTokenRouter (real DeepEP) against AllToAllTokenDispatcher and the dense reference, on NCCL.

Run on one node with 2 (or 4, 8) GPUs and DeepEP installed (``bash install_hybridep.sh``)::

    torchrun --standalone --nproc-per-node 2 tests/distributed/deepep_equivalence.py

For every case (random routings, a rank with zero tokens, all tokens to one expert, -1 slots,
top-k = number of experts, no tokens at all, a larger shape, gpt-oss's hidden size 2880), in bf16,
``DEEPEP_EQUIVALENCE_REPEATS`` times (default 2; each repeat builds fresh DeepEP buffers):

* both dispatchers give bit-identical ``expert_input`` rows (the protocol's row order) and the
  same ``tokens_per_expert``;
* FusedTokenRouter's combine output and the gradients of hidden states, routing weights and
  expert weights match AllToAllTokenDispatcher's (relative error ``||a - b|| / ||b|| < 1e-2``);
* on the smaller cases, the same against the fp64 dense single-process reference
  (``ep_cases.run_case``).

Rank 0 prints one line ``DEEPEP EQUIVALENCE: PASS ...`` or ``DEEPEP EQUIVALENCE: FAIL ...``
(then the failures); every rank exits non-zero on failure.

Most hidden sizes here are not multiples of 256 on purpose: DeepEP v1.2.1's intranode combine
corrupts such rows silently and nondeterministically (see ``moe_dispatch.dispatchers.deepep``,
"Combine row width"), which FusedTokenRouter avoids by padding combine rows; the repeats give an
intermittent corruption more than one chance to show.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.distributed.ep_cases import (Case, apply_local_experts, init_torchrun_nccl, make_inputs,  # noqa: E402
                                        run_case)

TOL = 1e-2
REPEATS = int(os.environ.get("DEEPEP_EQUIVALENCE_REPEATS", "2"))


def cases(world_size: int) -> list[tuple[Case, bool]]:
    """(case, also check against the dense fp64 reference). Hidden sizes are multiples of 16
    (DeepEP's bf16 rows)."""
    P = world_size
    n = [301 + 97 * r for r in range(P)]
    zero_first = [0] + n[1:]
    return [
        (Case(4 * P, 128, 2, n, "random", 0), True),
        (Case(4 * P, 256, 2, n, "uneven", 1), True),
        (Case(4 * P, 128, 2, zero_first, "random", 2), True),       # a rank with zero tokens
        (Case(4 * P, 128, 2, n, "one_expert", 3), True),            # every token to one expert
        (Case(8 * P, 128, 4, n, "empty_experts", 4), True),
        (Case(4 * P, 64, 3, n, "with_drops", 5), True),             # -1 slots
        (Case(P, 64, P, n, "topk_all", 6), True),                   # top-k = num experts, L = 1
        (Case(2 * P, 64, 1, [0] * P, "random", 7), True),           # no tokens anywhere
        (Case(16 * P, 1024, 8, [1024 + 256 * r for r in range(P)], "random", 8), False),
        (Case(2 * P, 2880, 2, [512 + 128 * r for r in range(P)], "with_drops", 9), False),  # combine rows padded to 3072
    ]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0 or (a.norm() == 0 and b.norm() == 0):
        return 0.0
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run_dispatcher(make, case: Case, rank: int, world_size: int, group, device):
    xs, ses, ws, W = make_inputs(case, world_size, dtype=torch.float32)
    E, H = case.num_experts, case.hidden
    L = E // world_size
    d = make(E, L, H, world_size)
    d.set_ep_group(group)
    try:
        x = xs[rank].to(device, torch.bfloat16).requires_grad_()
        w = ws[rank].to(device).requires_grad_()
        se = ses[rank].to(device)
        W_local = W[rank * L:(rank + 1) * L].to(device, torch.bfloat16).requires_grad_()
        out = d.dispatch(x, se, w)
        counts = out.tokens_per_expert.tolist()
        y = d.combine(apply_local_experts(out.expert_input, out.tokens_per_expert, W_local), out.handle)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(case.seed + 77 + rank)).to(device)
        (y.float() * g).sum().backward()
        torch.cuda.synchronize()
        return {"rows": out.expert_input[:sum(counts)].detach().clone(), "counts": counts, "y": y.detach(),
                "dtype": y.dtype, "grad_x": x.grad, "grad_w": w.grad, "grad_W": W_local.grad}
    finally:
        if hasattr(d, "close"):
            d.close()


def compare_with_all_to_all(case: Case, rank: int, world_size: int, group, device) -> list[str]:
    from moe_dispatch.dispatchers.all_to_all import AllToAllTokenDispatcher
    from moe_dispatch.dispatchers.deepep import FusedTokenRouter

    fused = run_dispatcher(lambda E, L, H, P: FusedTokenRouter(E, L, H, P), case, rank, world_size, group, device)
    ref = run_dispatcher(lambda E, L, H, P: AllToAllTokenDispatcher(E, L, H, ep_size=P), case, rank, world_size, group, device)
    problems = []
    if fused["counts"] != ref["counts"]:
        problems.append(f"tokens_per_expert {fused['counts']} != all-to-all {ref['counts']}")
    elif not torch.equal(fused["rows"], ref["rows"]):
        problems.append("expert_input rows differ from all-to-all's (row order)")
    if fused["dtype"] != torch.bfloat16:
        problems.append(f"combine returned {fused['dtype']}, not bf16")
    for key in ("y", "grad_x", "grad_w", "grad_W"):
        if (fused[key] is None) != (ref[key] is None):
            problems.append(f"{key}: one dispatcher produced no gradient")
            continue
        if fused[key] is not None:
            err = rel_err(fused[key], ref[key])
            if not err < TOL:
                problems.append(f"{key}: relative error {err:.2e} vs all-to-all")
    return problems


def main() -> int:
    rank, world_size, group, device = init_torchrun_nccl()
    failures: list[str] = []
    checks = 0
    try:
        from moe_dispatch.dispatchers.deepep import FusedTokenRouter  # raises ImportError without deep_ep
    except ImportError as exc:
        failures.append(f"cannot construct FusedTokenRouter: {exc}")
    else:
        for repeat, (case, with_dense) in [(i, c) for i in range(REPEATS) for c in cases(world_size)]:
            label = f"{case.routing} E={case.num_experts} H={case.hidden} K={case.topk} N={case.tokens_per_rank} repeat {repeat}"
            try:
                for p in compare_with_all_to_all(case, rank, world_size, group, device):
                    failures.append(f"rank {rank} [{label}] {p}")
                checks += 1
                if with_dense:
                    made: list = []
                    try:
                        run_case(rank, world_size, lambda E, L, H, P: made.append(FusedTokenRouter(E, L, H, P)) or made[-1],
                                 case, group, device, torch.bfloat16)
                    finally:
                        for router in made:
                            router.close()
                    checks += 1
            except Exception as exc:  # noqa: BLE001 - report every case
                failures.append(f"rank {rank} [{label}] {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, (checks, failures))
    all_failures = [f for _, fs in gathered for f in fs]
    total = sum(c for c, _ in gathered)
    if rank == 0:
        if all_failures:
            print(f"DEEPEP EQUIVALENCE: FAIL ({len(all_failures)} failure(s), {world_size} ranks)", flush=True)
            for f in all_failures:
                print("  " + f, flush=True)
        else:
            print(f"DEEPEP EQUIVALENCE: PASS ({total} checks over {world_size} ranks: FusedTokenRouter == "
                  f"AllToAllTokenDispatcher and the dense reference, bf16, rel err < {TOL})", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if all_failures else 0


if __name__ == "__main__":
    sys.exit(main())
