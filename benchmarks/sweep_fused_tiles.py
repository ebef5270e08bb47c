"""Autotune sweep of the fused expert kernels: the time of every candidate tile config of every
kernel, at given expert shapes (one fwd+bwd of the rows path and of the gather+scatter path each).

Prints one table per shape: kernel kind, its key (N/K sizes and flags), the rows-per-expert
bucket, each candidate's median ms and TFLOP/s, the chosen one marked ``*``; then the fused
fwd / fwd+bwd times. JSON of the whole tuning log with ``--json``.

Usage::

    python benchmarks/sweep_fused_tiles.py [--shapes mixtral:4096,qwen3moe:512] [--json sweep.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

SHAPES = {  # name: (hidden, ffn, experts, top-k)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3moe": (2048, 768, 128, 8),
    "deepseek": (7168, 2048, 256, 8),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="mixtral:4096,mixtral:512,qwen3moe:512",
                        help="comma list of name:tokens (names: " + ", ".join(SHAPES) + ")")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_fused_tiles: needs a CUDA GPU (none found); nothing to measure.")
        return 0
    from moe_dispatch.bench.limits import time_cuda
    from moe_dispatch.experts_fused import fused_moe_experts, fused_swiglu_experts, routing_rows
    from moe_dispatch.kernels import grouped_gemm

    all_logs = []
    for item in args.shapes.split(","):
        name, tokens = item.split(":")
        H, I, E, K = SHAPES[name]
        T = int(tokens)
        torch.manual_seed(0)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        wgu = (torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
        wd = (torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
        scores, selected = torch.rand(T, E, device="cuda").topk(K, dim=-1)
        weights = (scores / scores.sum(-1, keepdim=True)).requires_grad_()
        counts, row_token, _ = routing_rows(selected, weights, E)
        rows = x[row_token.long()].contiguous().requires_grad_()
        start = len(grouped_gemm.tuning_log())

        def reset_grads():
            for t in (wgu, wd, rows, x, weights):
                t.grad = None

        def rows_step():
            reset_grads()
            fused_swiglu_experts(rows, counts, wgu, wd).backward(torch.ones_like(rows))

        def tokens_step():
            reset_grads()
            fused_moe_experts(x.requires_grad_(), selected, weights, wgu, wd, check_ids=False).backward(torch.ones_like(x))

        rows_step()
        tokens_step()
        with torch.no_grad():  # the forward-only variants (no g | u saved) are tuned separately
            fused_swiglu_experts(rows, counts, wgu, wd)
            fused_moe_experts(x, selected, weights, wgu, wd, check_ids=False)
        torch.cuda.synchronize()
        log = grouped_gemm.tuning_log()[start:]
        print(f"\n== {name} T={T} (H {H}, I {I}, {E} experts, top-{K}; {T * K // E} rows/expert on average)")
        print(f"{'kernel':<8}{'key':<52}{'bucket':>7}  {'config':<26}{'ms':>9}{'TFLOP/s':>9}")
        for entry in log:
            if "skipped" in entry:
                print(f"{entry['kind']:<8}{str(entry['key']):<52}{entry['bucket']:>7}  {entry['skipped']} failed: "
                      f"{entry['error']}")
                continue
            for cfg, ms in sorted(entry["ms"].items(), key=lambda kv: kv[1]):
                mark = "*" if cfg == entry["best"] else " "
                tf = entry["flops"] / (ms * 1e-3) / 1e12
                print(f"{entry['kind']:<8}{str(entry['key']):<52}{entry['bucket']:>7} {mark}{cfg:<26}{ms:>9.3f}{tf:>9.0f}")
        with torch.no_grad():
            fwd_rows = time_cuda(lambda: fused_swiglu_experts(rows, counts, wgu, wd))
            fwd_tok = time_cuda(lambda: fused_moe_experts(x, selected, weights, wgu, wd, check_ids=False))
        flops = 3 * 2 * T * K * H * I
        fb_rows, fb_tok = time_cuda(rows_step), time_cuda(tokens_step)
        for label, f, fb in (("rows", fwd_rows, fb_rows), ("tokens g+s", fwd_tok, fb_tok)):
            print(f"fused {label:<11} fwd {f:8.3f} ms ({flops / f / 1e9:5.0f} TFLOP/s)   fwd+bwd {fb:8.3f} ms "
                  f"({3 * flops / fb / 1e9:5.0f} TFLOP/s)")
        all_logs.append({"shape": name, "tokens": T, "log": log, "fwd_rows_ms": fwd_rows, "fwd_bwd_rows_ms": fb_rows,
                         "fwd_tokens_ms": fwd_tok, "fwd_bwd_tokens_ms": fb_tok})
        del x, wgu, wd, rows
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_logs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
