"""Benchmark permute / unpermute: torch reference vs the triton backend vs TransformerEngine.

GPU only (on a machine without CUDA it prints why and exits with status 0). One run gives every
number: the HBM copy roofline is measured in the same run, and each op's time is compared with

    bound(permute)   = (N*H read once + N*K*H written once) * bytes / copy bandwidth
    bound(unpermute) = (N*K*H read once + N*H written once) * bytes / copy bandwidth

where the copy bandwidth counts bytes read + written by a large bf16 ``dst.copy_(src)``.
Routing: top-K of E distinct experts per token, no dropped slot, ``num_out_rows = N*K`` (as TE's
``num_out_tokens``), so no backend syncs with the host. Three times per op, medians:

* ``us``: ``triton.testing.do_bench`` (L2 flushed before each call): one cold call;
* ``us_b2b``: eager calls issued back to back as a training step issues them (CUDA events around
  50 calls, nothing in between): host and GPU overlap, so this is GPU time when the host keeps
  up and host time when it does not;
* ``us_graph``: the same op replayed from a CUDA graph (``do_bench_cudagraph``, back to back, no
  CPU launch cost; n/a where capture fails, e.g. the torch reference, which syncs).

``eager/graph`` = ``us_graph / us_b2b``: the speed eager mode keeps of graph replay, both in the
same L2 state (1.0 = no host overhead left). The backends are called directly, below the public
``moe_dispatch.permute`` whose argument checks sync with the host.

Usage::

    python benchmarks/bench_permute.py [--json results.json] [--shapes 16384,4096,8,2 ...]

``--dry-run`` checks the script itself on CPU (Triton's interpreter, tiny shapes, wall-clock
timing, numbers meaningless): ``TRITON_INTERPRET=1 python benchmarks/bench_permute.py --dry-run``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

SHAPES = [(16384, 4096, 8, 2), (8192, 7168, 64, 8), (4096, 4096, 8, 2)]  # (T, H, E, K)


def _import_backends(device: torch.device):
    try:
        from moe_dispatch.permute import reference, triton as triton_backend
    except ImportError:  # run from a checkout that is not pip-installed
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from moe_dispatch.permute import reference, triton as triton_backend
    backends = {"torch": (reference.permute, reference.unpermute)}
    if triton_backend.is_available(device):
        backends["triton"] = (triton_backend.permute, triton_backend.unpermute)
    else:
        print(f"triton backend skipped: {triton_backend.why_unavailable(device)}")
    from moe_dispatch.permute import cuda as cuda_backend

    if cuda_backend.is_available(device):
        backends["cuda"] = (cuda_backend.permute, cuda_backend.unpermute)
    else:
        print(f"cuda backend skipped: {cuda_backend.why_unavailable(device)}")
    try:
        import transformer_engine.pytorch as te
    except ImportError as exc:
        print(f"TransformerEngine skipped: {exc}")
    else:
        def te_permute(tokens, selected_experts, num_experts, probs, align_size, num_out_rows):
            # the caller passes int32 ids (converted outside the timed region)
            permuted, te_map = te.moe_permute(tokens, selected_experts, num_out_rows, map_type="index")
            return permuted, None, te_map

        def te_unpermute(permuted, te_map, merging_probs):
            return te.moe_unpermute(permuted, te_map, merging_probs=merging_probs, map_type="index")

        backends["te"] = (te_permute, te_unpermute)
    return backends


def _time(fn, graph: bool, dry_run: bool = False) -> float:
    """Median µs of ``fn()``; eager ``do_bench`` or replayed from a CUDA graph."""
    if dry_run:
        import time

        start = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - start)
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        try:
            return 1e3 * do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception:  # noqa: BLE001 - capture fails for ops that sync (torch reference)
            torch.cuda.synchronize()
            return float("nan")
    return 1e3 * do_bench(fn, warmup=25, rep=200, return_mode="median")


def _back_to_back_us(fn, calls: int = 50, rounds: int = 7) -> float:
    """Median over ``rounds`` of the µs per call of ``calls`` eager calls issued back to back."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def _copy_bandwidth(device: torch.device, dry_run: bool) -> float:
    """GB/s (read + write) of a 2 GiB bf16 device-to-device copy."""
    numel = 2**20 if dry_run else 2**30
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    us = _time(lambda: dst.copy_(src), graph=False, dry_run=dry_run)
    del src, dst
    return 2 * 2 * numel / (us * 1e-6) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--shapes", nargs="*", help="T,H,E,K ... (default: the three anchor shapes)")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--dry-run", action="store_true", help="check the script on CPU (TRITON_INTERPRET=1); no real timing")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, default_shapes, args.no_graph = torch.device("cpu"), [(8, 32, 4, 2)], True
    elif torch.cuda.is_available():
        device, default_shapes = torch.device("cuda"), SHAPES
    else:
        print("bench_permute: needs a CUDA GPU (none here); nothing measured.")
        return 0

    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else default_shapes
    backends = _import_backends(device)
    copy_gbps = _copy_bandwidth(device, args.dry_run)
    device_name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    print(f"device: {device_name}  torch {torch.__version__}  HBM copy {copy_gbps:.0f} GB/s (read + write)")
    header = (f"{'shape (T,H,E,K)':>22} {'op':>10} {'backend':>8} {'us':>9} {'us_b2b':>8} {'us_graph':>9} {'eager/graph':>11} "
              f"{'GB/s':>7} {'%roof':>6} {'%roof_g':>7} {'bound_us':>8} {'==torch':>7}")
    print(header)
    print("-" * len(header))
    results = []
    for num_tokens, hidden, num_experts, topk in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        dtype = torch.float16 if args.dry_run else torch.bfloat16  # numpy (the interpreter) has no bf16
        x = torch.randn(num_tokens, hidden, device=device, generator=g).to(dtype)
        scores = torch.rand(num_tokens, num_experts, device=device, generator=g)
        selected = scores.topk(topk, dim=-1).indices
        probs = torch.softmax(scores.gather(1, selected), dim=-1)  # fp32 [T, K]
        rows = num_tokens * topk
        elem = x.element_size()
        bytes_moved = {"permute": (num_tokens + rows) * hidden * elem, "unpermute": (rows + num_tokens) * hidden * elem}
        ref_permuted, _, ref_map = backends["torch"][0](x, selected, num_experts, None, 1, rows)
        ref_out = backends["torch"][1](ref_permuted, ref_map, probs)
        for name, (permute_fn, unpermute_fn) in backends.items():
            sel = selected.to(torch.int32) if name == "te" else selected  # TE takes int32 ids
            permuted, _, row_map = permute_fn(x, sel, num_experts, None, 1, rows)
            out = unpermute_fn(permuted, row_map, probs)
            matches = {
                "permute": bool(torch.equal(permuted, ref_permuted)),
                "unpermute": bool(torch.allclose(out.float(), ref_out.float(), rtol=1.6e-2, atol=1e-2)),
            }
            fns = {
                "permute": lambda: permute_fn(x, sel, num_experts, None, 1, rows),
                "unpermute": lambda: unpermute_fn(permuted, row_map, probs),
            }
            for op, fn in fns.items():
                us = _time(fn, graph=False, dry_run=args.dry_run)
                us_graph = float("nan") if args.no_graph else _time(fn, graph=True)
                us_b2b = us if args.dry_run else _back_to_back_us(fn)
                bound_us = bytes_moved[op] / (copy_gbps * 1e9) * 1e6
                row = dict(
                    T=num_tokens, H=hidden, E=num_experts, K=topk, op=op, backend=name, us=us, us_b2b=us_b2b, us_graph=us_graph,
                    eager_over_graph=us_graph / us_b2b,
                    GBps=bytes_moved[op] / (us * 1e-6) / 1e9, pct_roofline=100 * bound_us / us,
                    pct_roofline_graph=100 * bound_us / us_graph, bound_us=bound_us, matches_torch=matches[op],
                )
                results.append(row)
                print(f"{str((num_tokens, hidden, num_experts, topk)):>22} {op:>10} {name:>8} {us:9.1f} {us_b2b:8.1f} {us_graph:9.1f} "
                      f"{row['eager_over_graph']:10.2f}x "
                      f"{row['GBps']:7.0f} {row['pct_roofline']:5.0f}% {row['pct_roofline_graph']:6.0f}% {bound_us:8.1f} "
                      f"{str(matches[op]):>7}")
        del x, ref_permuted, permuted
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name, torch=torch.__version__, copy_GBps=copy_gbps, results=results), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
