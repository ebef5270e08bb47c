"""Fused gated experts (SwiGLU by default): Triton grouped GEMMs with the gate activation in the
gate+up GEMM's epilogue (any of :data:`FUSED_ACTIVATIONS`, a constexpr of the kernels), an
optional gather of token rows in its A-operand load and an optional scatter (routing weight
applied, combine fused) in the down GEMM's epilogue; forward and backward as ``torch.library``
custom ops (``register_fake`` + ``register_autograd``: works under ``torch.compile``).

Shape legend::

    N  tokens         H  hidden size       K  top-k       L  experts (local)
    I  expert FFN     R  rows, grouped by expert (R may exceed sum(counts): padding rows)
    S  N * K slots

Forward, per expert ``e`` and row ``r`` of it (3 launches, no host sync)::

    gate+up   h[r] = act(x[src(r)] Wg_e^T) * (x[src(r)] Wu_e^T)       [R, I]  (g | u kept for bwd, h not)
    down      y[r] = h[r] Wd_e^T                                       [R, H]
              or, scatter: out[tok(r)] += w[r] * y[r]   (fp32 atomics)  [N, H]

Backward (4 launches): ``dH = dY Wd_e`` with the gated backward in its epilogue (which also
recomputes h from g | u, and the routing-weight grad ``dw[r] = dout[tok(r)] . y[r]`` as
``sum(dH_unweighted * h)``), ``dX = dGU Wgu_e`` (scatter-added into token rows when gathered),
``dWgu_e = dGU^T X``, ``dWd_e = dY^T H``.

Public entry points: :func:`fused_swiglu_experts` (rows already grouped: the ``"fused"`` backend of
:class:`moe_dispatch.experts.SwiGLUExperts`) and :func:`fused_moe_experts` (tokens + routing in,
combined tokens out: single GPU / EP=1 with no permute copy). Imports nothing else of ours
except the kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["fused_swiglu_experts", "fused_moe_experts", "routing_rows", "FUSED_ACTIVATIONS", "FP8_RECIPES",
           "FP8ExpertWeights", "quantize_expert_weights"]

#: FP8 recipes of the fused experts' forward GEMMs (``fp8=``).
FP8_RECIPES = ("tensor", "block")

#: Gate activations the fused kernels compute in their epilogues, by HF ``hidden_act`` name (every
#: name of :data:`moe_dispatch.experts.ACTIVATIONS`), to the kernels' name. The three tanh forms
#: of GELU are one formula (gelu_fast's constant 0.7978845608 is sqrt(2/pi) in fp32); the kernels
#: compute in fp32 and take tanh as 2 sigmoid(2z) - 1 (absolute error ~1e-7).
FUSED_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu", "relu2": "relu2", "tanh": "tanh",
    "sigmoid": "sigmoid",
}

_TRITON_HINT = "the fused expert backend needs triton (pip install triton)"


def _kernels():
    try:
        from .kernels import grouped_gemm
    except ImportError as err:
        raise ImportError(f"{_TRITON_HINT}; import failed: {err}") from err
    return grouped_gemm


def _fp8_kernels():
    try:
        from .kernels import fp8
    except ImportError as err:
        raise ImportError(f"{_TRITON_HINT}; import failed: {err}") from err
    return fp8


def _down_strides_fwd(w_d: torch.Tensor) -> tuple[int, int, int]:
    """``y = h Wd^T``: element (e, k over I, n over H) of the B operand."""
    return w_d.stride(0), w_d.stride(2), w_d.stride(1)


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("moe_dispatch::fused_experts_fwd", mutates_args=())
def _fused_experts_fwd(
    x: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
    row_token: Optional[torch.Tensor], row_weight: Optional[torch.Tensor],
    num_rows: int, num_out: int, gather: bool, scatter: bool, save: bool, activation: str, fp8: str,
    wgu_q: Optional[torch.Tensor], wgu_s: Optional[torch.Tensor], wd_q: Optional[torch.Tensor],
    wd_s: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, gu)``: ``gu [R, 2I]`` the gate | up pre-activations kept for the backward (empty
    unless ``save``); h [R, I] lives only until the down GEMM has read it.

    ``fp8`` ("" for none, "tensor", "block"): x, h and both weights quantized to e4m3 (the
    weights unless given quantized: ``wgu_q, wgu_s, wd_q, wd_s``), fp32 accumulation, h and gu
    in x's dtype."""
    kernels = _kernels()
    H = w_gate_up.shape[2]
    a_in, b_gu, b_d, gu_scales = x, w_gate_up, w_down, None
    if fp8:
        quant = _fp8_kernels()
        a_in, x_s = quant.quantize_rows(x, fp8, None if gather else counts)
        if wgu_q is None:
            wgu_q, wgu_s = quant.quantize_weight(w_gate_up, fp8)
            wd_q, wd_s = quant.quantize_weight(w_down, fp8)
        b_gu, b_d = wgu_q, wd_q
        gu_scales = kernels.FP8Scales(fp8, x_s, wgu_s)
    h, gu = kernels.gate_up_swiglu(a_in, counts, b_gu, num_rows, row_token=row_token if gather else None,
                                   save_gate_up=save, activation=activation, scales=gu_scales, out_dtype=x.dtype)
    del a_in
    down_scales = None
    if fp8:
        h, h_s = quant.quantize_rows(h, fp8, counts)
        # w_down [L, H, I]: the down GEMM's B element (e, k over I, n over H); scale block (e, n, k)
        down_scales = kernels.FP8Scales(fp8, h_s, wd_s, (wd_s.stride(0), wd_s.stride(2), wd_s.stride(1))
                                        if fp8 == "block" else (0, 0, 0))
    if scatter:
        out32 = torch.zeros(num_out, H, device=x.device, dtype=torch.float32)
        kernels.rows_gemm(h, counts, b_d, _down_strides_fwd(b_d), H, out32, num_rows, epilogue=kernels.EPI_SCATTER,
                          row_token=row_token, row_weight=row_weight, scales=down_scales)
        del h
        out = out32.to(x.dtype)
    else:
        out = torch.empty(num_rows, H, device=x.device, dtype=x.dtype)
        kernels.rows_gemm(h, counts, b_d, _down_strides_fwd(b_d), H, out, num_rows, scales=down_scales)
    return out, (gu if save else x.new_empty(0))


@_fused_experts_fwd.register_fake
def _(x, counts, w_gate_up, w_down, row_token, row_weight, num_rows, num_out, gather, scatter, save, activation, fp8,
      wgu_q, wgu_s, wd_q, wd_s):
    H, I = w_gate_up.shape[2], w_down.shape[2]
    out = x.new_empty(num_out if scatter else num_rows, H)
    return out, x.new_empty((num_rows, 2 * I) if save else (0,))


@torch.library.custom_op("moe_dispatch::fused_experts_bwd", mutates_args=())
def _fused_experts_bwd(
    dout: torch.Tensor, x: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
    row_token: Optional[torch.Tensor], row_weight: Optional[torch.Tensor], gu: torch.Tensor,
    num_rows: int, gather: bool, scatter: bool, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four backward GEMMs, ordered for peak memory: every buffer is freed as soon as its last
    reader has run, and the largest results (the weight grads) are allocated last (see
    benchmarks/NOTES_fused_experts.md, "Peak memory")."""
    kernels = _kernels()
    L, two_i, H = w_gate_up.shape
    I = two_i // 2
    dout = dout.contiguous()
    # Gathered rows are copied once here ([R, H] each, a few % of the GEMMs' time): the GEMMs on
    # plain rows are the fastest ones (and torch._grouped_mm can be a candidate for them).
    dout_rows = dout.index_select(0, row_token) if scatter else dout
    # dH = dY Wd_e (B element (e, k over H, n over I)), SwiGLU backward fused -> dGU [R, 2I], and
    # h = silu(g) * u recomputed from the saved g | u for the down weight's grad
    dgu = torch.empty(num_rows, two_i, device=x.device, dtype=x.dtype)
    h = torch.empty(num_rows, I, device=x.device, dtype=x.dtype)
    d_row_weight = kernels.rows_gemm(
        dout_rows, counts, w_down, (w_down.stride(0), w_down.stride(1), w_down.stride(2)), I, dgu, num_rows,
        epilogue=kernels.EPI_SWIGLU_BWD, row_weight=row_weight if scatter else None, gate_up=gu, h_out=h,
        activation=activation)
    # dY = w * dout[tok] when scattered (fp32 product, rounded once)
    dy_rows = (dout_rows.float() * row_weight[:, None]).to(x.dtype) if scatter else dout
    del dout_rows
    # dX = dGU Wgu_e (B element (e, k over 2I, n over H))
    gu_strides = (w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2))
    if gather:
        dx32 = torch.zeros(x.shape[0], H, device=x.device, dtype=torch.float32)
        kernels.rows_gemm(dgu, counts, w_gate_up, gu_strides, H, dx32, num_rows,
                          epilogue=kernels.EPI_SCATTER, row_token=row_token)
        dx = dx32.to(x.dtype)
        del dx32
    else:
        dx = torch.empty_like(x)
        kernels.rows_gemm(dgu, counts, w_gate_up, gu_strides, H, dx, num_rows)
    # dWgu_e = dGU_e^T X_e, then dGU is dropped before the down weight's grad is allocated
    x_rows = x.index_select(0, row_token) if gather else x
    dw_gate_up = kernels.expert_weight_grad(dgu, x_rows, counts, num_rows)
    del dgu, x_rows
    # dWd_e = dY_e^T H_e
    dw_down = kernels.expert_weight_grad(dy_rows, h, counts, num_rows)
    if d_row_weight is None:
        d_row_weight = x.new_empty(0, dtype=torch.float32)
    return dx, dw_gate_up, dw_down, d_row_weight


@_fused_experts_bwd.register_fake
def _(dout, x, counts, w_gate_up, w_down, row_token, row_weight, gu, num_rows, gather, scatter, activation):
    return (torch.empty_like(x), torch.empty_like(w_gate_up), torch.empty_like(w_down),
            x.new_empty(num_rows if scatter else 0, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    (x, counts, w_gate_up, w_down, row_token, row_weight, num_rows, num_out, gather, scatter, save, activation,
     *_fp8) = inputs
    _, gu = output
    # gu is kept for the backward only: no gradient flows into it, and autograd must not build
    # a zero [R, 2I] gradient for it (materialised grads would cost R x 2I at every backward).
    ctx.mark_non_differentiable(gu)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, counts, w_gate_up, w_down, row_token, row_weight, gu)
    ctx.flags = (num_rows, gather, scatter, save, activation)


def _backward(ctx, dout, _dgu):
    x, counts, w_gate_up, w_down, row_token, row_weight, gu = ctx.saved_tensors
    num_rows, gather, scatter, save, activation = ctx.flags
    if dout is None:  # out took no part in the loss
        return (None,) * 17
    if not save:
        raise RuntimeError("fused experts: backward through a forward run without saving (grad was disabled)")
    dx, dwgu, dwd, drw = _fused_experts_bwd(dout, x, counts, w_gate_up, w_down, row_token, row_weight, gu,
                                            num_rows, gather, scatter, activation)
    return (dx, None, dwgu, dwd, None, (drw if scatter else None)) + (None,) * 11


_fused_experts_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _check_weights(w_gate_up: torch.Tensor, w_down: torch.Tensor, hidden: int) -> tuple[int, int]:
    if w_gate_up.dim() != 3 or w_gate_up.shape[1] % 2 or w_gate_up.shape[2] != hidden:
        raise ValueError(f"w_gate_up must be [L, 2*I, {hidden}], got {tuple(w_gate_up.shape)}")
    L, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (L, hidden, I):
        raise ValueError(f"w_down must be [{L}, {hidden}, {I}], got {tuple(w_down.shape)}")
    return L, I


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"input dtype must be bfloat16, float16 or float32, got {x.dtype}")


def _kernel_activation(activation: str) -> str:
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(FUSED_ACTIVATIONS)} (HF hidden_act names), "
                         f"got {activation!r}")
    return FUSED_ACTIVATIONS[activation]


def _needs_save(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@dataclass(frozen=True)
class FP8ExpertWeights:
    """Both stacked expert weights quantized to float8_e4m3fn (:func:`quantize_expert_weights`).

    Attributes:
        recipe: ``"tensor"`` or ``"block"``.
        gate_up: ``[L, 2I, H]`` e4m3; gate_up_scale: fp32 ``[L]`` ("tensor") or
            ``[L, ceil(2I / 128), ceil(H / 128)]`` ("block", 128 x 128 blocks).
        down: ``[L, H, I]`` e4m3; down_scale: fp32 ``[L]`` or ``[L, ceil(H / 128), ceil(I / 128)]``.
    """

    recipe: str
    gate_up: torch.Tensor
    gate_up_scale: torch.Tensor
    down: torch.Tensor
    down_scale: torch.Tensor


def _check_fp8(fp8: str | None, fp8_weights: FP8ExpertWeights | None, w_gate_up: torch.Tensor,
               w_down: torch.Tensor) -> str:
    """The recipe (``""``: none) from ``fp8`` and ``fp8_weights``, checked."""
    if fp8_weights is not None:
        if not isinstance(fp8_weights, FP8ExpertWeights):
            raise TypeError(f"fp8_weights must be an FP8ExpertWeights, got {type(fp8_weights).__name__}")
        if fp8 is not None and fp8 != fp8_weights.recipe:
            raise ValueError(f"fp8={fp8!r} but fp8_weights were quantized with recipe {fp8_weights.recipe!r}")
        if (fp8_weights.gate_up.shape != w_gate_up.shape or fp8_weights.down.shape != w_down.shape
                or fp8_weights.gate_up.device != w_gate_up.device):
            raise ValueError(f"fp8_weights must quantize these weights: gate_up {tuple(w_gate_up.shape)}, down "
                             f"{tuple(w_down.shape)} on {w_gate_up.device}, got {tuple(fp8_weights.gate_up.shape)}, "
                             f"{tuple(fp8_weights.down.shape)} on {fp8_weights.gate_up.device}")
        fp8 = fp8_weights.recipe
    if fp8 is not None and fp8 not in FP8_RECIPES:
        raise ValueError(f"fp8 must be None or one of {FP8_RECIPES}, got {fp8!r}")
    return fp8 or ""


def quantize_expert_weights(w_gate_up: torch.Tensor, w_down: torch.Tensor, recipe: str) -> FP8ExpertWeights:
    """Both stacked weights to float8_e4m3fn with fp32 power-of-two scales (not differentiable).

    The fp8 experts quantize their weights at every call unless given these (``fp8_weights=``):
    quantize once where the weights do not change between calls (inference, micro-batches of one
    optimizer step) and quantize again after every update of the weights.

    Args:
        w_gate_up: ``[L, 2I, H]`` bf16 / fp16 / fp32; w_down: ``[L, H, I]`` (same dtype).
        recipe: ``"tensor"`` (one scale per expert weight) or ``"block"`` (128 x 128 blocks).

    Raises:
        ValueError on a bad recipe or shapes; TypeError on a bad dtype.
    """
    if recipe not in FP8_RECIPES:
        raise ValueError(f"recipe must be one of {FP8_RECIPES}, got {recipe!r}")
    _check_dtype(w_gate_up)
    _check_weights(w_gate_up, w_down, w_gate_up.shape[2] if w_gate_up.dim() == 3 else -1)
    quant = _fp8_kernels()
    with torch.no_grad():
        gu_q, gu_s = quant.quantize_weight(w_gate_up.detach().contiguous(), recipe)
        d_q, d_s = quant.quantize_weight(w_down.detach().to(w_gate_up.dtype).contiguous(), recipe)
    return FP8ExpertWeights(recipe, gu_q, gu_s, d_q, d_s)


def _fp8_weight_args(fp8_weights: FP8ExpertWeights | None) -> tuple:
    if fp8_weights is None:
        return None, None, None, None
    return fp8_weights.gate_up, fp8_weights.gate_up_scale, fp8_weights.down, fp8_weights.down_scale


def fused_swiglu_experts(
    x_RH: torch.Tensor, tokens_per_expert: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, *,
    activation: str = "silu", fp8: str | None = None, fp8_weights: FP8ExpertWeights | None = None,
) -> torch.Tensor:
    """Gated experts (``down(act(gate(x)) * up(x))``, SwiGLU by default) on expert-grouped rows
    (``DispatchOutput.expert_input``), differentiable.

    Args:
        x_RH: ``[R, H]`` bf16 / fp16 / fp32, rows of expert 0, then 1, ...; rows past
            ``tokens_per_expert.sum()`` are padding (their output is zero, their grad zero).
        tokens_per_expert: integer ``[L]`` on ``x_RH``'s device, non-negative, summing to <= R.
        w_gate_up: ``[L, 2I, H]`` (gate rows, then up rows); cast to ``x_RH``'s dtype.
        w_down: ``[L, H, I]``; cast to ``x_RH``'s dtype.
        activation: ``act``, a name of :data:`FUSED_ACTIVATIONS` (HF ``hidden_act``), computed in
            fp32 in the gate+up GEMM's epilogue and its derivative in the dH GEMM's.
        fp8: None, or the FP8 recipe of both forward GEMMs: ``"tensor"`` or ``"block"``. The GEMM
            inputs (x, h and both weights) are quantized to float8_e4m3fn with fp32 power-of-two
            scales (:mod:`moe_dispatch.kernels.fp8`): ``"tensor"`` one scale per activation tensor
            and per expert weight, applied in the epilogue; ``"block"`` activations 1 x 128 along
            K, weights 128 x 128 (DeepSeek-V3), applied at every K step. fp32 accumulation; h and
            the kept g | u in x's dtype. The backward runs in x's dtype from the saved x, g | u
            (the fp8 forward's) and the unquantized weights: the gradient of the high-precision
            function at the fp8 forward's activations (quantization as a straight-through
            estimator).
        fp8_weights: the weights already quantized (:func:`quantize_expert_weights` of these
            weights, in x's dtype); implies its recipe. None: quantized at this call.

    Returns:
        ``[R, H]`` in ``x_RH``'s dtype.

    Raises:
        ValueError / TypeError on bad shapes, dtypes, activation or fp8 arguments.
    """
    act = _kernel_activation(activation)
    recipe = _check_fp8(fp8, fp8_weights, w_gate_up, w_down)
    _check_dtype(x_RH)
    if x_RH.dim() != 2:
        raise ValueError(f"x_RH must be [R, H], got {tuple(x_RH.shape)}")
    L, _ = _check_weights(w_gate_up, w_down, x_RH.shape[1])
    if tokens_per_expert.shape != (L,) or tokens_per_expert.is_floating_point():
        raise ValueError(f"tokens_per_expert must be an integer [{L}] tensor, got {tokens_per_expert.dtype} "
                         f"{tuple(tokens_per_expert.shape)}")
    w_gate_up = w_gate_up.to(x_RH.dtype).contiguous()
    w_down = w_down.to(x_RH.dtype).contiguous()
    x_RH = x_RH.contiguous()
    R = x_RH.shape[0]
    save = _needs_save(x_RH, w_gate_up, w_down)
    out, _ = _fused_experts_fwd(x_RH, tokens_per_expert, w_gate_up, w_down, None, None, R, R, False, False, save,
                                act, recipe, *_fp8_weight_args(fp8_weights))
    return out


def routing_rows(selected_experts_NK: torch.Tensor, routing_weights_NK: torch.Tensor, num_experts: int):
    """Expert-grouped rows of a routing, as index arrays (no token copy, no host sync).

    Rows are the S = N*K slots sorted by expert (stable: (token, k) order inside an expert);
    dropped slots (-1) sort last and are padding rows.

    Returns:
        ``(counts [L] int64, row_token [S] int32, row_weight [S] fp32)``: rows per expert, the token
        each row reads, and its routing weight (0 on padding rows; differentiable).

    Example, K=2, L=3: ``selected = [[2, 0], [0, -1], [2, 1]]`` -> slots sorted by expert
    ``(0,1) (1,0) | (2,1) | (0,0) (2,0) | (1,1)``: counts ``[2, 1, 2]``, row_token
    ``[0, 1, 2, 0, 2, 1]`` (the last row is padding).
    """
    N, K = selected_experts_NK.shape
    flat = selected_experts_NK.reshape(-1).long()
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    # scatter_add, not bincount: CUDA bincount syncs to size its output
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key.device).scatter_add_(
        0, key, torch.ones_like(key))[:num_experts]
    row_token = (order // K).to(torch.int32)
    weight = routing_weights_NK.reshape(-1).float()
    row_weight = torch.where(key[order] < num_experts, weight[order], weight.new_zeros(()))
    return counts, row_token, row_weight


def fused_moe_experts(
    x_NH: torch.Tensor, selected_experts_NK: torch.Tensor, routing_weights_NK: torch.Tensor,
    w_gate_up: torch.Tensor, w_down: torch.Tensor, *, gather: bool = True, scatter: bool = True,
    check_ids: bool = True, return_counts: bool = False, activation: str = "silu", fp8: str | None = None,
    fp8_weights: FP8ExpertWeights | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Single-GPU / EP=1 MoE experts from tokens to combined tokens, differentiable (w.r.t. tokens,
    both weights and the routing weights).

    ``out[n] = sum_k w[n, k] * expert_{e[n, k]}(x[n])`` (slots with ``e = -1`` contribute zero).

    Args:
        x_NH: ``[N, H]`` bf16 / fp16 / fp32 tokens.
        selected_experts_NK: integer ``[N, K]`` in ``[-1, L)``.
        routing_weights_NK: floating ``[N, K]`` (applied in fp32).
        w_gate_up: ``[L, 2I, H]``; w_down: ``[L, H, I]`` (cast to x's dtype).
        gather: read token rows through the routing index inside the gate+up GEMM (no permuted
            copy); False makes the ``[S, H]`` copy first (for measuring the difference).
        scatter: add each row's ``w * y`` into its token inside the down GEMM (fp32 atomics);
            False writes ``y [S, H]`` and combines with ``index_add``.
        check_ids: check the expert ids on the host (one sync); False for ids known valid
            (a router's output).
        return_counts: also return the rows per expert (int64 ``[L]``).
        activation: the gate activation (see :func:`fused_swiglu_experts`).
        fp8, fp8_weights: FP8 forward GEMMs (see :func:`fused_swiglu_experts`); the tokens are
            quantized once (per-tensor: one scale for all N tokens; blockwise: per token and 128
            columns) and read through the routing index.

    Returns:
        ``[N, H]`` in x's dtype (and ``counts [L]`` with ``return_counts``).

    Raises:
        ValueError / TypeError on bad shapes, dtypes, activation, fp8 arguments or (``check_ids``)
        expert ids.
    """
    act = _kernel_activation(activation)
    recipe = _check_fp8(fp8, fp8_weights, w_gate_up, w_down)
    _check_dtype(x_NH)
    if x_NH.dim() != 2:
        raise ValueError(f"x_NH must be [N, H], got {tuple(x_NH.shape)}")
    L, _ = _check_weights(w_gate_up, w_down, x_NH.shape[1])
    N = x_NH.shape[0]
    if selected_experts_NK.dim() != 2 or selected_experts_NK.shape[0] != N or selected_experts_NK.is_floating_point():
        raise ValueError(f"selected_experts_NK must be an integer [{N}, K] tensor, got {selected_experts_NK.dtype} "
                         f"{tuple(selected_experts_NK.shape)}")
    if routing_weights_NK.shape != selected_experts_NK.shape or not routing_weights_NK.is_floating_point():
        raise ValueError(f"routing_weights_NK must be floating {tuple(selected_experts_NK.shape)}, got "
                         f"{routing_weights_NK.dtype} {tuple(routing_weights_NK.shape)}")
    if check_ids and selected_experts_NK.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(selected_experts_NK)).tolist()  # host sync: id check
        if lo < -1 or hi >= L:
            raise ValueError(f"selected_experts_NK must be in [-1, {L}), got values in [{lo}, {hi}]")
    counts, row_token, row_weight = routing_rows(selected_experts_NK, routing_weights_NK, L)
    w_gate_up = w_gate_up.to(x_NH.dtype).contiguous()
    w_down = w_down.to(x_NH.dtype).contiguous()
    x_NH = x_NH.contiguous()
    S = row_token.shape[0]
    x_in = x_NH if gather else x_NH.index_select(0, row_token)
    save = _needs_save(x_NH, w_gate_up, w_down, row_weight)
    out, _ = _fused_experts_fwd(x_in, counts, w_gate_up, w_down, row_token, row_weight, S, N, gather, scatter,
                                save, act, recipe, *_fp8_weight_args(fp8_weights))
    if not scatter:
        combined = torch.zeros(N, x_NH.shape[1], device=x_NH.device, dtype=torch.float32)
        out = combined.index_add(0, row_token.long(), out.float() * row_weight[:, None]).to(x_NH.dtype)
    return (out, counts) if return_counts else out
