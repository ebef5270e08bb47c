"""The fields every NV model config adds to its transformers config (dispatch, precision, layout).

A model's config is ``class NVXConfig(NVMoEConfigFields, XConfig)`` with ``experts_field`` naming
the HF field that holds the global number of experts (``num_local_experts`` for Mixtral,
``num_experts`` for Qwen3-MoE); its ``__post_init__`` calls :meth:`NVMoEConfigFields.check_nv_fields`.
"""
from __future__ import annotations

from dataclasses import dataclass

from moe_dispatch.experts import ACTIVATIONS
from moe_dispatch.experts import EXPERT_BACKENDS as _EXPERT_BACKENDS  # the canonical backend lists
from moe_dispatch.permute import BACKENDS as _PERMUTE_BACKENDS

__all__ = ["NVMoEConfigFields", "LAYER_PRECISIONS", "ATTN_INPUT_FORMATS", "SELF_ATTN_MASK_TYPES", "EXPERT_BACKENDS",
           "PERMUTE_BACKENDS", "ATTN_BACKENDS", "MOE_AUX_LOSS_TYPES", "NV_FIELDS"]

LAYER_PRECISIONS = ("fp8", "fp4", None)
ATTN_INPUT_FORMATS = ("bshd", "thd")
SELF_ATTN_MASK_TYPES = ("causal", "padding_causal")
EXPERT_BACKENDS = ("auto",) + _EXPERT_BACKENDS
PERMUTE_BACKENDS = ("auto",) + _PERMUTE_BACKENDS
ATTN_BACKENDS = ("auto", "sdpa", "te")
MOE_AUX_LOSS_TYPES = ("global", "per_layer")

# Fields added to the HF config (dropped when converting back to a HF config).
NV_FIELDS = ("expert_parallel_size", "layer_precision", "use_quantized_model_init", "attn_input_format",
             "self_attn_mask_type", "moe_aux_loss_coeff", "moe_aux_loss_type", "expert_backend", "permute_backend",
             "attn_backend")


@dataclass(repr=False, kw_only=True)
class NVMoEConfigFields:
    """The added fields (a dataclass mixin: transformers 5 configs are dataclasses).

    Args:
        expert_parallel_size: P, ranks that share the experts; each rank holds E // P of them
            (E = the config's ``experts_field``). ``E % P == 0``.
        layer_precision: per decoder layer ``"fp8" | "fp4" | None`` (None: bf16/fp32), or
            None for all layers high precision unless a recipe is passed to the model.
        use_quantized_model_init: build TE modules under ``te.quantized_model_init`` (weights
            stored quantized) for the quantized layers.
        attn_input_format: ``"bshd"`` (``input_ids [B, S]``) or ``"thd"`` (packed sequences,
            ``input_ids [1, T]`` with ``cu_seq_lens_q`` / ``cu_seqlens`` in the forward kwargs).
        self_attn_mask_type: ``"causal"`` or ``"padding_causal"``; padding from an
            ``attention_mask`` is applied in both cases.
        moe_aux_loss_coeff: scale of the load-balancing loss, added to the LM loss when labels
            are given. 0 (default): as HF, the loss is on only with ``output_router_logits``,
            scaled by ``router_aux_loss_coef``.
        moe_aux_loss_type: ``"global"`` (default; HF's ``load_balancing_loss_func``: the router
            statistics of all MoE layers pooled into one loss) or ``"per_layer"`` (Megatron-Core:
            one loss per layer, summed). See :func:`moe_dispatch.models.common.modeling.moe_aux_loss`.
        expert_backend: ``"auto" | "grouped_mm" | "te" | "loop" | "fused"`` (see ``moe_dispatch.experts``).
        permute_backend: ``"auto" | "torch" | "triton" | "cuda" | "te"`` for the default dispatcher.
        attn_backend: ``"auto" | "sdpa" | "te"``; auto takes TE's fused attention on CUDA when
            TransformerEngine is installed.
    """

    # HF's tensor / pipeline / expert parallel plans name HF's modules; ours are laid out
    # differently (class attributes, not dataclass fields: this mixin comes first in the bases).
    base_model_tp_plan = None
    base_model_pp_plan = None
    base_model_ep_plan = None

    experts_field = "num_local_experts"  # a class attribute, not a field

    expert_parallel_size: int = 1
    layer_precision: list | None = None
    use_quantized_model_init: bool = False
    attn_input_format: str = "bshd"
    self_attn_mask_type: str = "causal"
    moe_aux_loss_coeff: float = 0.0
    moe_aux_loss_type: str = "global"
    expert_backend: str = "auto"
    permute_backend: str = "auto"
    attn_backend: str = "auto"

    @property
    def num_routed_experts(self) -> int:
        """E, the global number of experts (the HF field ``experts_field``)."""
        return getattr(self, self.experts_field)

    @property
    def num_experts_per_rank(self) -> int:
        """``E // expert_parallel_size``: experts each EP rank holds."""
        return self.num_routed_experts // self.expert_parallel_size

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_model_fields()
        self.check_nv_fields()

    def check_model_fields(self) -> None:
        """A model's own field checks (override it); runs before :meth:`check_nv_fields`.
        Raises ValueError naming the field on a bad value."""

    def check_nv_fields(self) -> None:
        """Raises ValueError naming the field on a bad value."""
        ep, experts = self.expert_parallel_size, self.num_routed_experts
        if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
            raise ValueError(f"expert_parallel_size must be a positive int, got {ep!r}")
        if experts % ep != 0:
            raise ValueError(f"{self.experts_field} ({experts}) must be divisible by expert_parallel_size ({ep})")
        if self.layer_precision is not None:
            if isinstance(self.layer_precision, tuple):
                self.layer_precision = list(self.layer_precision)
            if not isinstance(self.layer_precision, list) or len(self.layer_precision) != self.num_hidden_layers:
                raise ValueError(
                    f"layer_precision must be a list of num_hidden_layers={self.num_hidden_layers} entries, "
                    f"got {self.layer_precision!r}")
            bad = [p for p in self.layer_precision if p not in LAYER_PRECISIONS]
            if bad:
                raise ValueError(f"layer_precision entries must be in {LAYER_PRECISIONS}, got {bad[0]!r}")
        for name, allowed in (("attn_input_format", ATTN_INPUT_FORMATS), ("self_attn_mask_type", SELF_ATTN_MASK_TYPES),
                              ("expert_backend", EXPERT_BACKENDS), ("permute_backend", PERMUTE_BACKENDS),
                              ("attn_backend", ATTN_BACKENDS), ("moe_aux_loss_type", MOE_AUX_LOSS_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.moe_aux_loss_coeff, (int, float)) or self.moe_aux_loss_coeff < 0:
            raise ValueError(f"moe_aux_loss_coeff must be a float >= 0, got {self.moe_aux_loss_coeff!r}")
        if not isinstance(self.use_quantized_model_init, bool):
            raise ValueError(f"use_quantized_model_init must be a bool, got {self.use_quantized_model_init!r}")
        if self.num_experts_per_tok > experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= {self.experts_field} "
                             f"({experts})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)} (the experts' gate activation), "
                             f"got {self.hidden_act!r}")
