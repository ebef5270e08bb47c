"""Qwen3-MoE on a pluggable token dispatcher: HF-compatible, dense layers among MoE layers, THD, EP.

Each decoder layer is HF Qwen3-MoE's: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``. The
attention is the shared GQA + RoPE with Qwen3's per-head q/k RMSNorm (before RoPE); ``mlp`` is
route -> dispatch -> experts -> combine on the model's one :class:`~moe_dispatch.TokenDispatcher`
in the sparse layers, HF's dense SwiGLU MLP in the others (``mlp_only_layers``,
``decoder_sparse_step``). Decoder stack, caches, losses and EP binding are the shared
:mod:`moe_dispatch.models.common.modeling`.

Parameter layout (per layer ``i``; P = ``expert_parallel_size``)::

    model.layers.i.self_attn.{q,k,v,o}_proj.weight, self_attn.{q,k}_norm.weight [D]
    model.layers.i.input_layernorm.weight / post_attention_layernorm.weight
    sparse layers:
    model.layers.i.mlp.router.gate.weight                 [E, H]        fp32 always
    model.layers.i.mlp.experts.experts_gate_up_weight     [E/P, 2I, H]  gate rows, then up rows
    model.layers.i.mlp.experts.experts_down_weight        [E/P, H, I]   (I = moe_intermediate_size)
    dense layers (HF's names):
    model.layers.i.mlp.{gate,up,down}_proj.weight
"""
from __future__ import annotations

import torch
from torch import nn

from moe_dispatch import TokenDispatcher, TopKRouter
from moe_dispatch.experts import ACTIVATIONS, SwiGLUExperts
from moe_dispatch.moe import MoELayer

from ..common.attention import RMSNorm, SelfAttention
from ..common.modeling import NVMoEDecoderLayer, NVMoEForCausalLM, NVMoEModel, NVMoEPreTrainedModel
from .config import NVQwen3MoeConfig

__all__ = ["NVQwen3MoePreTrainedModel", "NVQwen3MoeModel", "NVQwen3MoeForCausalLM", "NVQwen3MoeSparseMoeBlock",
           "NVQwen3MoeMLP", "NVQwen3MoeDecoderLayer"]


class NVQwen3MoeSparseMoeBlock(MoELayer):
    """Qwen3-MoE's sparse block on a token dispatcher.

    Router: ``TopKRouter`` (fp32 softmax over all experts, top-k; ``norm_topk_prob``: divided by
    their sum, as HF), its gate kept in fp32 whatever the model dtype.

    Args:
        config: ``NVQwen3MoeConfig``.
        dispatcher: shared ``TokenDispatcher``.
        expert_backend: overrides ``config.expert_backend``.
    """

    def __init__(self, config: NVQwen3MoeConfig, dispatcher: TokenDispatcher, expert_backend: str | None = None) -> None:
        router = TopKRouter(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                            norm_topk_prob=bool(config.norm_topk_prob), aux_loss_coeff=float(config.moe_aux_loss_coeff))
        experts = SwiGLUExperts(config.num_experts_per_rank, config.hidden_size, config.moe_intermediate_size,
                                backend=expert_backend or config.expert_backend, activation=config.hidden_act)
        super().__init__(router, experts, dispatcher)


class NVQwen3MoeMLP(nn.Module):
    """HF's dense SwiGLU MLP ``down(act(gate(x)) * up(x))`` (``intermediate_size``), for the dense layers."""

    def __init__(self, config: NVQwen3MoeConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., H] -> [..., H]``."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class NVQwen3MoeDecoderLayer(NVMoEDecoderLayer):
    """Pre-norm attention (q/k norm) + pre-norm sparse MoE or dense MLP, residual around each."""

    def __init__(self, config: NVQwen3MoeConfig, layer_idx: int, dispatcher: TokenDispatcher,
                 attn_backend: str = "sdpa", expert_backend: str | None = None) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config, layer_idx, attn_backend, qk_norm=True)
        if config.is_moe_layer(layer_idx):
            self.mlp = NVQwen3MoeSparseMoeBlock(config, dispatcher, expert_backend)
        else:
            self.mlp = NVQwen3MoeMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class NVQwen3MoePreTrainedModel(NVMoEPreTrainedModel):
    """Weights init, checkpoint and generation plumbing shared by the Qwen3-MoE models."""

    config_class = NVQwen3MoeConfig
    config: NVQwen3MoeConfig
    _no_split_modules = ["NVQwen3MoeDecoderLayer"]


class NVQwen3MoeModel(NVMoEModel, NVQwen3MoePreTrainedModel):
    """Embeddings, Qwen3-MoE decoder layers, final norm (arguments and ``forward``:
    :class:`~moe_dispatch.models.common.modeling.NVMoEModel`). ``router_logits`` and the router
    loss cover the sparse layers only, as HF's."""

    def build_decoder_layer(self, config, layer_idx, dispatcher, attn_backend, expert_backend) -> NVQwen3MoeDecoderLayer:
        return NVQwen3MoeDecoderLayer(config, layer_idx, dispatcher, attn_backend, expert_backend)


class NVQwen3MoeForCausalLM(NVMoEForCausalLM, NVQwen3MoePreTrainedModel):
    """Qwen3-MoE causal LM on a pluggable dispatcher.

    Args:
        config: ``NVQwen3MoeConfig``.
        fp8_recipe, fp4_recipe: TE recipes (per-layer precision, see
            :func:`~moe_dispatch.models.common.modeling.resolve_layer_precision`).
        dispatcher: ``TokenDispatcher`` shared by all MoE layers; default
            :func:`~moe_dispatch.models.common.modeling.default_dispatcher`.
    """

    base_model_class = NVQwen3MoeModel


def _register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` load ``model_type="nv_qwen3_moe"`` checkpoints."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(NVQwen3MoeConfig.model_type, NVQwen3MoeConfig, exist_ok=True)
    AutoModel.register(NVQwen3MoeConfig, NVQwen3MoeModel, exist_ok=True)
    AutoModelForCausalLM.register(NVQwen3MoeConfig, NVQwen3MoeForCausalLM, exist_ok=True)


_register_auto_classes()
