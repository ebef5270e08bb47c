"""Benchmark NVLinkTokenDispatcher against the NVLink lower bound and AllToAllTokenDispatcher (NCCL).

Run on one node with 2+ GPUs::

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_nvlink.py [--json out.json] [--sweep]

In one run, on the same GPUs:

* P2P bandwidth: a 512 MiB copy into a peer's (symmetric-memory) buffer, ``dst_on_peer.copy_(src)``,
  one direction (rank 0 -> 1 while the others idle) and all ranks at once (rank r -> r + 1).
* For T in (128, 512, 4096, 16384) tokens per rank and the shapes (H=4096, top-2 of 8 experts)
  and (H=7168, top-8 of 64), bf16, random top-k routing: dispatch and combine of
  NVLinkTokenDispatcher (dropless, and capacity mode with capacity T), and of
  AllToAllTokenDispatcher; identity experts (combine gets ``expert_input``). CUDA events, 5
  warm-ups, median of 20; every iteration starts from a tiny all-reduce so ranks start together;
  a time is the slowest rank's median.
* Capacity mode captured in CUDA graphs (one for dispatch, one for combine) at every T: kernel time.

Lower bound: bytes that must cross NVLink, i.e. each token once per
remote rank that holds one of its experts, ``* H * 2`` bytes, over the measured one-direction
P2P bandwidth, for the rank that sends the most. Combine moves the same bytes back.
"GB/s" = that rank's remote bytes / time. Rank 0 prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SHAPES = ((4096, 2, 8), (7168, 8, 64))   # (H, top-k, E)
TOKENS = (128, 512, 4096, 16384)
WARMUP, ITERS = 5, 20


def p2p_bandwidth(rank: int, world: int, group, device) -> dict[str, float]:
    import torch.distributed._symmetric_memory as symm_mem

    nbytes = 512 << 20
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    hdl = symm_mem.rendezvous(buf, group)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    peer = (rank + 1) % world
    dst = hdl.get_buffer(peer, (nbytes,), torch.uint8, 0)

    def timed(active: bool) -> float:
        times = []
        for i in range(WARMUP + 10):
            hdl.barrier(channel=0)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if active:
                dst.copy_(src)
            end.record()
            hdl.barrier(channel=0)
            torch.cuda.synchronize()
            if i >= WARMUP:
                times.append(start.elapsed_time(end) / 1e3)
        return nbytes / statistics.median(times) / 1e9 if active else 0.0

    one = timed(rank == 0)
    both = timed(True)
    vals = torch.tensor([one, both], device=device)
    gathered = [torch.zeros_like(vals) for _ in range(world)]
    dist.all_gather(gathered, vals, group=group)
    del dst, buf, hdl
    return {"one_direction": float(gathered[0][0]), "all_at_once_min": float(min(g[1] for g in gathered))}


def routing(T: int, H: int, K: int, E: int, rank: int, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=g)
    scores = torch.rand(T, E, device=device, generator=g)
    top = scores.topk(K, dim=-1)
    w = torch.softmax(top.values, dim=-1)
    return x, top.indices, w


def remote_bytes(se: torch.Tensor, E: int, P: int, rank: int, H: int) -> int:
    """Bytes this rank must send over NVLink: each token once per remote rank holding one of its experts."""
    L = E // P
    dest = torch.where(se >= 0, se // L, -1)
    total = 0
    for r in range(P):
        if r != rank:
            total += int((dest == r).any(dim=1).sum())
    return total * H * 2


def sync_start(flag: torch.Tensor, group) -> None:
    dist.all_reduce(flag, group=group)  # a tiny collective: both GPUs leave it at about the same time


def time_pair(fn_dispatch, fn_combine, group, device) -> tuple[float, float]:
    """Median (us) of dispatch and combine on this rank."""
    flag = torch.zeros(1, device=device)
    td, tc = [], []
    for i in range(WARMUP + ITERS):
        sync_start(flag, group)
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        out = fn_dispatch()
        e1.record()
        fn_combine(out)
        e2.record()
        torch.cuda.synchronize()
        if i >= WARMUP:
            td.append(e0.elapsed_time(e1) * 1e3)
            tc.append(e1.elapsed_time(e2) * 1e3)
    return statistics.median(td), statistics.median(tc)


def time_graph(d, x, se, w, group, device) -> tuple[float, float]:
    """Capacity-mode dispatch and combine, each captured in a CUDA graph; median replay (us)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            o = d.dispatch(x, se, w)
            d.combine(o.expert_input, o.handle)
    torch.cuda.current_stream().wait_stream(side)
    gd, gc = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(gd):
        out = d.dispatch(x, se, w)
    with torch.cuda.graph(gc, pool=gd.pool()):
        d.combine(out.expert_input, out.handle)
    return time_pair(lambda: gd.replay(), lambda _: gc.replay(), group, device)


def gather_max(vals: list[float], group, device) -> list[float]:
    t = torch.tensor(vals, device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None, help="write the results here (rank 0)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--no-a2a", action="store_true", help="skip AllToAllTokenDispatcher")
    ap.add_argument("--sweep", action="store_true", help="also try a few launch configurations at T=4096")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10))
    rank, P = dist.get_rank(), dist.get_world_size()
    group, device = dist.group.WORLD, torch.device("cuda", local_rank)

    from moe_dispatch.dispatchers._symm_workspace import _use_cuda_backend
    from moe_dispatch.dispatchers.all_to_all import AllToAllTokenDispatcher
    from moe_dispatch.dispatchers.nvlink import NVLinkTokenDispatcher

    _use_cuda_backend(device)  # before the first symmetric allocation (the bandwidth probe's)
    bw = p2p_bandwidth(rank, P, group, device)
    if rank == 0:
        print(f"P2P copy 512 MiB: one direction {bw['one_direction']:.0f} GB/s; all ranks at once "
              f"{bw['all_at_once_min']:.0f} GB/s per direction (slowest rank); {P} ranks, "
              f"{torch.cuda.get_device_name(device)}", flush=True)
    link = bw["one_direction"] * 1e9
    rows = []
    for H, K, E in SHAPES:
        L = E // P
        nv = NVLinkTokenDispatcher(E, L, H, P)
        nv.set_ep_group(group)
        a2a = None
        if not args.no_a2a:
            a2a = AllToAllTokenDispatcher(E, L, H, ep_size=P)
            a2a.set_ep_group(group)
        for T in tokens:
            x, se, w = routing(T, H, K, E, rank, device)
            sent = remote_bytes(se, E, P, rank, H)
            row = {"T": T, "H": H, "topk": K, "E": E, "P": P}
            row["nvl_dispatch_us"], row["nvl_combine_us"] = time_pair(
                lambda: nv.dispatch(x, se, w), lambda o: nv.combine(o.expert_input, o.handle), group, device)
            cap = NVLinkTokenDispatcher(E, L, H, P, max_tokens_per_rank=T, dropless=False)
            cap.set_ep_group(group)
            row["nvl_cap_dispatch_us"], row["nvl_cap_combine_us"] = time_pair(
                lambda: cap.dispatch(x, se, w), lambda o: cap.combine(o.expert_input, o.handle), group, device)
            # Graph replay at every T: the GPU time of the kernels, without Python launch overhead.
            row["nvl_graph_dispatch_us"], row["nvl_graph_combine_us"] = time_graph(cap, x, se, w, group, device)
            cap.check_health()
            cap.close()
            if a2a is not None:
                row["a2a_dispatch_us"], row["a2a_combine_us"] = time_pair(
                    lambda: a2a.dispatch(x, se, w), lambda o: a2a.combine(o.expert_input, o.handle), group, device)
            if args.sweep and T == 4096:
                row["sweep"] = sweep(E, L, H, P, x, se, w, group, device)
            nv.check_health()
            keys = [k for k in row if k.endswith("_us")]
            worst = gather_max([row[k] for k in keys] + [float(sent)], group, device)
            for k, v in zip(keys, worst[:-1]):
                row[k] = v
            row["remote_bytes_max_rank"] = int(worst[-1])
            row["bound_us"] = worst[-1] / link * 1e6
            for mode in ("nvl", "nvl_cap", "nvl_graph"):
                for op in ("dispatch", "combine"):
                    t = row.get(f"{mode}_{op}_us")
                    if t is None:
                        continue
                    row[f"{mode}_{op}_ratio"] = t / row["bound_us"] if row["bound_us"] else float("nan")
                    row[f"{mode}_{op}_GBps"] = worst[-1] / (t * 1e-6) / 1e9 if t else 0.0
            rows.append(row)
            del x, se, w
            torch.cuda.empty_cache()
        nv.close()
    if rank == 0:
        print_table(rows, bw)
        if args.json:
            Path(args.json).write_text(json.dumps({"p2p": bw, "rows": rows}, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def sweep(E, L, H, P, x, se, w, group, device):
    from moe_dispatch.dispatchers.nvlink import NVLinkTokenDispatcher

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    configs = [
        {},
        {"block_h": 1024, "num_warps": 4},
        {"n_send": sms, "n_recv": sms, "block_h": 1024, "num_warps": 4},
        {"chunk_target": 128},
        {"chunk_target": 512},
        {"n_send": sms // 4, "n_recv": 3 * sms // 4},
        {"n_send": 3 * sms // 4, "n_recv": sms // 4},
    ]
    out = []
    for cfg in configs:
        d = NVLinkTokenDispatcher(E, L, H, P)
        d.set_ep_group(group)
        d.tuning_overrides = dict(cfg)
        td, tc = time_pair(lambda: d.dispatch(x, se, w), lambda o: d.combine(o.expert_input, o.handle), group, device)
        d.check_health()
        d.close()
        td, tc = gather_max([td, tc], group, device)
        out.append({"config": cfg, "dispatch_us": td, "combine_us": tc})
    return out


def print_table(rows, bw):
    cols = [  # (header, key, format)
        ("disp us", "nvl_dispatch_us", "{:8.1f}"), ("comb us", "nvl_combine_us", "{:8.1f}"),
        ("GB/s d", "nvl_dispatch_GBps", "{:7.0f}"), ("GB/s c", "nvl_combine_GBps", "{:7.0f}"),
        ("bound", "bound_us", "{:7.1f}"), ("x bnd d", "nvl_dispatch_ratio", "{:7.2f}"),
        ("x bnd c", "nvl_combine_ratio", "{:7.2f}"),
        ("cap d", "nvl_cap_dispatch_us", "{:7.1f}"), ("cap c", "nvl_cap_combine_us", "{:7.1f}"),
        ("x bnd", "nvl_cap_dispatch_ratio", "{:6.2f}"), ("x bnd", "nvl_cap_combine_ratio", "{:6.2f}"),
        ("graph d", "nvl_graph_dispatch_us", "{:7.1f}"), ("graph c", "nvl_graph_combine_us", "{:7.1f}"),
        ("x bnd", "nvl_graph_dispatch_ratio", "{:6.2f}"), ("x bnd", "nvl_graph_combine_ratio", "{:6.2f}"),
        ("a2a d", "a2a_dispatch_us", "{:7.1f}"), ("a2a c", "a2a_combine_us", "{:7.1f}"),
    ]
    print()
    print(f"{'T':>6} {'H':>5} {'topk/E':>7} " + " ".join(f"{h:>{len(fmt.format(0.0))}}" for h, _, fmt in cols))
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            v = r.get(key)
            cells.append(fmt.format(v) if v is not None else " " * len(fmt.format(0.0)))
        print(f"{r['T']:>6} {r['H']:>5} {str(r['topk']) + '/' + str(r['E']):>7} " + " ".join(cells))
        for sw in r.get("sweep", []):
            print(f"{'':>22}sweep {sw['config']}: dispatch {sw['dispatch_us']:.1f} us, combine {sw['combine_us']:.1f} us")
    print(f"\nbound = max over ranks of (tokens x remote ranks holding one of their experts) x H x 2 B / "
          f"{bw['one_direction']:.0f} GB/s (measured one-direction P2P); x bnd = time / bound. disp/comb: dropless "
          "(one host sync per dispatch); cap: capacity mode, eager (no host sync); graph: capacity mode replayed from "
          "CUDA graphs; a2a: AllToAllTokenDispatcher (NCCL). Times: the slowest rank's median, us.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
