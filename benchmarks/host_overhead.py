"""Host (CPU) microseconds per call of the hot ops, on one GPU: what eager timings pay on top of
the kernels. Calls are issued back to back with no synchronisation; the GPU work is tiny, so
the wall time per call is the Python + launch cost.

    python benchmarks/host_overhead.py
"""
from __future__ import annotations

import time

import torch


def per_call_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main() -> None:
    if not torch.cuda.is_available():
        print("host_overhead.py needs CUDA; nothing to do on this machine")
        return
    from moe_dispatch.permute import backend_module, resolve_backend

    dev = torch.device("cuda")
    x = torch.randn(128, 4096, device=dev, dtype=torch.bfloat16)
    se = torch.rand(128, 8, device=dev).topk(2, -1).indices
    w = torch.rand(128, 2, device=dev)
    rows = {}
    for name in ("torch", "triton", "te"):
        try:
            resolve_backend(name, dev)
        except Exception as exc:  # noqa: BLE001
            print(f"skip {name}: {exc}")
            continue
        mod = backend_module(name)
        p, _, m = mod.permute(x, se, 8, None, 1, 256)
        rows[f"permute[{name}]"] = per_call_us(lambda: mod.permute(x, se, 8, None, 1, 256))
        rows[f"unpermute[{name}]"] = per_call_us(lambda: mod.unpermute(p, m, w))
    rows["torch.add (one launch)"] = per_call_us(lambda: x.add(1))
    for k, v in rows.items():
        print(f"{k:<26} {v:8.1f} us/call (host)")


if __name__ == "__main__":
    main()
