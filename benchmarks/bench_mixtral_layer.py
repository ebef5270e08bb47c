"""Mixtral MoE layer on one GPU: our block (each expert backend) vs transformers' block vs the bound.

Shape (defaults, Mixtral 8x7B): hidden 4096, ffn 14336, 8 experts, top-2, 4096 tokens, bf16.

Rows:
- ``hf``: ``transformers`` ``MixtralSparseMoeBlock`` (its default, eager experts), same weights.
- ``ours[<backend>]``: ``NVMixtralSparseMoeBlock`` (fp32 router -> AllToAllTokenDispatcher at
  EP=1 -> SwiGLUExperts(<backend>) -> combine), for every backend that runs here.
- ``experts[<backend>]``: the experts stage alone on already-dispatched rows (no "vs hf").
- ``capacity[grouped_mm]`` / ``graphed[grouped_mm]``: the block with the AllToAll dispatcher in
  capacity mode (``max_tokens_per_rank=tokens``, no host sync), eager and replayed from CUDA
  graphs (``moe_dispatch.graph.capture_moe_layer``: route -> dispatch -> experts -> combine,
  and the backward, each one graph).
- ``tokens[fused,<g><s>]`` (with the fused backend): the experts from tokens to combined tokens,
  :func:`moe_dispatch.experts_fused.fused_moe_experts`; ``g`` = gather fused into the first GEMM
  (else a permuted copy first), ``s`` = scatter with the routing weight fused into the last GEMM
  (else ``index_add``); ``-`` = neither.
- ``tokens[fused,gs,fp8=<recipe>]`` (fused backend, sm89+, unless ``--no-fp8``): the same with
  both forward GEMMs on e4m3 inputs (``fp8="tensor"`` / ``"block"``), weights quantized at every
  call; ``...,qw]``: weights quantized once before timing (``fp8_weights=``, inference or
  micro-batches of one step). ``rel err`` of these rows is against HF's output too (the tokens
  rows compute the whole block's expert output); ``x bound`` stays the bf16 bound. With
  ``--expert-shapes``, the blockwise row is added per shape too. Without CUDA or below sm89 the
  fp8 rows are skipped with the reason printed.
- ``--expert-shapes``: experts alone at the Mixtral, Qwen3-MoE (H 2048, 128 experts, top-8,
  I 768) and DeepSeek (H 7168, 256 experts, top-8, I 2048) expert shapes for each ``--shape-tokens``
  T, ``torch._grouped_mm`` against fused (rows) and fused gather+scatter (tokens), uniform random
  top-k routing; bound = max(FLOPs / matmul rate, weight bytes / HBM copy rate), both measured.

``peak GB``: peak device memory allocated during one fwd+bwd step above what was allocated
before it (activations, saved tensors, grads, workspaces).

``rel err``: ``||ours - hf|| / ||hf||`` with HF's router run in fp32 as ours (bf16 router logits
would flip near-tied top-k choices and hide everything else).

Bound: the expert GEMMs at the bf16 matmul rate measured in this run (an 8192^3 matmul):
forward ``3 GEMMs * 2 * tokens * top_k * H * I`` FLOPs, forward+backward 3x that.

Timing: CUDA events, median of ``--iters`` after ``--warmup`` calls. Forward is timed under
``torch.no_grad()``; forward+backward with autograd, parameter grads reset (set to None) each call.

``--qwen3-moe``: instead, the Qwen3-MoE shape (Qwen3-30B-A3B's layer: hidden 2048, 128 experts,
top-8, moe_intermediate 768, 4096 tokens): ``NVQwen3MoeSparseMoeBlock`` vs transformers'
``Qwen3MoeSparseMoeBlock``, same rows and bound (:func:`bench_qwen3_moe`).

Usage::

    python benchmarks/bench_mixtral_layer.py [--tokens 4096] [--json out.json]
    python benchmarks/bench_mixtral_layer.py --qwen3-moe [--tokens 4096] [--json out.json]
    python benchmarks/bench_mixtral_layer.py --skip-layer --expert-shapes --shape-tokens 512,4096,16384
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def median_ms(fn, warmup: int, iters: int) -> float:
    """Median wall time of ``fn()`` on the current stream, CUDA events, in ms."""
    from moe_dispatch.bench.limits import time_cuda

    return time_cuda(fn, warmup=warmup, iters=iters)


def matmul_tflops(warmup: int, iters: int, n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: torch.mm(a, b), warmup, iters)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def available_backends() -> list[str]:
    backends = []
    if hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= (9, 0):
        backends.append("grouped_mm")
    try:
        import transformer_engine.pytorch  # noqa: F401
        backends.append("te")
    except ImportError:
        pass
    try:
        import triton  # noqa: F401
        backends.append("fused")
    except ImportError:
        pass
    backends.append("loop")
    return backends


def _fp32_router(router):
    """HF router math with fp32 logits, as NVMixtral's router."""

    def forward(hidden_states):
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states.float(), router.weight.float())
        top, index = torch.topk(torch.softmax(logits, dim=-1), router.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    return forward


def hf_block_and_input(block_cls, hf_config, T: int, H: int):
    """transformers' MoE block (bf16 on CUDA, weights ~ N(0, 0.02)) and a ``[1, T, H]`` input."""
    torch.manual_seed(0)
    hf_block = block_cls(hf_config).to(device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for p in hf_block.parameters():
            p.normal_(0.0, 0.02)
    return hf_block, torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)


def copy_hf_weights_(block, hf_block) -> None:
    """transformers' router gate and fused expert weights into our block (same layouts)."""
    block.router.gate.weight.copy_(hf_block.gate.weight)
    block.experts.experts_gate_up_weight.copy_(hf_block.experts.gate_up_proj)
    block.experts.experts_down_weight.copy_(hf_block.experts.down_proj)


def gemm_bound(T: int, K: int, H: int, I: int, tflops: float) -> dict:
    """ms of the three expert GEMMs (gate, up, down) at ``tflops``: forward, and forward+backward (3x)."""
    fwd_flops = 3 * 2 * T * K * H * I
    return {"fwd": fwd_flops / (tflops * 1e12) * 1e3, "fwd_bwd": 3 * fwd_flops / (tflops * 1e12) * 1e3}


def write_json(path: str | None, result: dict) -> None:
    """``result`` as JSON to ``path`` (``"-"``: stdout; None: nowhere)."""
    if path is None:
        return
    text = json.dumps(result, indent=2)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed_pair(module_fn, x: torch.Tensor, params, warmup: int, iters: int) -> tuple[float, float, float]:
    """(forward ms, forward+backward ms, peak GB of one fwd+bwd step) of ``module_fn(x) -> [.., H]``."""
    with torch.no_grad():
        fwd = median_ms(lambda: module_fn(x), warmup, iters)
    x_grad = x.detach().requires_grad_()
    grad_out = None

    def step():
        nonlocal grad_out
        for p in params:
            p.grad = None
        x_grad.grad = None
        out = module_fn(x_grad)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)

    fwd_bwd = median_ms(step, warmup, iters)
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    for p in params:
        p.grad = None
    return fwd, fwd_bwd, peak


def _topk_routing(T: int, E: int, K: int, seed: int = 0):
    """Uniform random top-k routing: ``(selected [T, K] int64, weights [T, K] fp32)``, distinct experts."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(T, E, device="cuda", generator=gen)
    weights, selected = scores.topk(K, dim=-1)
    return selected, weights / weights.sum(-1, keepdim=True)


def fp8_why_not() -> str | None:
    """None when the fp8 rows can run here, else why not."""
    if not torch.cuda.is_available():
        return "needs CUDA"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"e4m3 tensor-core dots need sm89+, this GPU is sm{''.join(map(str, torch.cuda.get_device_capability()))}"
    return None


def fused_fp8_rows(x_NH, selected, weights, w_gate_up, w_down, warmup: int, iters: int, ref=None,
                   prefix: str = "tokens[fused,gs", recipes=("tensor", "block")) -> list[dict]:
    """Rows ``tokens[fused,gs,fp8=<recipe>]`` (weights quantized per call) and ``...,qw]``
    (quantized once); ``ref``: ``[N, H]`` output the rel err is taken against (or None)."""
    from moe_dispatch.experts_fused import fused_moe_experts, quantize_expert_weights

    why = fp8_why_not()
    if why is not None:
        print(f"fp8 rows skipped: {why}")
        return []
    rows = []
    weights = weights.detach().requires_grad_()
    for recipe in recipes:
        qw = quantize_expert_weights(w_gate_up, w_down, recipe)
        for tag, kwargs in ((f"fp8={recipe}", dict(fp8=recipe)), (f"fp8={recipe},qw", dict(fp8_weights=qw))):
            fn = (lambda t, kw=kwargs: fused_moe_experts(t, selected, weights, w_gate_up, w_down, check_ids=False,
                                                         **kw))
            fwd, fwd_bwd, peak = timed_pair(fn, x_NH, [w_gate_up, w_down, weights], warmup, iters)
            err = None
            if ref is not None:
                with torch.no_grad():
                    err = rel_err(fn(x_NH), ref)
            rows.append({"name": f"{prefix},{tag}]", "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_gb": peak,
                         "rel_err_vs_hf": err})
        del qw
    return rows


def fused_token_rows(x_NH, selected, weights, w_gate_up, w_down, warmup: int, iters: int) -> list[dict]:
    """Rows ``tokens[fused,<g><s>]`` for the four gather / scatter combinations."""
    from moe_dispatch.experts_fused import fused_moe_experts

    rows = []
    weights = weights.detach().requires_grad_()
    for gather, scatter in ((True, True), (True, False), (False, True), (False, False)):
        tag = ("g" if gather else "") + ("s" if scatter else "") or "-"
        fwd, fwd_bwd, peak = timed_pair(
            lambda t: fused_moe_experts(t, selected, weights, w_gate_up, w_down, gather=gather, scatter=scatter,
                                        check_ids=False),
            x_NH, [w_gate_up, w_down, weights], warmup, iters)
        rows.append({"name": f"tokens[fused,{tag}]", "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_gb": peak,
                     "rel_err_vs_hf": None})
    return rows


EXPERT_SHAPES = {  # name: (hidden, ffn, experts, top-k)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3moe": (2048, 768, 128, 8),
    "deepseek": (7168, 2048, 256, 8),
}


def expert_shape_rows(token_counts: list[int], backends: list[str], tflops: float, hbm_gbps: float,
                      warmup: int, iters: int, shapes: list[str] | None = None, fp8: bool = False) -> list[dict]:
    """Experts alone at each shape of ``EXPERT_SHAPES`` (or those named in ``shapes``) and each T:
    grouped_mm vs fused vs fused g+s (and, with ``fp8``, fused g+s on blockwise e4m3 inputs; its
    bound is still the bf16 one)."""
    from moe_dispatch.experts import SwiGLUExperts
    from moe_dispatch.experts_fused import fused_moe_experts, routing_rows

    rows = []
    print_shape_row(None, {})  # the header; each row is printed as soon as it is measured
    ref: dict = {}
    for shape, (H, I, E, K) in EXPERT_SHAPES.items():
        if shapes and shape not in shapes:
            continue
        with torch.device("cuda"):
            experts = SwiGLUExperts(E, H, I, backend="loop", dtype=torch.bfloat16)
        experts.reset_parameters(0.02)
        params = list(experts.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in params)
        for T in token_counts:
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            selected, weights = _topk_routing(T, E, K)
            counts, row_token, _ = routing_rows(selected, weights, E)
            rows_in = x[row_token.long()].contiguous()
            flops = 3 * 2 * T * K * H * I
            # weights read once (fwd); fwd+bwd: read twice more (dX, dH) and the grads written
            bound = {"fwd": max(flops / (tflops * 1e12), weight_bytes / (hbm_gbps * 1e9)) * 1e3,
                     "fwd_bwd": max(3 * flops / (tflops * 1e12), 4 * weight_bytes / (hbm_gbps * 1e9)) * 1e3}
            # (name, expert backend or None for the tokens path, fp8 recipe of the tokens path)
            variants = [(f"experts[{b}]", b, None) for b in backends if b in ("grouped_mm", "fused")]
            variants.append(("tokens[fused,gs]", None, None))
            if fp8 and fp8_why_not() is None:
                variants.append(("tokens[fused,gs,fp8=block]", None, "block"))
            for name, backend, recipe in variants:
                if backend is not None:
                    experts.backend = backend
                    fn, inp, ps = (lambda t: experts(t, counts)), rows_in, params
                else:
                    w = weights.detach().requires_grad_()
                    fn = (lambda t, w=w, recipe=recipe: fused_moe_experts(
                        t, selected, w, experts.experts_gate_up_weight, experts.experts_down_weight, check_ids=False,
                        fp8=recipe))
                    inp, ps = x, params + [w]
                fwd, fwd_bwd, peak = timed_pair(fn, inp, ps, warmup, iters)
                rows.append({"shape": shape, "tokens": T, "name": name, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
                             "peak_gb": peak, "bound_ms": bound, "fwd_vs_bound": fwd / bound["fwd"],
                             "fwd_bwd_vs_bound": fwd_bwd / bound["fwd_bwd"],
                             "flop_bound_ms": {"fwd": flops / tflops / 1e9, "fwd_bwd": 3 * flops / tflops / 1e9}})
                print_shape_row(rows[-1], ref)
            del x, rows_in
        del experts, params
        torch.cuda.empty_cache()
    return rows


def print_shape_row(row: dict | None, ref: dict) -> None:
    """One row of the expert-shapes table (the header when ``row`` is None); ``ref`` collects the
    grouped_mm fwd+bwd times for the speedup column."""
    if row is None:
        header = (f"{'shape':<10}{'T':>6} {'row':<28}{'fwd ms':>9}{'x bound':>9}{'fwd+bwd':>10}{'x bound':>9}"
                  f"{'bound f/fb':>13}{'peak GB':>9}{'vs gmm fb':>10}")
        print(header)
        print("-" * len(header))
        return
    if row["name"] == "experts[grouped_mm]":
        ref[(row["shape"], row["tokens"])] = row["fwd_bwd_ms"]
    base = ref.get((row["shape"], row["tokens"]))
    speed = f"{base / row['fwd_bwd_ms']:.2f}x" if base else ""
    b = row["bound_ms"]
    print(f"{row['shape']:<10}{row['tokens']:>6} {row['name']:<28}{row['fwd_ms']:>9.3f}{row['fwd_vs_bound']:>9.2f}"
          f"{row['fwd_bwd_ms']:>10.3f}{row['fwd_bwd_vs_bound']:>9.2f}{b['fwd']:>6.2f}/{b['fwd_bwd']:<6.2f}"
          f"{row['peak_gb']:>9.2f}{speed:>10}", flush=True)


def graphed_rows(config, hf_block, x, hf_out, args) -> list[dict]:
    """The block on a capacity-mode AllToAll dispatcher (grouped_mm experts), eager and graphed."""
    from moe_dispatch import AllToAllTokenDispatcher
    from moe_dispatch.graph import capture_moe_layer
    from moe_dispatch.models.mixtral import NVMixtralSparseMoeBlock

    T, H, E = args.tokens, args.hidden, args.experts
    dispatcher = AllToAllTokenDispatcher(E, E, H, permute_backend=args.permute_backend, max_tokens_per_rank=T,
                                         dropless=False)
    with torch.device("cuda"):
        block = NVMixtralSparseMoeBlock(config, dispatcher=dispatcher, expert_backend="grouped_mm")
    block = block.to(torch.bfloat16)
    with torch.no_grad():
        copy_hf_weights_(block, hf_block)
        err = rel_err(block(x).hidden_states, hf_out)
    params = list(block.parameters())
    rows = []
    fwd, fwd_bwd, peak = timed_pair(lambda t: block(t).hidden_states, x, params, args.warmup, args.iters)
    rows.append({"name": "capacity[grouped_mm]", "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_gb": peak,
                 "rel_err_vs_hf": err})
    x_train = x.detach().clone().requires_grad_()
    graphed = capture_moe_layer(block, x_train)
    with torch.no_grad():
        err = rel_err(graphed(x).hidden_states, hf_out)
    fwd, fwd_bwd, peak = timed_pair(lambda t: graphed(t).hidden_states, x, params, args.warmup, args.iters)
    rows.append({"name": "graphed[grouped_mm]", "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_gb": peak,
                 "rel_err_vs_hf": err})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--backends", default=None, help="comma list of expert backends (default: all that run here)")
    parser.add_argument("--permute-backend", default="auto")
    parser.add_argument("--skip-hf", action="store_true", help="do not time transformers' block")
    parser.add_argument("--skip-layer", action="store_true", help="time no layer rows (only --expert-shapes)")
    parser.add_argument("--expert-shapes", action="store_true", help="add the experts-alone rows per model shape")
    parser.add_argument("--shape-tokens", default="512,4096,16384", help="comma list of T for --expert-shapes")
    parser.add_argument("--shape-names", default=None,
                        help=f"comma list of the --expert-shapes to run (default: all of {list(EXPERT_SHAPES)})")
    parser.add_argument("--json", default=None, help="write results as JSON to this path ('-' for stdout)")
    parser.add_argument("--qwen3-moe", action="store_true",
                        help="the Qwen3-MoE shape instead (H 2048, 128 experts, top-8, moe_intermediate 768)")
    parser.add_argument("--no-graphed", action="store_true", help="skip the capacity-mode / CUDA-graph rows")
    parser.add_argument("--no-fp8", action="store_true", help="skip the fused experts' fp8 rows")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_mixtral_layer: needs a CUDA GPU (none found); nothing to measure.")
        return 0
    if args.qwen3_moe:
        return bench_qwen3_moe(args)

    import transformers
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from moe_dispatch.models.mixtral import NVMixtralConfig, NVMixtralSparseMoeBlock

    T, H, I, E, K = args.tokens, args.hidden, args.ffn, args.experts, args.topk
    fields = dict(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K, num_hidden_layers=1)
    hf_block, x = hf_block_and_input(MixtralSparseMoeBlock, MixtralConfig(**fields), T, H)
    tflops = matmul_tflops(args.warmup, args.iters)
    bound = gemm_bound(T, K, H, I, tflops)

    # Reference output: HF's block with its router in fp32 like ours (HF's bf16 router logits
    # flip near-tied top-k choices, which says nothing about the rest of the layer).
    hf_forward = hf_block.gate.forward
    hf_block.gate.forward = _fp32_router(hf_block.gate)
    with torch.no_grad():
        hf_out = hf_block(x.clone())
    hf_block.gate.forward = hf_forward

    rows = []
    if not args.skip_hf and not args.skip_layer:
        fwd, fwd_bwd, peak = timed_pair(lambda t: hf_block(t), x, list(hf_block.parameters()), args.warmup, args.iters)
        with torch.no_grad():  # HF as shipped (bf16 router) against the fp32-routed reference
            err = rel_err(hf_block(x.clone()), hf_out)
        rows.append({"name": "hf", "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_gb": peak, "rel_err_vs_hf": err})

    backends = args.backends.split(",") if args.backends else available_backends()
    config = NVMixtralConfig(**fields, permute_backend=args.permute_backend)
    for backend in ([] if args.skip_layer else backends):
        with torch.device("cuda"):
            block = NVMixtralSparseMoeBlock(config, expert_backend=backend)
        block = block.to(torch.bfloat16)  # the router gate stays fp32
        with torch.no_grad():
            copy_hf_weights_(block, hf_block)
            out = block(x).hidden_states
        err = rel_err(out, hf_out)
        fwd, fwd_bwd, peak = timed_pair(lambda t: block(t).hidden_states, x, list(block.parameters()), args.warmup,
                                        args.iters)
        rows.append({"name": f"ours[{backend}]", "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_gb": peak,
                     "rel_err_vs_hf": err})

        # the experts stage alone, on the rows this routing dispatches
        with torch.no_grad():
            selected, weights, _ = block.router(x.view(T, H).float())
            dispatched = block.dispatcher.dispatch(x.view(T, H), selected, weights)
        rows_in, counts = dispatched.expert_input.contiguous(), dispatched.tokens_per_expert
        fwd, fwd_bwd, peak = timed_pair(lambda t: block.experts(t, counts), rows_in,
                                        list(block.experts.parameters()), args.warmup, args.iters)
        rows.append({"name": f"experts[{backend}]", "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_gb": peak,
                     "rel_err_vs_hf": None})
        if backend == "fused":  # the experts from tokens to combined tokens, gather / scatter fused or not
            rows += fused_token_rows(x.view(T, H), selected, weights, block.experts.experts_gate_up_weight,
                                     block.experts.experts_down_weight, args.warmup, args.iters)
            if not args.no_fp8:
                rows += fused_fp8_rows(x.view(T, H), selected, weights, block.experts.experts_gate_up_weight,
                                       block.experts.experts_down_weight, args.warmup, args.iters,
                                       ref=hf_out.view(T, H))
        del block, dispatched, rows_in
        torch.cuda.empty_cache()

    if not args.no_graphed and not args.skip_layer and "grouped_mm" in available_backends():
        rows += graphed_rows(config, hf_block, x, hf_out, args)

    hf_row = rows[0] if rows and rows[0]["name"] == "hf" else None
    for row in rows:
        row["fwd_vs_bound"] = row["fwd_ms"] / bound["fwd"]
        row["fwd_bwd_vs_bound"] = row["fwd_bwd_ms"] / bound["fwd_bwd"]
        if hf_row is not None and not row["name"].startswith(("experts[", "tokens[")):
            row["fwd_speedup_vs_hf"] = hf_row["fwd_ms"] / row["fwd_ms"]
            row["fwd_bwd_speedup_vs_hf"] = hf_row["fwd_bwd_ms"] / row["fwd_bwd_ms"]

    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "shape": {"tokens": T, "hidden": H, "ffn": I, "experts": E, "top_k": K, "dtype": "bf16"},
        "matmul_tflops": tflops, "bound_ms": bound, "rows": rows,
    }
    print(f"{result['device']}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"T={T} H={H} I={I} E={E} top-{K} bf16; bf16 matmul {tflops:.0f} TFLOP/s; "
          f"bound fwd {bound['fwd']:.2f} ms, fwd+bwd {bound['fwd_bwd']:.2f} ms")
    header = (f"{'row':<32}{'fwd ms':>9}{'x bound':>9}{'vs hf':>8}{'fwd+bwd ms':>12}{'x bound':>9}{'vs hf':>8}"
              f"{'rel err':>10}{'peak GB':>9}")
    print(header)
    print("-" * len(header))
    def speedup(row, key):
        return f"{row[key]:.2f}x" if key in row else ""

    for row in rows:
        err = "" if row["rel_err_vs_hf"] is None else f"{row['rel_err_vs_hf']:.1e}"
        print(f"{row['name']:<32}{row['fwd_ms']:>9.2f}{row['fwd_vs_bound']:>9.2f}{speedup(row, 'fwd_speedup_vs_hf'):>8}"
              f"{row['fwd_bwd_ms']:>12.2f}{row['fwd_bwd_vs_bound']:>9.2f}{speedup(row, 'fwd_bwd_speedup_vs_hf'):>8}"
              f"{err:>10}{row['peak_gb']:>9.2f}")
    if args.expert_shapes:
        from moe_dispatch.bench.limits import hbm_copy_gbps

        hbm = hbm_copy_gbps(torch.cuda.current_device())
        print(f"\nexperts alone per model shape; bf16 matmul {tflops:.0f} TFLOP/s, HBM copy {hbm:.0f} GB/s; "
              "bound = max(FLOPs / matmul, weight bytes / HBM)")
        shape_rows = expert_shape_rows([int(t) for t in args.shape_tokens.split(",")], backends, tflops, hbm,
                                       args.warmup, args.iters,
                                       args.shape_names.split(",") if args.shape_names else None,
                                       fp8=not args.no_fp8)
        result["hbm_gbps"], result["expert_shapes"] = hbm, shape_rows
    write_json(args.json, result)
    return 0


def bench_qwen3_moe(args) -> int:
    """The Qwen3-MoE row: ``NVQwen3MoeSparseMoeBlock`` (each expert backend) vs transformers'
    ``Qwen3MoeSparseMoeBlock`` (norm_topk_prob, as Qwen3-30B-A3B), fwd and fwd+bwd, and the
    grouped-GEMM bound from the matmul rate of this run. ``--tokens`` and ``--backends`` apply;
    the model shape is fixed."""
    import transformers
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from moe_dispatch.models.common.modeling import default_dispatcher
    from moe_dispatch.models.qwen3_moe import NVQwen3MoeConfig, NVQwen3MoeSparseMoeBlock

    T, H, I, E, K = args.tokens, 2048, 768, 128, 8
    fields = dict(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
                  num_hidden_layers=1)
    hf_block, x = hf_block_and_input(Qwen3MoeSparseMoeBlock, Qwen3MoeConfig(**fields), T, H)
    tflops = matmul_tflops(args.warmup, args.iters)
    bound = gemm_bound(T, K, H, I, tflops)

    shipped = hf_block.gate.forward
    hf_block.gate.forward = _fp32_router(hf_block.gate)  # the reference routes in fp32, as ours
    with torch.no_grad():
        hf_out = hf_block(x.clone())
    hf_block.gate.forward = shipped
    rows = []
    if not args.skip_hf:
        fwd, fwd_bwd, peak = timed_pair(lambda t: hf_block(t), x, list(hf_block.parameters()), args.warmup, args.iters)
        with torch.no_grad():
            rows.append({"name": "hf", "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_gb": peak,
                         "rel_err_vs_hf": rel_err(hf_block(x.clone()), hf_out)})
    config = NVQwen3MoeConfig(**fields, permute_backend=args.permute_backend)
    for backend in (args.backends.split(",") if args.backends else available_backends()):
        with torch.device("cuda"):
            block = NVQwen3MoeSparseMoeBlock(config, default_dispatcher(config), expert_backend=backend)
        block = block.to(torch.bfloat16)  # the router gate stays fp32
        with torch.no_grad():
            copy_hf_weights_(block, hf_block)
            err = rel_err(block(x).hidden_states, hf_out)
        fwd, fwd_bwd, peak = timed_pair(lambda t: block(t).hidden_states, x, list(block.parameters()), args.warmup,
                                        args.iters)
        rows.append({"name": f"ours[{backend}]", "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_gb": peak,
                     "rel_err_vs_hf": err})
        del block
        torch.cuda.empty_cache()

    hf_row = rows[0] if rows and rows[0]["name"] == "hf" else None
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"Qwen3-MoE layer T={T} H={H} moe_intermediate={I} E={E} top-{K} bf16; bf16 matmul {tflops:.0f} TFLOP/s; "
          f"grouped-GEMM bound fwd {bound['fwd']:.2f} ms, fwd+bwd {bound['fwd_bwd']:.2f} ms")
    for row in rows:
        row["fwd_vs_bound"], row["fwd_bwd_vs_bound"] = row["fwd_ms"] / bound["fwd"], row["fwd_bwd_ms"] / bound["fwd_bwd"]
        if hf_row is not None:
            row["fwd_speedup_vs_hf"] = hf_row["fwd_ms"] / row["fwd_ms"]
            row["fwd_bwd_speedup_vs_hf"] = hf_row["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        print(f"{row['name']:<18} fwd {row['fwd_ms']:8.2f} ms ({row['fwd_vs_bound']:.2f}x bound, "
              f"{row.get('fwd_speedup_vs_hf', float('nan')):.2f}x hf)  fwd+bwd {row['fwd_bwd_ms']:8.2f} ms "
              f"({row['fwd_bwd_vs_bound']:.2f}x bound, {row.get('fwd_bwd_speedup_vs_hf', float('nan')):.2f}x hf)  "
              f"rel err {row['rel_err_vs_hf']:.1e}  peak {row['peak_gb']:.2f} GB")
    write_json(args.json, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "model": "qwen3_moe",
                           "shape": {"tokens": T, "hidden": H, "moe_intermediate": I, "experts": E, "top_k": K,
                                     "dtype": "bf16"},
                           "matmul_tflops": tflops, "bound_ms": bound, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
