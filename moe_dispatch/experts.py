"""Stacked SwiGLU experts: the "experts" stage of an MoE layer (route -> dispatch -> **experts** -> combine).

Shape legend (as in :mod:`moe_dispatch.protocol`)::

    R  rows received by this rank, grouped by local expert     H  hidden size
    L  experts local to this rank                              I  expert FFN (intermediate) size

Weights are stacked over local experts so that a later EP wrapper can turn each into a DTensor
``Shard(0)`` over the EP mesh and so one grouped GEMM covers all experts:

- ``experts_gate_up_weight`` ``[L, 2*I, H]``: rows ``[:I]`` are the gate projection (HF ``w1``),
  rows ``[I:]`` the up projection (HF ``w3``); HF transformers 5 ``gate_up_proj`` has this layout.
- ``experts_down_weight`` ``[L, H, I]``: the down projection (HF ``w2`` / ``down_proj``).

Expert ``l`` computes ``down_l(act(gate_l(x)) * up_l(x))`` (``act`` = ``activation``, SiLU by
default: SwiGLU; GELU variants give GeGLU) on rows
``[offset_l, offset_l + tokens_per_expert[l])``, ``offset_l = sum(tokens_per_expert[:l])``.

Backends (``backend=``):

==========  ===================================================  ===========================
backend     what                                                 where
==========  ===================================================  ===========================
grouped_mm  ``torch._grouped_mm`` with int32 cumulative offsets   CUDA, bf16, sm90+; no sync
te          TransformerEngine ``GroupedLinear`` (FP8 / FP4 under  CUDA with TE installed;
            ``te.autocast``), fed views of the stacked weights    one host sync (m_splits)
loop        one ``F.linear`` pair per expert (the reference)     any device and dtype; one
                                                                 host sync
fused       Triton grouped GEMMs, the gate activation fused      CUDA (or CPU under
            into gate+up (:mod:`moe_dispatch.experts_fused`);    ``TRITON_INTERPRET=1``);
            every activation of :data:`ACTIVATIONS`              bf16/fp16/fp32; no sync
==========  ===================================================  ===========================

``"auto"`` picks ``grouped_mm`` on CUDA for bf16 inputs when it can run there, else ``loop``
(decided per call from the input). At import this module imports only :mod:`moe_dispatch._optional` of the
package; the fused backend imports :mod:`moe_dispatch.experts_fused` when it is built or run.

Expert parallelism may turn both stacked weights into DTensor parameters (``Shard(0)`` over the
EP mesh, see ``moe_dispatch.parallel``); every backend then computes on the local
shard (``to_local()``, differentiable: the gradient comes back as a ``Shard(0)`` DTensor).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ._optional import import_transformer_engine  # re-exported: models import it from here

__all__ = ["SwiGLUExperts", "EXPERT_BACKENDS", "ACTIVATIONS", "resolve_expert_backend", "import_transformer_engine"]

EXPERT_BACKENDS = ("grouped_mm", "te", "loop", "fused")


def _gelu_tanh_formula(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


#: Gate activations by their HF ``hidden_act`` names, with HF's numerics (``transformers.activations``).
#: The grouped_mm / te / loop backends apply it between their two GEMMs in PyTorch; the fused
#: backend in its GEMM epilogues (``moe_dispatch.experts_fused.FUSED_ACTIVATIONS``: same formulas
#: in fp32, a new entry here needs one there).
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_tanh_formula,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def _grouped_mm_why_unavailable(x: torch.Tensor, hidden_size: int, intermediate_size: int) -> str | None:
    """None when ``torch._grouped_mm`` can run the SwiGLU GEMMs on ``x``, else the reason."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm (needs torch >= 2.8)"
    if x.device.type != "cuda":
        return f"input is on {x.device}; the grouped_mm backend runs on CUDA"
    if x.dtype != torch.bfloat16:
        return f"input dtype is {x.dtype}; torch._grouped_mm needs bfloat16"
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return "torch._grouped_mm needs compute capability >= 9.0 (H100 or newer)"
    if hidden_size % 8 or intermediate_size % 8:
        return f"hidden ({hidden_size}) and intermediate ({intermediate_size}) sizes must be multiples of 8 (16-byte rows)"
    return None


def resolve_expert_backend(backend: str, x: torch.Tensor, hidden_size: int, intermediate_size: int) -> str:
    """The backend ``backend`` (possibly ``"auto"``) means for input ``x``.

    Raises:
        ValueError: unknown name, or ``grouped_mm`` asked for where it cannot run (with why).
    """
    if backend == "auto":
        return "grouped_mm" if _grouped_mm_why_unavailable(x, hidden_size, intermediate_size) is None else "loop"
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"expert backend must be one of {('auto',) + EXPERT_BACKENDS}, got {backend!r}")
    if backend == "fused" and x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"expert backend 'fused' runs on CUDA (or on CPU under TRITON_INTERPRET=1); input is on {x.device}")
    if backend == "grouped_mm":
        why = _grouped_mm_why_unavailable(x, hidden_size, intermediate_size)
        if why is not None:
            raise ValueError(f"expert backend 'grouped_mm' cannot run here: {why}")
    return backend


def _local_weight(weight: torch.Tensor) -> torch.Tensor:
    """The local ``[L, ...]`` shard of a DTensor weight (differentiable), else ``weight`` itself."""
    to_local = getattr(weight, "to_local", None)  # DTensor, without importing torch.distributed here
    return to_local() if to_local is not None else weight


def _te_quantization_enabled() -> bool:
    """Whether a TE ``autocast`` (FP8 / FP4) region is active."""
    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:  # TE < 2.8
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    return FP8GlobalStateManager.is_fp8_enabled()


class _TEGroupedSwiGLU(nn.Module):
    """Two TE ``GroupedLinear`` modules that own no weights: each forward hands them views of the
    stacked parameters, so the state dict and the DTensor-friendly layout stay those of
    :class:`SwiGLUExperts` whatever the backend. They keep TE's FP8 scaling state (amax history)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype | None,
                 activation: str = "silu") -> None:
        super().__init__()
        te = import_transformer_engine()
        self.act = ACTIVATIONS[activation]
        kwargs = dict(bias=False, device="meta", params_dtype=dtype or torch.get_default_dtype())
        self.gate_up = te.GroupedLinear(num_experts, hidden_size, 2 * intermediate_size, **kwargs)
        self.down = te.GroupedLinear(num_experts, intermediate_size, hidden_size, **kwargs)
        # Quantized grouped GEMMs need each expert's rows padded (16 FP8, 32 MXFP8, 128 NVFP4).
        self.pad, self.unpad = te.Fp8Padding(num_experts), te.Fp8Unpadding(num_experts)
        self.num_experts = num_experts
        for linear in (self.gate_up, self.down):
            for i in range(num_experts):
                del linear._parameters[f"weight{i}"]  # replaced by views of the stacked weight at each call

    @staticmethod
    def _bind(linear: nn.Module, weight_LOI: torch.Tensor) -> None:
        # GroupedLinear reads ``weight{i}`` by attribute; plain tensors in __dict__ shadow nothing.
        for i, w in enumerate(weight_LOI.unbind(0)):
            linear.__dict__[f"weight{i}"] = w

    def forward(self, x_RH, m_splits: list[int], gate_up_weight, down_weight) -> torch.Tensor:
        self._bind(self.gate_up, gate_up_weight)
        self._bind(self.down, down_weight)
        try:
            quantized = _te_quantization_enabled()
            splits = m_splits
            if quantized:
                x_RH, splits = self.pad(x_RH, m_splits)
            gate_up_R2I = self.gate_up(x_RH, splits)
            gate_RI, up_RI = gate_up_R2I.chunk(2, dim=-1)
            out_RH = self.down(self.act(gate_RI) * up_RI, splits)
            return self.unpad(out_RH, m_splits) if quantized else out_RH
        finally:
            for linear in (self.gate_up, self.down):  # drop the views: no reference to the graph
                for i in range(self.num_experts):
                    linear.__dict__.pop(f"weight{i}", None)


class SwiGLUExperts(nn.Module):
    """``L`` SwiGLU experts with stacked weights, applied to expert-grouped rows.

    Args:
        num_experts: L, experts held by this module (the EP rank's local experts).
        hidden_size: H.
        intermediate_size: I.
        backend: ``"auto" | "grouped_mm" | "te" | "loop" | "fused"`` (see the module docstring). ``"te"``
            builds TE modules now and raises ImportError without TransformerEngine.
        activation: gate activation, an HF ``hidden_act`` name in :data:`ACTIVATIONS`
            (default ``"silu"``: SwiGLU).
        fp8: ``None`` or ``"tensor"`` / ``"block"``, backend ``"fused"`` only: both forward GEMMs on
            float8_e4m3fn inputs with fp32 scales, per tensor or blockwise (activations 1 x 128,
            weights 128 x 128), the backward in the input dtype (see
            :func:`moe_dispatch.experts_fused.fused_swiglu_experts`); the weights are quantized at
            every call. For FP8 with TransformerEngine use backend ``"te"`` under ``te.autocast``.
        device, dtype: of the parameters.

    Raises:
        ValueError naming the argument on a bad value.

    Parameters (uninitialised; call :meth:`reset_parameters` or let the model init them):
        experts_gate_up_weight: ``[L, 2*I, H]``, gate rows first, then up rows.
        experts_down_weight: ``[L, H, I]``.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        backend: str = "auto",
        *,
        activation: str = "silu",
        fp8: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if backend != "auto" and backend not in EXPERT_BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + EXPERT_BACKENDS}, got {backend!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} (HF hidden_act names), got {activation!r}")
        if backend == "fused":
            from .experts_fused import FUSED_ACTIVATIONS  # lazy: keeps this module's imports as documented

            if activation not in FUSED_ACTIVATIONS:
                raise ValueError(f"backend 'fused' computes the activations {sorted(FUSED_ACTIVATIONS)} in its "
                                 f"kernels, got activation={activation!r}")
        if fp8 is not None:
            if backend != "fused":
                raise ValueError(f"fp8={fp8!r} needs backend 'fused' (TE's FP8: backend 'te' under te.autocast), "
                                 f"got backend={backend!r}")
            from .experts_fused import FP8_RECIPES

            if fp8 not in FP8_RECIPES:
                raise ValueError(f"fp8 must be None or one of {FP8_RECIPES}, got {fp8!r}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.backend, self.activation, self.fp8 = backend, activation, fp8
        self.act = ACTIVATIONS[activation]
        factory = dict(device=device, dtype=dtype)
        self.experts_gate_up_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.experts_down_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.te_grouped = (_TEGroupedSwiGLU(num_experts, hidden_size, intermediate_size, dtype, activation)
                           if backend == "te" else None)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, backend={self.backend!r}, activation={self.activation!r}"
                + (f", fp8={self.fp8!r}" if self.fp8 else ""))

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) init of both stacked weights (as HF Mixtral)."""
        self.experts_gate_up_weight.normal_(0.0, std)
        self.experts_down_weight.normal_(0.0, std)

    def forward(self, expert_input: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Apply expert ``l`` to its group of rows.

        Args:
            expert_input: ``[R, H]`` rows grouped by local expert (``DispatchOutput.expert_input``).
                Rows past ``tokens_per_expert.sum()`` are padding; their output is unspecified
                (zero for ``loop`` and ``te``) and combine ignores them.
            tokens_per_expert: integer ``[L]``, rows of each expert, on ``expert_input``'s device.

        Returns:
            ``[R, H]`` in ``expert_input``'s dtype.
        """
        if expert_input.dim() != 2 or expert_input.shape[1] != self.hidden_size:
            raise ValueError(f"expert_input must be [R, {self.hidden_size}], got {tuple(expert_input.shape)}")
        if tokens_per_expert.dim() != 1 or tokens_per_expert.shape[0] != self.num_experts:
            raise ValueError(f"tokens_per_expert must be [{self.num_experts}], got {tuple(tokens_per_expert.shape)}")
        backend = "te" if self.backend == "te" else resolve_expert_backend(
            self.backend, expert_input, self.hidden_size, self.intermediate_size)
        if backend == "grouped_mm":
            return self._forward_grouped_mm(expert_input, tokens_per_expert)
        if backend == "fused":
            from .experts_fused import fused_swiglu_experts  # lazy: imports triton
            return fused_swiglu_experts(expert_input, tokens_per_expert, _local_weight(self.experts_gate_up_weight),
                                        _local_weight(self.experts_down_weight), activation=self.activation,
                                        fp8=self.fp8)
        counts = [int(c) for c in tokens_per_expert.tolist()]  # host sync: per-expert row counts
        if backend == "te":
            return self._forward_te(expert_input, counts)
        return self._forward_loop(expert_input, counts)

    def forward_tokens(self, hidden_states: torch.Tensor, selected_experts: torch.Tensor,
                       routing_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Tokens to combined tokens in one pass on one rank, for the ``"fused"`` backend (rows read
        through the routing index in the first GEMM, ``w * y`` added into the token rows in the
        last): ``(out [N, H] in hidden_states' dtype, tokens_per_expert int64 [L])``. None for the
        other backends (use a dispatcher). ``selected_experts`` int ``[N, K]`` in ``[-1, L)``,
        ``routing_weights`` ``[N, K]``: see :func:`moe_dispatch.experts_fused.fused_moe_experts`."""
        if self.backend != "fused":
            return None
        from .experts_fused import fused_moe_experts  # lazy: imports triton
        return fused_moe_experts(hidden_states, selected_experts, routing_weights,
                                 _local_weight(self.experts_gate_up_weight), _local_weight(self.experts_down_weight),
                                 return_counts=True, activation=self.activation, fp8=self.fp8)

    # --- backends ---------------------------------------------------------------------------------
    def _forward_grouped_mm(self, x_RH: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if x_RH.shape[0] == 0:
            return x_RH.new_empty(0, self.hidden_size)
        offsets_L = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)  # end row of each expert, no sync
        w_gate_up = _local_weight(self.experts_gate_up_weight).to(x_RH.dtype)
        w_down = _local_weight(self.experts_down_weight).to(x_RH.dtype)
        gate_up_R2I = torch._grouped_mm(x_RH, w_gate_up.transpose(-2, -1), offs=offsets_L)
        gate_RI, up_RI = gate_up_R2I.chunk(2, dim=-1)
        return torch._grouped_mm(self.act(gate_RI) * up_RI, w_down.transpose(-2, -1), offs=offsets_L)

    def _forward_te(self, x_RH: torch.Tensor, counts: list[int]) -> torch.Tensor:
        used = sum(counts)
        out_RH = self.te_grouped(x_RH[:used], counts, _local_weight(self.experts_gate_up_weight),
                                 _local_weight(self.experts_down_weight))
        if used < x_RH.shape[0]:
            out_RH = torch.cat([out_RH, out_RH.new_zeros(x_RH.shape[0] - used, self.hidden_size)])
        return out_RH

    def _forward_loop(self, x_RH: torch.Tensor, counts: list[int]) -> torch.Tensor:
        w_gate_up = _local_weight(self.experts_gate_up_weight).to(x_RH.dtype)
        w_down = _local_weight(self.experts_down_weight).to(x_RH.dtype)
        outputs, start = [], 0
        for expert, count in enumerate(counts):
            # Experts with no rows still run (on 0 rows) so every weight is in the graph.
            x_TH = x_RH[start:start + count]
            gate_TI, up_TI = F.linear(x_TH, w_gate_up[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(self.act(gate_TI) * up_TI, w_down[expert]))
            start += count
        if start < x_RH.shape[0]:
            outputs.append(x_RH.new_zeros(x_RH.shape[0] - start, self.hidden_size))
        return torch.cat(outputs)
