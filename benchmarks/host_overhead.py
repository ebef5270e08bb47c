"""Host (CPU) microseconds per call of the hot ops, on one GPU: what eager timings pay on top of
the kernels. Calls are issued back to back with no synchronisation; the GPU work is tiny
(T=128 tokens), so the wall time per call is the Python + launch cost. Every row is also given
as a ratio to one ``torch.add`` launch measured in the same run (the launch floor).

    python benchmarks/host_overhead.py [--json out.json]
    python benchmarks/host_overhead.py --python-only     # any machine, no GPU needed

Rows: permute / unpermute of each permute backend (forward only, and with autograd inputs),
the triton and cuda (C++ extension, when built) backends, the triton backend with the launch cache off (``MOE_DISPATCH_TRITON_FASTLAUNCH=0``: Triton's own
``kernel[grid](...)`` path), the indices converter forward / backward, and
``AllToAllTokenDispatcher`` dispatch + combine at EP=1 (no process group), dropless and
capacity mode.

``--python-only`` (CPU, no GPU): the pure-Python part of the cached launch path and of the
Triton permute / unpermute launchers, with every kernel replaced by a stand-in whose compiled
launcher does nothing (``entry.run`` is a no-op) and CPU tensors standing in for CUDA ones: what
``launch()`` and the launchers cost around the C launcher, before any driver call. Tensor
allocation is the CPU allocator's here (the CUDA caching allocator costs a little more).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def per_call_us(fn, n: int = 300) -> float:
    """Median over 5 rounds of the mean host time per call of ``n`` back-to-back calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[len(rounds) // 2]


def _rows(dev) -> dict[str, float]:
    from moe_dispatch import AllToAllTokenDispatcher
    from moe_dispatch.permute import backend_module, resolve_backend

    T, H, E, K = 128, 4096, 8, 2
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    se = torch.rand(T, E, device=dev).topk(K, -1).indices
    w = torch.rand(T, K, device=dev)
    rows: dict[str, float] = {"torch.add (one launch)": per_call_us(lambda: x.add(1))}
    for name in ("torch", "triton", "cuda", "te"):
        try:
            resolve_backend(name, dev)
        except Exception as exc:  # noqa: BLE001
            print(f"skip {name}: {exc}")
            continue
        mod = backend_module(name)
        p, _, m = mod.permute(x, se, E, None, 1, T * K)
        rows[f"permute[{name}]"] = per_call_us(lambda: mod.permute(x, se, E, None, 1, T * K))
        rows[f"permute+probs[{name}]"] = per_call_us(lambda: mod.permute(x, se, E, w, 1, T * K))
        rows[f"unpermute[{name}]"] = per_call_us(lambda: mod.unpermute(p, m, w))
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        rows[f"permute (autograd)[{name}]"] = per_call_us(lambda: mod.permute(xg, se, E, None, 1, T * K))
        pg = p.clone().requires_grad_()
        rows[f"unpermute (autograd)[{name}]"] = per_call_us(lambda: mod.unpermute(pg, m, wg))
        if name == "triton":
            from moe_dispatch.kernels import launcher

            os.environ["MOE_DISPATCH_TRITON_FASTLAUNCH"] = "0"
            launcher.refresh_fast_launch()
            rows["permute[triton, no launch cache]"] = per_call_us(lambda: mod.permute(x, se, E, None, 1, T * K))
            rows["unpermute[triton, no launch cache]"] = per_call_us(lambda: mod.unpermute(p, m, w))
            del os.environ["MOE_DISPATCH_TRITON_FASTLAUNCH"]
            launcher.refresh_fast_launch()
            from moe_dispatch.kernels import indices_converter as ic

            local = torch.randint(-1, E, (T, K), device=dev)
            dense_grad = torch.randn(T, E, device=dev)
            rows["indices_to_multihot"] = per_call_us(lambda: ic.indices_to_multihot(local, w, E))
            rows["multihot_probs_backward"] = per_call_us(lambda: ic.multihot_probs_backward(dense_grad, local))
    for backend in ("torch", "triton", "cuda"):
        for mode, kw in (("dropless", {}), ("capacity", dict(max_tokens_per_rank=T, dropless=False))):
            try:
                d = AllToAllTokenDispatcher(E, E, H, permute_backend=backend, **kw)
                out = d.dispatch(x, se, w)
            except Exception as exc:  # noqa: BLE001
                print(f"skip all_to_all {backend} {mode}: {exc}")
                continue

            def step(d=d):
                o = d.dispatch(x, se, w)
                return d.combine(o.expert_input, o.handle)

            rows[f"all_to_all EP=1 {mode} dispatch+combine[{backend}]"] = per_call_us(step, n=100)
            del out
    return rows


# --- --python-only: the launch path's Python on CPU, kernels stubbed ---------------------------
class _StubCompiled:
    """Stands in for a ``CompiledKernel``: its launcher returns at once."""
    function, packed_metadata = 0, 0

    @staticmethod
    def run(*args):
        return None


class _StubKernel:
    """Stands in for a ``triton.jit`` function (its ``arg_names``; ``kernel[grid](...)`` returns
    the stub compiled kernel, so the first call fills the launch cache as on the GPU)."""

    def __init__(self, real):
        self.arg_names = list(real.arg_names)

    def __getitem__(self, grid):
        return lambda *args, **kw: _StubCompiled()


def _stub_launch_environment():
    """Make the launcher take its fast path on CPU tensors, kernels stubbed; returns a restore()."""
    from moe_dispatch.kernels import launcher
    from moe_dispatch.kernels import permute as kp

    saved = {}

    def patch(mod, name, value):
        saved[(mod, name)] = getattr(mod, name)
        setattr(mod, name, value)

    patch(launcher, "fast_launch_enabled", lambda: True)
    patch(launcher, "_raw_stream", lambda device: 0)
    patch(launcher, "_current_device", lambda: -1)  # CPU tensors pass the device check: get_device() == -1
    for name in ("_expert_count_scan_kernel", "_expert_hist_kernel", "_expert_scan_kernel", "_permute_kernel",
                 "_unpermute_kernel", "_unpermute_bwd_kernel"):
        patch(kp, name, _StubKernel(getattr(kp, name)))

    def restore():
        for (mod, name), value in saved.items():
            setattr(mod, name, value)
    return restore


def cpu_per_call_us(fn, n: int = 2000) -> float:
    """Median over 7 rounds of the mean time per call of ``n`` calls (CPU: no synchronisation)."""
    for _ in range(50):
        fn()
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(rounds)[len(rounds) // 2]


def _python_only_rows() -> dict[str, float]:
    from moe_dispatch.kernels import launcher
    from moe_dispatch.kernels import permute as kp

    restore = _stub_launch_environment()
    try:
        T, H, E, K = 128, 4096, 8, 2
        x = torch.randn(T, H)
        se = torch.rand(T, E).topk(K, -1).indices
        w = torch.rand(T, K)
        p, _, m = kp.permute(x, se, E, None, 1, T * K)
        rows: dict[str, float] = {}
        # launch() alone: a stand-in kernel with 8 tensor and 8 int arguments (the permute
        # kernel's list before it was shortened to 6 + 8) and one with 4 + 4 (unpermute's)
        ids = se.reshape(-1)
        work = torch.empty(64, dtype=torch.int32)

        class _Named:
            def __init__(self, n_args, constexprs):
                self.arg_names = [f"a{i}" for i in range(n_args)] + list(constexprs)
        ce16 = dict(HAS_PROBS=False, T=32, RB=64, BLOCK_K=2, BLOCK_H=1024, ZR=8)
        k16 = _StubKernel(_Named(16, ce16))
        args = (x, x.stride(0), ids, work, work, p, p, p.stride(0), p, m, K, E, H, T * K, 0, 1)
        rows["launch() fast path, 16 args (8 tensors)"] = cpu_per_call_us(
            lambda: launcher.launch(k16, (T + 1,), args, ce16, 4))
        ce8 = dict(HAS_PROBS=True, BLOCK_K=2, BLOCK_H=1024)
        k8 = _StubKernel(_Named(8, ce8))
        uargs = (p, p.stride(0), m, w, x, x.stride(0), K, H)
        rows["launch() fast path, 8 args (4 tensors)"] = cpu_per_call_us(lambda: launcher.launch(k8, (T,), uargs, ce8, 4))
        if hasattr(launcher, "launch_spec_key"):
            s16, s8 = launcher.launch_spec_key(ce16, 4), launcher.launch_spec_key(ce8, 4)
            rows["launch() fast path, 16 args, spec_key given"] = cpu_per_call_us(
                lambda: launcher.launch(k16, (T + 1,), args, ce16, 4, s16))
            rows["launch() fast path, 8 args, spec_key given"] = cpu_per_call_us(
                lambda: launcher.launch(k8, (T,), uargs, ce8, 4, s8))
        rows["kernels.permute.permute (count+scan, permute: 2 launches)"] = cpu_per_call_us(
            lambda: kp.permute(x, se, E, None, 1, T * K))
        rows["kernels.permute.unpermute (1 launch)"] = cpu_per_call_us(lambda: kp.unpermute(p, m, w))
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend on CPU (kernels stubbed)
        from moe_dispatch import AllToAllTokenDispatcher
        from moe_dispatch.permute import triton as tb

        rows["permute.triton.permute (backend module)"] = cpu_per_call_us(lambda: tb.permute(x, se, E, None, 1, T * K))
        rows["permute.triton.unpermute (backend module)"] = cpu_per_call_us(lambda: tb.unpermute(p, m, w))
        d = AllToAllTokenDispatcher(E, E, H, permute_backend="triton")

        def step():
            o = d.dispatch(x, se, w)
            return d.combine(o.expert_input, o.handle)
        rows["all_to_all EP=1 dropless dispatch+combine[triton] (CPU torch ops)"] = cpu_per_call_us(step, n=500)
    finally:
        restore()
    return rows


def python_only(args) -> int:
    rows = _python_only_rows()
    print(f"CPU, kernels stubbed (python-only); torch {torch.__version__}")
    print(f"{'op (T=128, H=4096, top-2 of 8)':<68} {'us/call':>8}")
    for k, v in rows.items():
        print(f"{k:<68} {v:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device="cpu (python-only)", torch=torch.__version__, rows=rows), f, indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--python-only", action="store_true",
                        help="CPU: time the Python around the Triton launches, kernels stubbed (no GPU needed)")
    args = parser.parse_args(argv)
    if args.python_only:
        return python_only(args)
    if not torch.cuda.is_available():
        print("host_overhead.py needs CUDA; nothing to do on this machine")
        return 0
    import triton

    dev = torch.device("cuda")
    rows = _rows(dev)
    floor = rows["torch.add (one launch)"]
    print(f"device: {torch.cuda.get_device_name(dev)}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"{'op (T=128, H=4096, top-2 of 8, bf16)':<52} {'host us/call':>12} {'x launch':>9}")
    for k, v in rows.items():
        print(f"{k:<52} {v:12.1f} {v / floor:9.1f}")
    print("launch cache (kernel: keys with a cached launch / keys on the ordinary path):", _cache_status())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


def _cache_status() -> str:
    from moe_dispatch.kernels import indices_converter, launcher, permute

    out = []
    for mod in (permute, indices_converter):
        for name in dir(mod):
            cache = getattr(getattr(mod, name), "__dict__", {}).get("_moe_fast_cache")
            if cache:
                fast = sum(v is not launcher._NO_FAST for v in cache.values())
                out.append(f"{name}: {fast}/{len(cache) - fast}")
    return ", ".join(out) or "empty"


if __name__ == "__main__":
    sys.exit(main())
