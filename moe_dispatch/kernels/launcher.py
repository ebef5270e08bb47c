"""A cached low-level launch path for ``@triton.jit`` kernels: the host cost of a launch without
Triton's per-call argument binding, specialization and cache-key hashing.

Imports torch and triton only (nothing else of ours).

``launch(kernel, grid, args, constexprs, num_warps)`` runs ``kernel[grid](*args, **constexprs,
num_warps=num_warps)``. The first call with a given *launch key* goes through that ordinary
path and keeps the ``CompiledKernel`` it returns; later calls with the same key call the
compiled kernel's launcher directly (``CompiledKernel.run``, the call ``JITFunction.run`` itself
makes, identical in Triton 3.6 and 3.9: ``run(gx, gy, gz, stream, function, packed_metadata,
launch_metadata, enter_hook, exit_hook, *all_args)``), with tensors passed as their addresses
(an int pointer argument skips the launcher's per-pointer driver query).

The launch key is a *superset* of what Triton specializes a kernel on, so a cached kernel is
only reused where Triton would have picked the same binary: the device, the constexprs and
num_warps, and per runtime argument its type class -- tensors: dtype and whether the address is
16-byte aligned; ints: whether it is 1, divisible by 16, and fits in int32 / int64; bools,
floats and None as such. Anything else (an unknown argument type, a Triton whose
``CompiledKernel`` lacks ``run`` / ``function`` / ``packed_metadata``, registered launch hooks, a
tensor on another device than the current one, the interpreter) takes the ordinary path, every
time. ``MOE_DISPATCH_TRITON_FASTLAUNCH=0`` turns the cache off.
"""
from __future__ import annotations

import os

import torch

from .._optional import triton_interpreting

__all__ = ["launch", "fast_launch_enabled", "launch_key"]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MAX = 2**63 - 1


def fast_launch_enabled() -> bool:
    """False under ``TRITON_INTERPRET=1`` or ``MOE_DISPATCH_TRITON_FASTLAUNCH=0``."""
    return not triton_interpreting() and os.environ.get("MOE_DISPATCH_TRITON_FASTLAUNCH", "1") != "0"


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None or isinstance(a, float):
        return type(a)
    if isinstance(a, int):
        if _INT32_MIN <= a <= _INT32_MAX:
            return (a == 1, a % 16 == 0, 32)
        return (a == 1, a % 16 == 0, 64 if a <= _INT64_MAX else 65)
    raise TypeError(type(a).__name__)  # unknown: not cacheable


def launch_key(device_index: int, args: tuple, constexprs: dict, num_warps: int) -> tuple | None:
    """The cache key of a launch, or None when some argument cannot be keyed (ordinary path)."""
    try:
        arg_keys = tuple(_arg_key(a) for a in args)
    except TypeError:
        return None
    return (device_index, num_warps, tuple(constexprs.items()), arg_keys)


def _hooks_empty(hook) -> bool:
    """Launch hooks (profilers) need the ordinary path: it builds their launch metadata."""
    return hook is None or (hasattr(hook, "calls") and not hook.calls)


class _Entry:
    __slots__ = ("run", "function", "metadata", "constexpr_values")

    def __init__(self, compiled, constexpr_values):
        self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata
        self.constexpr_values = constexpr_values


def _make_entry(kernel, compiled, constexprs: dict):
    """An entry for ``compiled``, or None when this Triton does not look like the API we know."""
    names = getattr(kernel, "arg_names", None)
    if compiled is None or names is None or not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        return None
    n_args = len(names) - len(constexprs)
    if list(names[n_args:]) != list(constexprs):  # constexprs must be the trailing parameters, in order
        return None
    try:
        return _Entry(compiled, tuple(constexprs.values()))
    except Exception:  # noqa: BLE001 - e.g. handles that fail to load: stay on the ordinary path
        return None


_NO_FAST = object()  # cache value: this key always takes the ordinary path
_knobs = None


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, num_warps: int) -> None:
    """``kernel[grid](*args, **constexprs, num_warps=num_warps)``, through the cache when it can.

    Args:
        kernel: a ``triton.jit`` function whose trailing parameters are the ``constexprs``, in
            declaration order (the cache checks this and otherwise always takes the ordinary path).
        grid: up to 3 ints.
        args: the runtime arguments, positional, in declaration order (tensors on one CUDA device).
        constexprs: the constexpr arguments by name.
        num_warps: as for Triton.
    """
    if not fast_launch_enabled():
        kernel[grid](*args, **constexprs, num_warps=num_warps)
        return
    cache = kernel.__dict__.setdefault("_moe_fast_cache", {})
    device = _device_of(args)
    key = None if device is None else launch_key(device, args, constexprs, num_warps)
    entry = _NO_FAST if key is None else cache.get(key)
    if entry is None or entry is _NO_FAST or not _hooks_ok():
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps)
        if entry is None:
            cache[key] = _make_entry(kernel, compiled, constexprs) or _NO_FAST
        return
    g = tuple(grid) + (1, 1)
    # Tensors as their addresses: Triton's C launcher then skips its per-pointer
    # cuPointerGetAttribute check (a driver call per tensor argument); _device_of checked them.
    entry.run(g[0], g[1], g[2], _raw_stream(device), entry.function, entry.metadata, None, None, None,
              *[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args], *entry.constexpr_values)


def _raw_stream(device: int) -> int:
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's own driver calls
    return get(device) if get is not None else torch.cuda.current_stream(device).cuda_stream


def _device_of(args: tuple) -> int | None:
    """Index of the CUDA device of the tensor arguments when it is the current device, else None."""
    current = torch.cuda.current_device()
    for a in args:
        if isinstance(a, torch.Tensor) and (a.device.type != "cuda" or a.device.index != current):
            return None
    return current


def _hooks_ok() -> bool:
    global _knobs
    if _knobs is None:
        try:
            from triton import knobs as _knobs
        except ImportError:  # pragma: no cover - a Triton without knobs: we do not know its launcher
            return False
    rt = _knobs.runtime
    return _hooks_empty(getattr(rt, "launch_enter_hook", None)) and _hooks_empty(getattr(rt, "launch_exit_hook", None))
