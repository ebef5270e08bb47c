"""The benchmark behind ``python -m moe_dispatch.bench``: every dispatcher side by side against the hardware limit.

Launches ``--nproc`` processes (NCCL, one GPU each, when CUDA is present; gloo on CPU), times
dispatch and combine (identity experts between them) for each backend and size, and prints one
table: microseconds each way, the bytes that must cross ranks per second, and that rate as a
percentage of the limit measured in the same run (GPU: the P2P copy bandwidth between two GPUs;
CPU: this machine's memory copy bandwidth, for reference only).

Dispatchers without host syncs (``all_to_all+capacity``, and any in capacity mode) are also
timed replayed from a CUDA graph (dispatch + combine in one graph): the ``us graph`` column, beside
the eager ``us d+c`` (at ``--nproc 1`` this is the all-to-all at EP=1 on an NCCL world of one).

"Remote bytes" counts each token once per *other* rank that holds one of its experts: the least
any dispatcher must move (the lower bound in ../shared/ANCHORS.md), so the percentage is
``lower bound / measured time``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .backends import BACKENDS, DEFAULT_CPU, DEFAULT_GPU
from .limits import cpu_copy_gbps, hbm_copy_gbps, p2p_copy_gbps

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv=None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="moe-dispatch-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=min(2, torch.cuda.device_count()) if gpu else 2,
                   help="ranks (EP size); one GPU each on CUDA")
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 4096, 16384] if gpu else [128, 1024],
                   help="tokens per rank")
    p.add_argument("--hidden", type=int, nargs="+", default=[4096, 7168] if gpu else [1024])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64] if gpu else [8],
                   help="global experts; paired with --topk")
    p.add_argument("--topk", type=int, nargs="+", default=[2, 8] if gpu else [2])
    p.add_argument("--backends", nargs="+", default=DEFAULT_GPU if gpu else DEFAULT_CPU,
                   help=f"any of {list(BACKENDS)}")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=["bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=20 if gpu else 5)
    p.add_argument("--warmup", type=int, default=5 if gpu else 2)
    p.add_argument("--cpu", action="store_true", help="use gloo on CPU even when GPUs are present")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="write a GB/s-vs-tokens plot (PNG) here; needs matplotlib")
    args = p.parse_args(argv)
    if len(args.experts) != len(args.topk):
        p.error("--experts and --topk pair up: give as many of each")
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        p.error(f"unknown backends {unknown}; known: {list(BACKENDS)}")
    args.use_cuda = gpu and not args.cpu
    if args.use_cuda and args.nproc > torch.cuda.device_count():
        p.error(f"--nproc {args.nproc} > {torch.cuda.device_count()} GPUs")
    return args


def remote_rows(selected: torch.Tensor, rank: int, experts_per_rank: int, world: int) -> int:
    """(token, other rank) pairs where the token has >= 1 expert on that rank."""
    dest = selected.div(experts_per_rank, rounding_mode="floor")
    hit = torch.zeros(selected.shape[0], world, dtype=torch.bool, device=selected.device)
    hit.scatter_(1, dest, True)
    hit[:, rank] = False
    return int(hit.sum())


def _timer(use_cuda: bool):
    if use_cuda:
        class CudaTimer:
            def __enter__(self):
                self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self.start.record()
                return self

            def __exit__(self, *exc):
                self.end.record()

            def ms(self):
                self.end.synchronize()
                return self.start.elapsed_time(self.end)
        return CudaTimer()
    import time

    class CpuTimer:
        def __enter__(self):
            self.t0 = time.perf_counter()
            return self

        def __exit__(self, *exc):
            self.t1 = time.perf_counter()

        def ms(self):
            return (self.t1 - self.t0) * 1e3
    return CpuTimer()


def bench_one(make, E, K, H, T, args, rank, world, device, dtype):
    L = E // world
    dispatcher = make(E, L, H, world, T) if getattr(make, "needs_tokens", False) else make(E, L, H, world)
    dispatcher.set_ep_group(dist.group.WORLD if world > 1 else None)
    g = torch.Generator(device=device).manual_seed(1000 * rank + T)
    x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    selected = torch.rand(T, E, device=device, generator=g).topk(K, dim=-1).indices
    weights = torch.rand(T, K, device=device, generator=g)
    times_d, times_c = [], []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        with _timer(args.use_cuda) as td:
            out = dispatcher.dispatch(x, selected, weights)
        with _timer(args.use_cuda) as tc:
            y = dispatcher.combine(out.expert_input, out.handle)
        if i >= args.warmup:
            times_d.append(td.ms()), times_c.append(tc.ms())
    torch.testing.assert_close(y.float(), (x.float() * weights.sum(1, keepdim=True)), rtol=2e-2, atol=2e-2)
    ms_graph = float("nan")
    if args.use_cuda and getattr(dispatcher, "dropless", True) is False:
        ms_graph = graph_ms(dispatcher, x, selected, weights, args)
    close = getattr(dispatcher, "close", None)
    if close:
        close()
    stats = torch.tensor([statistics.median(times_d), statistics.median(times_c),
                          float(remote_rows(selected, rank, L, world)), ms_graph], dtype=torch.float64)
    stats = stats.to(device) if args.use_cuda else stats
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
    ms_d, ms_c, rows, ms_graph = stats.tolist()
    return ms_d, ms_c, rows * H * dtype.itemsize, ms_graph


def graph_ms(dispatcher, x, selected, weights, args) -> float:
    """Median ms of one replay of dispatch + combine captured in one CUDA graph (checked against
    the identity-expert result)."""
    def step():
        out = dispatcher.dispatch(x, selected, weights)
        return dispatcher.combine(out.expert_input, out.handle)

    from ..graph import capture

    graph, y = capture(step)
    times = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        with _timer(True) as t:
            graph.replay()
        if i >= args.warmup:
            times.append(t.ms())
    torch.testing.assert_close(y.float(), (x.float() * weights.sum(1, keepdim=True)), rtol=2e-2, atol=2e-2)
    return statistics.median(times)


def measure_limit(args, rank, world) -> tuple[str, float]:
    if args.use_cuda and world > 1:
        return "P2P copy", p2p_copy_gbps(0, 1) if rank == 0 else 0.0
    if args.use_cuda:
        return "HBM copy", hbm_copy_gbps(0) if rank == 0 else 0.0
    return "CPU memcpy", cpu_copy_gbps() if rank == 0 else 0.0


def run_rank(rank, world, port, args, queue):
    os.environ.update(SAFE_ENV)
    try:
        if args.use_cuda:
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        backend = "nccl" if args.use_cuda else "gloo"
        kw = {"device_id": torch.device("cuda", rank)} if args.use_cuda else {}
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **kw)
        device = torch.device("cuda", rank) if args.use_cuda else torch.device("cpu")
        dtype = getattr(torch, args.dtype)
        limit_name, limit = measure_limit(args, rank, world)
        rows, skipped = [], {}
        for name in args.backends:
            for E, K in zip(args.experts, args.topk):
                for H in args.hidden:
                    for T in args.tokens:
                        if name in skipped:
                            continue
                        try:
                            ms_d, ms_c, remote_bytes, ms_graph = bench_one(BACKENDS[name], E, K, H, T, args, rank, world,
                                                                           device, dtype)
                        except (ImportError, ValueError, RuntimeError) as exc:  # backend not usable here
                            skipped[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                            continue
                        rows.append(dict(backend=name, tokens=T, hidden=H, experts=E, topk=K, nproc=world,
                                         us_dispatch=ms_d * 1e3, us_combine=ms_c * 1e3, remote_bytes=remote_bytes,
                                         us_graph=None if ms_graph != ms_graph else ms_graph * 1e3))
        if rank == 0:
            queue.put(("ok", dict(limit_name=limit_name, limit_gbps=limit, rows=rows, skipped=skipped,
                                  device=torch.cuda.get_device_name(0) if args.use_cuda else "cpu",
                                  torch=torch.__version__, dtype=args.dtype)))
    except BaseException as exc:  # noqa: BLE001 - surface every failure to the parent
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def format_table(result: dict) -> str:
    limit = result["limit_gbps"]
    head = (f"# moe_dispatch bench on {result['device']} x{result['rows'][0]['nproc'] if result['rows'] else '?'}, "
            f"{result['dtype']}, torch {result['torch']}; limit = {result['limit_name']} {limit:.0f} GB/s "
            "(measured in this run)")
    lines = [head, f"{'backend':<20}{'E/K':>7}{'H':>6}{'tokens':>8}{'us disp':>10}{'us comb':>10}"
                   f"{'GB/s disp':>11}{'GB/s comb':>11}{'% limit d/c':>13}{'us d+c':>9}{'us graph':>10}"]
    for r in result["rows"]:
        gd = r["remote_bytes"] / r["us_dispatch"] / 1e3 if r["us_dispatch"] else 0.0
        gc = r["remote_bytes"] / r["us_combine"] / 1e3 if r["us_combine"] else 0.0
        r["gbps_dispatch"], r["gbps_combine"] = gd, gc
        pct = f"{100 * gd / limit:.0f}/{100 * gc / limit:.0f}" if limit else "-"
        graph = "-" if r.get("us_graph") is None else f"{r['us_graph']:.1f}"
        lines.append(f"{r['backend']:<20}{r['experts']:>4}/{r['topk']:<2}{r['hidden']:>6}{r['tokens']:>8}"
                     f"{r['us_dispatch']:>10.1f}{r['us_combine']:>10.1f}{gd:>11.1f}{gc:>11.1f}{pct:>13}"
                     f"{r['us_dispatch'] + r['us_combine']:>9.1f}{graph:>10}")
    for name, why in result["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib: pip install matplotlib ({exc})")
    shapes = sorted({(r["experts"], r["topk"], r["hidden"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(5 * max(1, len(shapes)), 4), squeeze=False)
    for ax, (E, K, H) in zip(axes[0], shapes):
        for name in dict.fromkeys(r["backend"] for r in result["rows"]):
            rs = [r for r in result["rows"] if (r["backend"], r["experts"], r["topk"], r["hidden"]) == (name, E, K, H)]
            ax.plot([r["tokens"] for r in rs], [r["gbps_dispatch"] for r in rs], marker="o", label=f"{name} dispatch")
            ax.plot([r["tokens"] for r in rs], [r["gbps_combine"] for r in rs], marker="x", ls="--", label=f"{name} combine")
        ax.axhline(result["limit_gbps"], color="k", lw=1, label=result["limit_name"])
        ax.set(xscale="log", xlabel="tokens per rank", ylabel="remote GB/s", title=f"H={H}, top-{K} of {E}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _wait_for_result(queue, procs) -> tuple[str, object]:
    """Rank 0's result, or the first error; never waits on a rank that died silently."""
    import queue as queue_mod

    try:
        while True:
            try:
                return queue.get(timeout=1.0)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs) and queue.empty():
                    return "error", f"all ranks exited without a result (exit codes {[p.exitcode for p in procs]})"
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():  # a peer of a failed rank can block in a collective forever
                p.kill()


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.update(SAFE_ENV)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=run_rank, args=(r, args.nproc, port, args, queue)) for r in range(args.nproc)]
    for p in procs:
        p.start()
    status, payload = _wait_for_result(queue, procs)
    if status != "ok":
        print(payload, file=sys.stderr)
        return 1
    print(format_table(payload))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
    if args.plot:
        plot(payload, args.plot)
    return 0

