"""torchrun script: AllToAllTokenDispatcher on NCCL equals the dense reference, every standard
case, fp32 and bf16, for each permute backend available on CUDA.

    torchrun --nproc-per-node 2 tests/distributed/all_to_all_equivalence.py

Prints one PASS/FAIL line per case on rank 0 and exits non-zero on any failure.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from moe_dispatch import AllToAllTokenDispatcher  # noqa: E402
from moe_dispatch.permute import resolve_backend  # noqa: E402
from tests.distributed.ep_cases import Case, run_case, standard_cases  # noqa: E402


def main() -> int:
    for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ.setdefault(k, v)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    device = torch.device("cuda", torch.cuda.current_device())
    failures = 0
    for backend in ("torch", "triton", "te"):
        try:
            resolve_backend(backend, device)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot load here is skipped, loudly
            if rank == 0:
                print(f"SKIP permute_backend={backend}: {exc}", flush=True)
            continue
        make = lambda E, L, H, P, b=backend: AllToAllTokenDispatcher(E, L, H, P, permute_backend=b)  # noqa: E731
        cases = [(c, torch.float32) for c in standard_cases(world, seed=7)]
        cases += [(c, torch.bfloat16) for c in standard_cases(world, seed=8)]
        cases += [(Case(8 * world, 512, 2, [4096] * world, "random", 99), torch.bfloat16),
                  (Case(32 * world, 256, 8, [1000 + 37 * r for r in range(world)], "uneven", 98), torch.bfloat16)]
        for case, dtype in cases:
            try:
                run_case(rank, world, make, case, dist.group.WORLD, device, dtype)
                ok = torch.ones(1, device=device)
            except AssertionError as exc:
                print(f"rank {rank}: {exc}", flush=True)
                ok = torch.zeros(1, device=device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            failures += int(ok.item() == 0)
            if rank == 0:
                print(f"{'PASS' if ok.item() else 'FAIL'} nccl ep={world} permute={backend} {dtype} "
                      f"E={case.num_experts} K={case.topk} H={case.hidden} tokens={case.tokens_per_rank} {case.routing}",
                      flush=True)
    if rank == 0:
        print(f"all_to_all_equivalence: {'FAIL' if failures else 'PASS'} ({failures} failing cases)", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
