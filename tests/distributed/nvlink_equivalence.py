"""NVLinkTokenDispatcher against AllToAllTokenDispatcher (NCCL) and the dense reference, on GPUs.

Run on one node with 2 (or 4, 8) GPUs with P2P access::

    torchrun --standalone --nproc-per-node 2 tests/distributed/nvlink_equivalence.py

Cases (each prints one ``PASS`` / ``FAIL`` line on rank 0):

* fp32 and bf16, dropless and capacity mode, routings: random, uneven, a rank with zero
  tokens, every token to one expert, empty experts, -1 slots, top-k = number of experts, no
  tokens anywhere, and two large shapes (top-8 of 64 at H=7168, top-2 of 8 at H=4096);
  ``expert_input`` rows (first ``sum(tokens_per_expert)``) and ``tokens_per_expert`` must be
  bit-identical to all-to-all's; combine output and the gradients of hidden states, routing
  weights and expert parameters within 1e-5 (fp32) / relative 1e-2 (bf16) of all-to-all's;
  the small cases also against the fp64 dense reference (``ep_cases.run_case``).
* one dispatcher reused for several iterations (flags return to 0, buffers grow);
* two micro-batches in flight (dispatch A, dispatch B, combine B, combine A);
* invalid expert ids on one rank: every rank raises ValueError, the next dispatch works;
* capacity mode captured in a CUDA graph (dispatch + experts + combine), replayed on new data.

The last line on rank 0 is ``NVLINK EQUIVALENCE: PASS ...`` or ``NVLINK EQUIVALENCE: FAIL ...``;
every rank exits non-zero on failure.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.distributed.ep_cases import Case, init_torchrun_nccl, make_routings, run_case  # noqa: E402

TOL_BF16 = 1e-2


def routing_inputs(case: Case, world_size: int):
    """Per-rank (x [N, H], selected [N, K], weights [N, K]) on CPU, fp32: ``ep_cases``' routings
    without its [E, H, H] expert weights (too big at H = 7168)."""
    return make_routings(case, world_size)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0 or (a.norm() == 0 and b.norm() == 0):
        return 0.0
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def expert_fn(expert_input, tokens_per_expert, params):
    """Per local expert l: ``x * params[l, 0] + params[l, 1]`` (cheap at any H, differentiable,
    distinguishes experts); rows past sum(tokens_per_expert) (capacity padding) map to zero.
    No host sync (CUDA-graph capturable)."""
    R = expert_input.shape[0]
    ends = torch.cumsum(tokens_per_expert, 0)
    idx = torch.searchsorted(ends, torch.arange(R, device=expert_input.device), right=True)
    valid = (idx < tokens_per_expert.numel()).unsqueeze(1)
    zero = torch.zeros((), dtype=expert_input.dtype, device=expert_input.device)
    x = torch.where(valid, expert_input, zero)  # padding rows are uninitialized (NaN, inf): never compute on them
    p = params[idx.clamp(max=params.shape[0] - 1)]
    y = x * p[:, :1].to(x.dtype) + p[:, 1:].to(x.dtype)
    return torch.where(valid, y, zero)


def run_dispatcher(d, xs, ses, ws, rank, device, dtype, seed):
    L = d.num_local_experts
    params0 = torch.stack([1.0 + 0.1 * torch.arange(L, dtype=torch.float32), 0.01 * torch.arange(L, dtype=torch.float32)], 1)
    x = xs[rank].to(device, dtype).requires_grad_()
    w = ws[rank].to(device).requires_grad_()
    se = ses[rank].to(device)
    params = params0.to(device).requires_grad_()
    out = d.dispatch(x, se, w)
    counts = out.tokens_per_expert.tolist()
    y = d.combine(expert_fn(out.expert_input, out.tokens_per_expert, params), out.handle)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + rank)).to(device)
    (y.float() * g).sum().backward()
    torch.cuda.synchronize()
    return {"rows": out.expert_input[:sum(counts)].detach().clone(), "counts": counts, "n_rows": out.expert_input.shape[0],
            "y": y.detach(), "dtype": y.dtype, "grad_x": x.grad, "grad_w": w.grad, "grad_p": params.grad}


def compare(a: dict, b: dict, dtype) -> list[str]:
    problems = []
    if a["counts"] != b["counts"]:
        return [f"tokens_per_expert {a['counts']} != all-to-all {b['counts']}"]
    if not torch.equal(a["rows"], b["rows"]):
        problems.append("expert_input rows differ from all-to-all's (row order or content)")
    if a["dtype"] != b["dtype"]:
        problems.append(f"combine returned {a['dtype']}, all-to-all {b['dtype']}")
    for key in ("y", "grad_x", "grad_w", "grad_p"):
        if (a[key] is None) != (b[key] is None):
            problems.append(f"{key}: only one dispatcher produced it")
            continue
        if a[key] is None:
            continue
        if dtype == torch.float32:
            if not torch.allclose(a[key].double(), b[key].double(), rtol=1e-4, atol=1e-5):
                problems.append(f"{key}: max abs diff {float((a[key].double() - b[key].double()).abs().max()):.2e} (fp32)")
        else:
            err = rel_err(a[key], b[key])
            if not err < TOL_BF16:
                problems.append(f"{key}: relative error {err:.2e}")
    return problems


def make_nvlink(E, L, H, P, capacity=None):
    from moe_dispatch.dispatchers.nvlink import NVLinkTokenDispatcher

    if capacity is None:
        return NVLinkTokenDispatcher(E, L, H, P)
    return NVLinkTokenDispatcher(E, L, H, P, max_tokens_per_rank=capacity, dropless=False)


def make_all_to_all(E, L, H, P):
    from moe_dispatch.dispatchers.all_to_all import AllToAllTokenDispatcher

    return AllToAllTokenDispatcher(E, L, H, ep_size=P)


def cases(P: int):
    """(label, Case, dtype, capacity mode, also vs dense reference)."""
    n = [301 + 97 * r for r in range(P)]
    zero_first = [0] + n[1:]
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        for cap in (False, True):
            mode = "capacity" if cap else "dropless"
            out += [
                (f"{tag} {mode} random", Case(4 * P, 128, 2, n, "random", 0), dtype, cap, not cap),
                (f"{tag} {mode} uneven", Case(4 * P, 128, 2, n, "uneven", 1), dtype, cap, False),
                (f"{tag} {mode} zero-token rank", Case(4 * P, 128, 2, zero_first, "random", 2), dtype, cap, not cap),
                (f"{tag} {mode} one expert", Case(4 * P, 128, 2, n, "one_expert", 3), dtype, cap, False),
                (f"{tag} {mode} -1 slots", Case(4 * P, 128, 2, n, "with_drops", 5), dtype, cap, False),
            ]
        out += [
            (f"{tag} dropless empty experts", Case(4 * P, 128, 2, n, "empty_experts", 4), dtype, False, False),
            (f"{tag} dropless top-k = E", Case(P, 128, P, n, "topk_all", 6), dtype, False, dtype == torch.float32),
            (f"{tag} dropless no tokens", Case(4 * P, 128, 2, [0] * P, "random", 7), dtype, False, False),
        ]
    out += [
        ("bf16 dropless top-8 of 64, H=7168", Case(64, 7168, 8, [2048 - 512 * (r % 2) for r in range(P)], "random", 8),
         torch.bfloat16, False, False),
        ("bf16 capacity top-2 of 8, H=4096", Case(8, 4096, 2, [4096 - 1024 * (r % 2) for r in range(P)], "uneven", 9),
         torch.bfloat16, True, False),
    ]
    return out


def check_case(label, case, dtype, cap, dense, rank, P, group, device, nv_cache, a2a_cache):
    xs, ses, ws = routing_inputs(case, P)
    E, H = case.num_experts, case.hidden
    L = E // P
    capacity = max(case.tokens_per_rank + [1]) if cap else None
    key = (E, H, capacity)
    if key not in nv_cache:  # dispatchers are reused across cases: flags and buffers are reused too
        nv_cache[key] = make_nvlink(E, L, H, P, capacity)
        nv_cache[key].set_ep_group(group)
    if (E, H) not in a2a_cache:
        a2a_cache[(E, H)] = make_all_to_all(E, L, H, P)
        a2a_cache[(E, H)].set_ep_group(group)
    nv, a2a = nv_cache[key], a2a_cache[(E, H)]
    a = run_dispatcher(nv, xs, ses, ws, rank, device, dtype, case.seed)
    b = run_dispatcher(a2a, xs, ses, ws, rank, device, dtype, case.seed)
    nv.check_health()
    problems = compare(a, b, dtype)
    if cap:
        expected = P * capacity * min(case.topk, L)
        if a["n_rows"] != expected:
            problems.append(f"capacity mode returned {a['n_rows']} rows, expected {expected}")
    if dense and not problems:
        made = []

        def factory(E_, L_, H_, P_):
            d = make_nvlink(E_, L_, H_, P_, capacity)
            made.append(d)
            return d

        try:
            run_case(rank, P, factory, case, group, device, dtype)
        except AssertionError as exc:
            problems.append(f"vs dense reference: {exc}")
        finally:
            for d in made:
                d.close()
    return problems


def check_micro_batches(rank, P, group, device):
    """dispatch A, dispatch B (bigger: the buffers grow; a second dispatcher sharing the first's
    workspace, as two MoE layers would), combine B, combine A."""
    E, H = 4 * P, 128
    d = make_nvlink(E, E // P, H, P)
    d.set_ep_group(group)
    d2 = make_nvlink(E, E // P, H, P)
    d2.share_workspace(d)
    ref = make_all_to_all(E, E // P, H, P)
    ref.set_ep_group(group)
    try:
        ca, cb = Case(E, H, 2, [40 + r for r in range(P)], "random", 20), Case(E, H, 2, [900 + 50 * r for r in range(P)], "uneven", 21)
        ia, ib = routing_inputs(ca, P), routing_inputs(cb, P)
        outs = {}
        for name, disp, disp2 in (("nv", d, d2), ("ref", ref, ref)):
            da = disp.dispatch(ia[0][rank].to(device), ia[1][rank].to(device), ia[2][rank].to(device))
            db = disp2.dispatch(ib[0][rank].to(device), ib[1][rank].to(device), ib[2][rank].to(device))
            yb = disp2.combine(db.expert_input * 3.0, db.handle)
            ya = disp.combine(da.expert_input * 2.0, da.handle)
            outs[name] = (ya, yb)
        torch.cuda.synchronize()
        d.check_health()
        problems = []
        for i in range(2):
            if not torch.allclose(outs["nv"][i], outs["ref"][i], rtol=1e-5, atol=1e-5):
                problems.append(f"micro-batch {'AB'[i]} combine differs")
        return problems
    finally:
        d.close()


def check_bad_ids(rank, P, group, device):
    """Rank P-1 passes an expert id >= E: every rank raises ValueError; then a good dispatch."""
    E, H = 4 * P, 128
    d = make_nvlink(E, E // P, H, P)
    d.set_ep_group(group)
    try:
        x = torch.randn(10, H, device=device)
        se = torch.randint(0, E, (10, 2), device=device)
        if rank == P - 1:
            se[3, 1] = E
        w = torch.rand(10, 2, device=device)
        try:
            d.dispatch(x, se, w)
            raised = False
        except ValueError:
            raised = True
        problems = [] if raised else ["no ValueError on this rank for an invalid id on rank P-1"]
        se = se.clamp(max=E - 1)
        out = d.dispatch(x, se, w)
        y = d.combine(out.expert_input, out.handle)
        if not torch.allclose(y, x * w.sum(1, keepdim=True), rtol=1e-5, atol=1e-5):
            problems.append("dispatch after the error gave a wrong result")
        d.check_health()
        return problems
    finally:
        d.close()


def check_cuda_graph(rank, P, group, device):
    """Capacity-mode dispatch + experts + combine captured once, replayed on new inputs."""
    E, H, K, N = 4 * P, 128, 2, 200  # the small cases' config: no new kernel variants to compile
    L = E // P
    d = make_nvlink(E, L, H, P, capacity=N)
    d.set_ep_group(group)
    ref = make_all_to_all(E, L, H, P)
    ref.set_ep_group(group)
    params = torch.stack([1.0 + 0.1 * torch.arange(L), 0.01 * torch.arange(L)], 1).to(device)
    try:
        def inputs(seed):
            xs, ses, ws = routing_inputs(Case(E, H, K, [N] * P, "uneven", seed), P)
            return xs[rank].to(device, torch.bfloat16), ses[rank].to(device), ws[rank].to(device)

        sx, sse, sw = (t.clone() for t in inputs(100))

        def step():
            out = d.dispatch(sx, sse, sw)
            return d.combine(expert_fn(out.expert_input, out.tokens_per_expert, params), out.handle)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels, allocates the workspace
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = step()
        problems = []
        for seed in (101, 102, 103):
            x, se, w = inputs(seed)
            sx.copy_(x), sse.copy_(se), sw.copy_(w)
            graph.replay()
            out = ref.dispatch(x, se, w)
            y_ref = ref.combine(expert_fn(out.expert_input, out.tokens_per_expert, params), out.handle)
            torch.cuda.synchronize()
            err = rel_err(static_y, y_ref)
            if not err < TOL_BF16:
                problems.append(f"replay (seed {seed}): relative error {err:.2e} vs all-to-all")
        d.check_health()
        return problems
    finally:
        d.close()


def main() -> int:
    rank, P, group, device = init_torchrun_nccl()
    results: list[tuple[str, list[str], float]] = []
    nv_cache, a2a_cache = {}, {}

    def run(label, fn):
        t0 = time.time()
        try:
            problems = fn()
        except Exception as exc:  # noqa: BLE001 - report every case
            problems = [f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"]
        results.append((label, problems, time.time() - t0))
        gathered: list = [None] * P
        dist.all_gather_object(gathered, problems)
        if rank == 0:
            bad = [f"rank {r}: {p}" for r, ps in enumerate(gathered) for p in ps]
            status = "PASS" if not bad else "FAIL"
            print(f"{status} {label} ({time.time() - t0:.1f}s)" + "".join(f"\n    {b}" for b in bad), flush=True)
        return gathered

    all_problems = []
    for label, case, dtype, cap, dense in cases(P):
        g = run(label, lambda: check_case(label, case, dtype, cap, dense, rank, P, group, device, nv_cache, a2a_cache))
        all_problems += [p for ps in g for p in ps]
    for label, fn in (("two micro-batches in flight + growth", lambda: check_micro_batches(rank, P, group, device)),
                      ("invalid expert ids raise on every rank", lambda: check_bad_ids(rank, P, group, device)),
                      ("CUDA graph capture/replay (capacity mode)", lambda: check_cuda_graph(rank, P, group, device))):
        g = run(label, fn)
        all_problems += [p for ps in g for p in ps]
    for d in nv_cache.values():
        d.close()
    if rank == 0:
        n_cases = len(results)
        if all_problems:
            print(f"NVLINK EQUIVALENCE: FAIL ({len(all_problems)} problem(s) over {n_cases} cases, {P} ranks)", flush=True)
        else:
            print(f"NVLINK EQUIVALENCE: PASS ({n_cases} cases over {P} ranks: NVLinkTokenDispatcher == "
                  f"AllToAllTokenDispatcher (+ dense fp64 reference on the small cases); fp32 1e-5, bf16 rel < {TOL_BF16})",
                  flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if all_problems else 0


if __name__ == "__main__":
    sys.exit(main())
