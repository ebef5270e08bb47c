"""The cached low-level launch path (``moe_dispatch.kernels.launcher``) on a stand-in kernel:
which calls take the ordinary ``kernel[grid](...)`` path, which reuse the compiled kernel, and
that the reused call passes the same arguments in the same order. (On CUDA the bitwise checks of
the real kernels are in ``tests/test_fastpath_gpu.py``.)"""
import pytest
import torch

pytest.importorskip("triton")
from moe_dispatch.kernels import launcher  # noqa: E402


class _Compiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def run(self, *a):
        self.log.append(("fast",) + a)


class _Kernel:
    """Looks like a ``triton.jit`` function: ``arg_names`` and ``kernel[grid](*args, **kw)``."""

    def __init__(self, arg_names, compiled=True):
        self.arg_names, self.log, self.compiled = arg_names, [], compiled

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.log.append(("slow", grid, args, kw))
            return _Compiled(self.log) if self.compiled else None
        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(launcher, "fast_launch_enabled", lambda: True)
    monkeypatch.setattr(launcher, "_current_device", lambda: -1)  # CPU tensors: get_device() == -1
    monkeypatch.setattr(launcher, "_raw_stream", lambda device: 77)
    monkeypatch.setattr(launcher, "_hooks_ok", lambda: True)


def test_second_call_reuses_the_compiled_kernel(fast):
    k = _Kernel(["x", "n", "BLOCK"])
    x = torch.zeros(8)
    launcher.launch(k, (3,), (x, 5), {"BLOCK": 16}, 4)
    launcher.launch(k, (4, 2), (x, 7), {"BLOCK": 16}, 4)
    assert k.log[0][0] == "slow" and k.log[0][3] == {"BLOCK": 16, "num_warps": 4}
    assert k.log[1] == ("fast", 4, 2, 1, 77, "fn", "meta", None, None, None, x.data_ptr(), 7, 16)


@pytest.mark.parametrize("first, second", [
    ((5,), (1,)),            # an int that becomes 1: Triton specializes it
    ((5,), (32,)),           # divisible by 16
    ((5,), (2**31,)),        # int64
    ((5,), (5.0,)),          # float
])
def test_specialization_changes_recompile(fast, first, second):
    k = _Kernel(["n", "BLOCK"])
    launcher.launch(k, (1,), first, {"BLOCK": 16}, 4)
    launcher.launch(k, (1,), second, {"BLOCK": 16}, 4)
    assert [e[0] for e in k.log] == ["slow", "slow"]


def test_alignment_dtype_constexpr_and_warps_are_in_the_key(fast):
    k = _Kernel(["x", "BLOCK"])
    x = torch.zeros(16)
    for args, ce, w in [((x,), 16, 4), ((x[1:],), 16, 4), ((x.int(),), 16, 4), ((x,), 32, 4), ((x,), 16, 8)]:
        launcher.launch(k, (1,), args, {"BLOCK": ce}, w)
    assert [e[0] for e in k.log] == ["slow"] * 5
    launcher.launch(k, (1,), (x,), {"BLOCK": 16}, 4)
    assert k.log[-1][0] == "fast"


def test_unknown_api_or_arguments_always_take_the_ordinary_path(fast):
    for k, args in [(_Kernel(["x", "BLOCK"], compiled=False), (1,)),   # no CompiledKernel returned
                    (_Kernel(["BLOCK", "x"]), (1,)),                   # constexpr not trailing
                    (_Kernel(["x", "BLOCK"]), ("a string",))]:         # an argument we cannot key
        for _ in range(3):
            launcher.launch(k, (1,), args, {"BLOCK": 16}, 4)
        assert [e[0] for e in k.log] == ["slow"] * 3


def test_launch_hooks_take_the_ordinary_path(fast, monkeypatch):
    k = _Kernel(["n", "BLOCK"])
    launcher.launch(k, (1,), (5,), {"BLOCK": 16}, 4)
    monkeypatch.setattr(launcher, "_hooks_ok", lambda: False)
    launcher.launch(k, (1,), (5,), {"BLOCK": 16}, 4)
    assert [e[0] for e in k.log] == ["slow", "slow"]


def test_disabled_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        assert not launcher.refresh_fast_launch() and not launcher.fast_launch_enabled()
        k = _Kernel(["n", "BLOCK"])
        for _ in range(2):
            launcher.launch(k, (1,), (5,), {"BLOCK": 16}, 4)
        assert [e[0] for e in k.log] == ["slow", "slow"] and not hasattr(k, "_moe_fast_cache")
    finally:
        monkeypatch.undo()
        launcher.refresh_fast_launch()


def test_hooks_empty():
    class Chain:
        def __init__(self, calls):
            self.calls = calls
    assert launcher._hooks_empty(None) and launcher._hooks_empty(Chain([]))
    assert not launcher._hooks_empty(Chain([print])) and not launcher._hooks_empty(print)


def test_spec_key_reuses_the_same_entry(fast):
    k = _Kernel(["x", "n", "BLOCK"])
    x = torch.zeros(8)
    spec = launcher.launch_spec_key({"BLOCK": 16}, 4)
    assert spec == launcher.launch_spec_key({"BLOCK": 16}, 4) != launcher.launch_spec_key({"BLOCK": 16}, 8)
    launcher.launch(k, (1,), (x, 5), {"BLOCK": 16}, 4)
    launcher.launch(k, (1,), (x, 6), {"BLOCK": 16}, 4, spec)
    assert [e[0] for e in k.log] == ["slow", "fast"] and len(k._moe_fast_cache) == 1
    assert launcher.launch_key(-1, (x, 6), {"BLOCK": 16}, 4) in k._moe_fast_cache


def test_tensor_not_on_the_current_device_takes_the_ordinary_path(fast, monkeypatch):
    monkeypatch.setattr(launcher, "_current_device", lambda: 0)  # "cuda:0" current; CPU tensors are not on it
    k = _Kernel(["x", "BLOCK"])
    for _ in range(2):
        launcher.launch(k, (1,), (torch.zeros(4),), {"BLOCK": 16}, 4)
    assert [e[0] for e in k.log] == ["slow", "slow"] and not k._moe_fast_cache
    assert launcher.launch_key(0, (torch.zeros(4),), {"BLOCK": 16}, 4) is None


def test_key_matches_the_per_argument_classes():
    """The flat key tells apart exactly what _arg_key tells apart (Triton's specialization)."""
    x = torch.zeros(16)
    ints = [1, 0, 16, -16, 3, -3, 2**31 - 1, 2**31, 2**32, 2**63, -(2**31), -(2**31) - 1]
    for a in ints:
        for b in ints:
            same = launcher._arg_key(a) == launcher._arg_key(b)
            assert (launcher.launch_key(-1, (a,), {}, 4) == launcher.launch_key(-1, (b,), {}, 4)) == same, (a, b)
    keys = {launcher.launch_key(-1, (t,), {}, 4) for t in (x, x[1:], x.int(), x[4:], x.double())}
    assert len(keys) == 4  # x and x[4:] (16-byte aligned, same dtype) share one
    assert launcher.launch_key(-1, (True,), {}, 4) != launcher.launch_key(-1, (1,), {}, 4)
    assert launcher.launch_key(-1, (None,), {}, 4) != launcher.launch_key(-1, (1.0,), {}, 4)
