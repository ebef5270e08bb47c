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
time. ``MOE_DISPATCH_TRITON_FASTLAUNCH=0`` turns the cache off; the environment is read once,
at import (:func:`refresh_fast_launch` reads it again).

The fast path is one pass over the arguments (each tensor's device, dtype and address read
once) and one dict lookup: a caller with a cached plan passes ``spec_key`` (from
:func:`launch_spec_key`, computed once per plan) instead of having the constexprs hashed on
every call.
"""
from __future__ import annotations

import os

import torch

from .._optional import triton_interpreting

__all__ = ["launch", "fast_launch_enabled", "refresh_fast_launch", "launch_key", "launch_spec_key"]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MAX = 2**63 - 1
_Tensor = torch.Tensor

_fast_enabled = False  # set by refresh_fast_launch(), below


def refresh_fast_launch() -> bool:
    """Read the environment again (``TRITON_INTERPRET``, ``MOE_DISPATCH_TRITON_FASTLAUNCH``) and
    return :func:`fast_launch_enabled`. ``launch`` reads the cached value, not the environment."""
    global _fast_enabled
    _fast_enabled = not triton_interpreting() and os.environ.get("MOE_DISPATCH_TRITON_FASTLAUNCH", "1") != "0"
    return _fast_enabled


def fast_launch_enabled() -> bool:
    """False under ``TRITON_INTERPRET=1`` or ``MOE_DISPATCH_TRITON_FASTLAUNCH=0`` (as read at import
    or by the last :func:`refresh_fast_launch`)."""
    return _fast_enabled


refresh_fast_launch()


_SPEC_IDS: dict[tuple, int] = {}  # (num_warps, constexprs...) -> a small int, the key's first element


def launch_spec_key(constexprs: dict, num_warps: int) -> int:
    """The part of the launch key fixed by the constexprs and num_warps: a small int (one per
    distinct pair, so hashing it costs nothing). A caller that launches with the same
    constexprs many times computes it once and passes it to ``launch`` as ``spec_key``."""
    spec = (num_warps,) + tuple(constexprs.items())
    found = _SPEC_IDS.get(spec)
    return _SPEC_IDS.setdefault(spec, len(_SPEC_IDS)) if found is None else found


def _arg_key(a):
    """Key of one argument of a type the fast loop in :func:`_bind` does not spell out."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None or isinstance(a, float):
        return type(a)
    if isinstance(a, int):
        if _INT32_MIN <= a <= _INT32_MAX:
            return (a == 1, a % 16 == 0, 32)
        return (a == 1, a % 16 == 0, 64 if a <= _INT64_MAX else 65)
    raise TypeError(type(a).__name__)  # unknown: not cacheable


def _bind(spec_key: int, device: int, args: tuple):
    """One pass over the arguments: ``(key, raw)``, or ``(None, None)`` when the launch must take
    the ordinary path (a tensor not on ``device``, an argument that cannot be keyed).

    ``key``: ``(spec_key, device, one entry per argument, [alignment])`` -- an int's class as one
    small int (1: 2, divisible by 16: 1, else 0 in int32; 4 / 8 + divisible for int64 / uint64),
    a tensor's dtype, the type of a bool / float / None; and when some tensor address is not
    16-byte aligned, which ones are. ``raw``: the arguments with each tensor as its address.
    """
    key = [spec_key, device]
    raw = []
    low_bits = 0
    for a in args:
        t = type(a)
        if t is int:
            key.append((2 if a == 1 else 0 if a % 16 else 1) if _INT32_MIN <= a <= _INT32_MAX
                       else (4 if a <= _INT64_MAX else 8) + (a % 16 == 0))
            raw.append(a)
        elif t is _Tensor or isinstance(a, _Tensor):
            if a.get_device() != device:  # not on the current CUDA device (or not CUDA at all)
                return None, None
            ptr = a.data_ptr()
            key.append(a.dtype)
            low_bits |= ptr
            raw.append(ptr)
        elif t is bool or t is float or a is None:
            key.append(t)
            raw.append(a)
        else:
            try:
                key.append(_arg_key(a))  # e.g. an int subclass
            except TypeError:  # unknown: never cacheable
                return None, None
            raw.append(a)
    if low_bits % 16:
        key.append(tuple(a.data_ptr() % 16 == 0 for a in args if isinstance(a, _Tensor)))
    return tuple(key), raw


def launch_key(device_index: int, args: tuple, constexprs: dict, num_warps: int) -> tuple | None:
    """The cache key of a launch, or None when some argument cannot be keyed or a tensor is not
    on ``device_index`` (the ordinary path): what ``launch`` looks up."""
    return _bind(launch_spec_key(constexprs, num_warps), device_index, args)[0]


def _hooks_empty(hook) -> bool:
    """Launch hooks (profilers) need the ordinary path: it builds their launch metadata."""
    return hook is None or not getattr(hook, "calls", True)


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


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, num_warps: int, spec_key: int | None = None) -> None:
    """``kernel[grid](*args, **constexprs, num_warps=num_warps)``, through the cache when it can.

    Args:
        kernel: a ``triton.jit`` function whose trailing parameters are the ``constexprs``, in
            declaration order (the cache checks this and otherwise always takes the ordinary path).
        grid: up to 3 ints.
        args: the runtime arguments, positional, in declaration order (tensors on one CUDA device).
        constexprs: the constexpr arguments by name.
        num_warps: as for Triton.
        spec_key: ``launch_spec_key(constexprs, num_warps)``, precomputed by a caller that
            launches with the same constexprs many times; None computes it here.
    """
    if not fast_launch_enabled():
        kernel[grid](*args, **constexprs, num_warps=num_warps)
        return
    device = _current_device()
    key, raw = _bind(launch_spec_key(constexprs, num_warps) if spec_key is None else spec_key, device, args)
    cache = kernel.__dict__.get("_moe_fast_cache")
    if cache is None:
        cache = kernel.__dict__.setdefault("_moe_fast_cache", {})
    entry = _NO_FAST if key is None else cache.get(key)
    if entry is None or entry is _NO_FAST or not _hooks_ok():
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps)
        if entry is None:
            cache[key] = _make_entry(kernel, compiled, constexprs) or _NO_FAST
        return
    n = len(grid)
    entry.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _raw_stream(device), entry.function,
              entry.metadata, None, None, None, *raw, *entry.constexpr_values)


def _cuda_current_device() -> int:
    return torch.cuda.current_device()


# The C functions that torch.cuda.current_device() and Triton's driver end in (a CUDA tensor
# exists whenever a launch gets here, so CUDA is initialized); the Python wrappers otherwise.
_current_device = getattr(torch._C, "_cuda_getDevice", None) or _cuda_current_device
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda device: torch.cuda.current_stream(device).cuda_stream)


def _hooks_ok() -> bool:
    """No launch hooks registered (``triton.knobs.runtime``'s enter / exit hook chains empty)."""
    rt = _knobs_runtime or _load_knobs_runtime()
    if rt is None:  # pragma: no cover - a Triton without knobs: we do not know its launcher
        return False
    return _hooks_empty(rt.launch_enter_hook) and _hooks_empty(rt.launch_exit_hook)


_knobs_runtime = None


def _load_knobs_runtime():
    global _knobs_runtime
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover
        return None
    _knobs_runtime = knobs.runtime
    return _knobs_runtime
