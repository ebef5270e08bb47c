"""Where the time of one AllToAllTokenDispatcher dispatch/combine goes, stage by stage (host
wall clock with a device sync after each stage), plus torch.profiler's top ops on rank 0.

    torchrun --standalone --nproc-per-node 2 benchmarks/profile_dispatch.py [--tokens 128] [--permute triton]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from moe_dispatch import AllToAllTokenDispatcher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--permute", default="triton")
    args = ap.parse_args()
    for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ.setdefault(k, v)
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=dev)
    P, E, K, T, H = dist.get_world_size(), 8, 2, args.tokens, args.hidden
    d = AllToAllTokenDispatcher(E, E // P, H, P, permute_backend=args.permute)
    d.set_ep_group(dist.group.WORLD)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    se = torch.rand(T, E, device=dev).topk(K, -1).indices
    w = torch.rand(T, K, device=dev)

    def sync():
        torch.cuda.synchronize()

    stages = {}

    def timed(name, fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        stages.setdefault(name, []).append((time.perf_counter() - t0) * 1e6)
        return out

    buf = torch.empty(T * K, H, device=dev, dtype=torch.bfloat16)
    out_buf = torch.empty_like(buf)
    for i in range(30):
        dist.barrier()
        timed("barrier (not part of dispatch)", lambda: dist.barrier())
        o = timed("dispatch total", lambda: d.dispatch(x, se, w))
        timed("combine total", lambda: d.combine(o.expert_input, o.handle))
        timed("  counts exchange (all_gather + .cpu())", lambda: d._exchange_counts(x, se))
        timed("  nccl all_to_all_single alone", lambda: dist.all_to_all_single(out_buf, buf))
    if rank == 0:
        for name, v in stages.items():
            print(f"{name:<45} median {statistics.median(v[5:]):9.1f} us")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                o = d.dispatch(x, se, w)
                d.combine(o.expert_input, o.handle)
            sync()
    else:
        for _ in range(5):
            o = d.dispatch(x, se, w)
            d.combine(o.expert_input, o.handle)
        sync()
    if rank == 0:
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=50))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
