"""The benchmark behind ``python -m moe_dispatch.bench``: every dispatcher side by side against the hardware limit.

Launches ``--nproc`` processes (NCCL, one GPU each, when CUDA is present; gloo on CPU), times
dispatch and combine (identity experts between them) for each backend and size, and prints one
table: microseconds each way, the bytes that must cross ranks per second, and that rate as a
percentage of the limit measured in the same run (GPU: the P2P copy bandwidth between two GPUs;
CPU: this machine's memory copy bandwidth, for reference only).

Dispatchers without host syncs (``all_to_all+capacity``, any in capacity mode, and at
``--nproc 1`` the dropless all-to-all, which then has no group and syncs nothing) are also timed
replayed from a CUDA graph (dispatch + combine in one graph): the ``us graph`` column, beside the
eager ``us d+c`` (at ``--nproc 1`` the all-to-all runs at EP=1 without a group: dropless, that is
the permute + unpermute alone).

"Remote bytes" counts each token once per *other* rank that holds one of its experts: the least
any dispatcher must move (the lower bound of a dispatch is those bytes over the P2P bandwidth
measured in the same run), so the percentage is
``lower bound / measured time``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import textwrap
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .backends import BACKENDS, DEFAULT, why_skipped
from .limits import cpu_copy_gbps, hbm_copy_gbps, p2p_copy_gbps
from .plot import PLOT_INSTALL_HINT, matplotlib_available, plot

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def _check_writable(p: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            p.error(f"{flag} {path}: folder {folder} does not exist")


def parse_args(argv=None) -> argparse.Namespace:
    """The CLI arguments, all checked here: a bad one exits with a message naming it before any
    rank is spawned."""
    gpu = torch.cuda.is_available()
    positive, non_negative = _int_at_least(1), _int_at_least(0)
    p = argparse.ArgumentParser(prog="moe-dispatch-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=positive, default=min(2, torch.cuda.device_count()) if gpu else 2,
                   help="ranks (EP size); one GPU each on CUDA")
    p.add_argument("--tokens", type=non_negative, nargs="+", default=[128, 512, 4096, 16384] if gpu else [128, 1024],
                   help="tokens per rank")
    p.add_argument("--hidden", type=positive, nargs="+", default=[4096, 7168] if gpu else [1024])
    p.add_argument("--experts", type=positive, nargs="+", default=[8, 64] if gpu else [8],
                   help="global experts, divisible by --nproc; paired with --topk")
    p.add_argument("--topk", type=positive, nargs="+", default=[2, 8] if gpu else [2],
                   help="experts per token, at most its paired --experts")
    p.add_argument("--backends", nargs="+", default=DEFAULT,
                   help=f"any of {list(BACKENDS)} (default: all; those that cannot run here are listed with why)")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=["bfloat16", "float32"])
    p.add_argument("--iters", type=positive, default=20 if gpu else 5)
    p.add_argument("--warmup", type=non_negative, default=5 if gpu else 2)
    p.add_argument("--cpu", action="store_true", help="use gloo on CPU even when GPUs are present")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help=f"write a GB/s-vs-tokens plot (PNG) here; {PLOT_INSTALL_HINT}")
    args = p.parse_args(argv)
    if len(args.experts) != len(args.topk):
        p.error(f"--experts and --topk pair up: give as many of each (got {len(args.experts)} and {len(args.topk)})")
    for E, K in zip(args.experts, args.topk):
        if K > E:
            p.error(f"--topk {K} is larger than its paired --experts {E}: each token picks top-k distinct experts")
        if E % args.nproc:
            p.error(f"--experts {E} is not divisible by --nproc {args.nproc}: each rank holds experts / nproc experts")
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        p.error(f"unknown backends {unknown}; known: {list(BACKENDS)}")
    args.backends = list(dict.fromkeys(args.backends))
    args.use_cuda = gpu and not args.cpu
    if args.use_cuda and args.nproc > torch.cuda.device_count():
        p.error(f"--nproc {args.nproc} > {torch.cuda.device_count()} GPUs")
    _check_writable(p, "--out", args.out)
    _check_writable(p, "--plot", args.plot)
    if args.plot and not matplotlib_available():
        p.error(f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL_HINT}")
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


def bench_one(backend, E, K, H, T, args, rank, world, device, dtype):
    L = E // world
    dispatcher = backend.make(E, L, H, world, T)
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
    if args.use_cuda and _sync_free(dispatcher, world):
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


def _sync_free(dispatcher, world: int) -> bool:
    """Capturable in a CUDA graph: capacity mode, or the all-to-all on one rank (no group)."""
    from .. import AllToAllTokenDispatcher

    return getattr(dispatcher, "dropless", True) is False or (world == 1 and isinstance(dispatcher, AllToAllTokenDispatcher))


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
        for name in args.run_backends:
            for E, K in zip(args.experts, args.topk):
                for H in args.hidden:
                    for T in args.tokens:
                        if name in skipped:
                            continue
                        try:
                            ms_d, ms_c, remote_bytes, ms_graph = bench_one(BACKENDS[name], E, K, H, T, args, rank,
                                                                           world, device, dtype)
                        except (ImportError, ValueError, RuntimeError) as exc:  # backend not usable here
                            skipped[name] = f"It failed at E={E}, top-{K}, H={H}, {T} tokens: {type(exc).__name__}: {exc}"
                            continue
                        rows.append(dict(backend=name, tokens=T, hidden=H, experts=E, topk=K, nproc=world,
                                         us_dispatch=ms_d * 1e3, us_combine=ms_c * 1e3, remote_bytes=remote_bytes,
                                         us_graph=None if ms_graph != ms_graph else ms_graph * 1e3))
        if rank == 0:
            queue.put(("ok", dict(limit_name=limit_name, limit_gbps=limit, rows=rows, skipped=skipped,
                                  device=torch.cuda.get_device_name(0) if args.use_cuda else "cpu",
                                  nproc=world, comm=backend, torch=torch.__version__, dtype=args.dtype)))
    except BaseException as exc:  # noqa: BLE001 - surface every failure to the parent
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def add_rates(result: dict) -> None:
    """Add ``gbps_dispatch`` / ``gbps_combine`` (remote bytes per second) to every row."""
    for r in result["rows"]:
        r["gbps_dispatch"] = r["remote_bytes"] / r["us_dispatch"] / 1e3 if r["us_dispatch"] else 0.0
        r["gbps_combine"] = r["remote_bytes"] / r["us_combine"] / 1e3 if r["us_combine"] else 0.0


def format_header(result: dict) -> str:
    on_cpu = result["device"] == "cpu"
    where = f"CPU ({os.cpu_count()} cores)" if on_cpu else result["device"]
    lines = [f"# moe_dispatch bench: {result['nproc']} ranks on {where} over {result['comm']}, {result['dtype']}, "
             f"torch {result['torch']}",
             f"# limit = {result['limit_name']} {result['limit_gbps']:.0f} GB/s, measured in this run"]
    if on_cpu:
        lines += ["# (on CPU the limit is this machine's memory copy bandwidth, for reference only:",
                  "#  gloo moves tokens through local sockets, far below it)"]
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """The header, one line per measured row and, under them, every skipped backend with why.
    Call :func:`add_rates` first."""
    limit = result["limit_gbps"]
    lines = [format_header(result),
             f"{'backend':<20}{'E/K':>7} {'H':>6} {'tokens':>7} {'us disp':>10} {'us comb':>10} "
             f"{'GB/s disp':>9} {'GB/s comb':>9} {'% limit d/c':>15} {'us d+c':>9} {'us graph':>9}"]
    for r in result["rows"]:
        gd, gc = r["gbps_dispatch"], r["gbps_combine"]
        pct = f"{100 * gd / limit:.2g}/{100 * gc / limit:.2g}" if limit else "-"
        graph = "-" if r.get("us_graph") is None else f"{r['us_graph']:.1f}"
        lines.append(f"{r['backend']:<20}{r['experts']:>4}/{r['topk']:<2} {r['hidden']:>6} {r['tokens']:>7} "
                     f"{r['us_dispatch']:>10.1f} {r['us_combine']:>10.1f} {gd:>9.3g} {gc:>9.3g} {pct:>15} "
                     f"{r['us_dispatch'] + r['us_combine']:>9.1f} {graph:>9}")
    if not result["rows"]:
        lines.append("(no backend could run here)")
    for name, why in result["skipped"].items():
        lines.append(textwrap.fill(why, width=100, initial_indent=f"skipped {name}: ", subsequent_indent="    "))
    return "\n".join(lines)


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
    device = torch.device("cuda" if args.use_cuda else "cpu")
    skipped = why_skipped(args.backends, device)
    args.run_backends = [name for name in args.backends if name not in skipped]
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
    # the order asked for on the command line; runtime failures (rank 0's) after the upfront reasons
    payload["skipped"] = {name: skipped.get(name) or payload["skipped"][name]
                          for name in args.backends if name in skipped or name in payload["skipped"]}
    add_rates(payload)
    print(format_table(payload))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
    if args.plot:
        plot(payload, args.plot)
    return 0

