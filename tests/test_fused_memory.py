"""Memory of the fused experts (CPU, Triton interpreter): what the forward keeps for the backward
and what the backward allocates at its peak, counted in bytes.

Budgets (R rows, I expert FFN size, H hidden, N tokens, b bytes per element of x's dtype):

- kept for the backward, beyond the op's inputs (x, the weights): the gate | up pre-activations
  ``gu [R, 2I]`` and the routing index (``row_token`` int32, ``row_weight`` fp32, ``counts`` int64,
  and for the routing weights' gradient the sort order int64 and a bool mask).
  h ``[R, I]`` is not kept: the backward recomputes it from g | u.
- backward peak, above what was allocated before it: the three grads, ``dgu [R, 2I]``, the
  recomputed ``h [R, I]``, two ``[R, H]`` row copies (dout and x gathered), one fp32 ``[N, H]``
  scatter buffer and the per-tile routing-weight partials. No zero gradient is materialised for
  ``gu`` (autograd would otherwise build one ``[R, 2I]``, and one ``[R, I]`` for h when it was an
  output).

At the Mixtral shape (T 4096, H 4096, I 14336, 8 experts, top-2, bf16) the same counting gives
0.48 GB kept (was 0.71) and a backward peak of 3.06 GB above the forward's (was 4.20 GB), see
benchmarks/NOTES_fused_experts.md, "Peak memory".
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moe_dispatch.experts_fused import fused_moe_experts, fused_swiglu_experts, routing_rows


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated under this mode and still alive: ``live``, its maximum
    ``peak`` and ``log`` (op name, bytes, live after). Our custom ops are entered (their Python
    implementation runs under the mode), so their buffers count too. Views and in-place ops
    allocate nothing (their schema returns an alias)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.log: list[tuple[str, int, int]] = []
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [nbytes, tensors alive]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "moe_dispatch":
            from torch._library.custom_ops import OPDEFS

            with self:
                out = OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        returns = func._schema.returns
        for i, t in enumerate(tree_leaves(out)):
            if isinstance(t, torch.Tensor):
                self._track(t, fresh=i >= len(returns) or returns[i].alias_info is None, name=str(func))
        return out

    def _track(self, t: torch.Tensor, fresh: bool, name: str) -> None:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr == 0 or nbytes == 0:
            return
        entry = self._storages.get(ptr)
        if entry is None:
            if not fresh:  # a view of memory allocated before the mode
                return
            entry = self._storages[ptr] = [nbytes, 0]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self.log.append((name, nbytes, self.live))
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[ptr]
            self.log.append(("free", -entry[0], self.live))


def _case(tokens: bool, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    N, H, I, L, K = 48, 32, 96, 4, 2
    x = torch.randn(N, H, generator=gen).to(dtype).requires_grad_()
    wgu = (torch.randn(L, 2 * I, H, generator=gen) * 0.2).to(dtype).requires_grad_()
    wd = (torch.randn(L, H, I, generator=gen) * 0.2).to(dtype).requires_grad_()
    sel = torch.randint(-1, L, (N, K), generator=gen)
    rw = torch.rand(N, K, generator=gen).requires_grad_()
    if tokens:
        return (lambda: fused_moe_experts(x, sel, rw, wgu, wd)), (x, wgu, wd, rw), dict(N=N, H=H, I=I, L=L, R=N * K)
    counts, row_token, _ = routing_rows(sel, rw, L)
    rows = x.detach()[row_token.long()].requires_grad_()
    return (lambda: fused_swiglu_experts(rows, counts, wgu, wd)), (rows, wgu, wd), dict(N=N, H=H, I=I, L=L, R=N * K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [False, True])
def test_saved_for_backward_is_gate_up_and_index_only(tokens, dtype):
    fn, inputs, d = _case(tokens, dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    own = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
            if t.untyped_storage().data_ptr() not in own}
    b = torch.empty((), dtype=dtype).element_size()
    R, I, L = d["R"], d["I"], d["L"]
    # counts: int64 [L] (a view of routing_rows' [L + 1] buffer); on the tokens path the index
    # (row_token int32, row_weight fp32) and what autograd keeps of routing_rows' routing-weight
    # gather (the sort order int64 and the valid-slot mask)
    budget = R * 2 * I * b + (L + 1) * 8 + (R * (4 + 4 + 8 + 1) if tokens else 0)
    assert sum(kept.values()) <= budget, (sorted(kept.values()), budget)
    assert R * 2 * I * b in kept.values()  # g | u, the one activation kept
    assert not any(nbytes == R * I * b for nbytes in kept.values())  # h is recomputed, not kept
    assert out.shape[0] == (d["N"] if tokens else R)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [False, True])
def test_backward_peak_bytes_within_budget(tokens, dtype):
    fn, inputs, d = _case(tokens, dtype, seed=1)
    out = fn()
    grad_out = torch.randn_like(out)
    with LiveBytes() as mem:
        grads = torch.autograd.grad(out, inputs, grad_out)
    N, H, I, R = d["N"], d["H"], d["I"], d["R"]
    b = torch.empty((), dtype=dtype).element_size()
    grads_bytes = sum(g.numel() * g.element_size() for g in grads)
    work = R * 2 * I * b + R * I * b  # dgu, recomputed h
    if tokens:  # dout and x gathered to rows, dY scaled in fp32 then rounded, fp32 dX scatter buffer
        work += 2 * R * H * b + R * H * 4 + N * H * 4
    slack = 4096 + R * 4 * 8  # routing-weight partials and index-sized temporaries
    assert mem.peak <= grads_bytes + work + slack, mem.log
    # autograd materialised no zero gradient for the kept g | u (it would be R x 2I)
    assert not [entry for entry in mem.log if entry[0].startswith("aten.zeros") and entry[1] >= R * I * b], mem.log
    assert any(entry[1] == R * 2 * I * b for entry in mem.log)  # the op's own buffers were seen (dgu)


def test_recomputed_h_is_the_forwards_h_in_fp32():
    """The dH GEMM's epilogue recomputes h = silu(g) * u from the saved g | u: bit for bit the h
    the forward's epilogue computed from its fp32 accumulators (same operations, fp32 storage)."""
    from moe_dispatch.kernels import grouped_gemm as gg

    gen = torch.Generator().manual_seed(2)
    L, H, I, counts = 3, 40, 24, [5, 0, 9]
    R = sum(counts) + 3
    x = torch.randn(R, H, generator=gen)
    wgu = torch.randn(L, 2 * I, H, generator=gen) * 0.3
    wd = torch.randn(L, H, I, generator=gen) * 0.3
    tpe = torch.tensor(counts)
    h, gu = gg.gate_up_swiglu(x, tpe, wgu, R, save_gate_up=True)
    dgu, h_again = torch.empty(R, 2 * I), torch.empty(R, I)
    gg.rows_gemm(torch.randn(R, H, generator=gen), tpe, wd, (wd.stride(0), wd.stride(1), wd.stride(2)), I, dgu, R,
                 epilogue=gg.EPI_SWIGLU_BWD, gate_up=gu, h_out=h_again)
    n = sum(counts)
    assert torch.equal(h_again[:n], h[:n])
