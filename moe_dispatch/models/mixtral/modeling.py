"""Mixtral on a pluggable token dispatcher: HF-compatible, per-layer FP8 / FP4, THD packing.

Each decoder layer is HF Mixtral's: ``x + attn(norm(x))`` then ``x + moe(norm(x))``; the MoE
block is route -> dispatch -> experts -> combine on a :class:`~moe_dispatch.TokenDispatcher`
shared by all layers. The decoder stack, caches, losses and EP binding are the shared
:mod:`moe_dispatch.models.common.modeling`.

Parameter layout (per layer ``i``; the expert weights hold only this EP rank's
``E // expert_parallel_size`` experts, stacked so they can be wrapped as DTensor ``Shard(0)``)::

    model.layers.i.self_attn.{q,k,v,o}_proj.weight
    model.layers.i.input_layernorm.weight / post_attention_layernorm.weight
    model.layers.i.mlp.router.gate.weight                 [E, H]        fp32 always
    model.layers.i.mlp.experts.experts_gate_up_weight     [E/P, 2I, H]  gate rows, then up rows
    model.layers.i.mlp.experts.experts_down_weight        [E/P, H, I]

With ``expert_parallel_size = P > 1`` call ``model.set_ep_groups(...)`` on every rank: the two
expert weights become DTensor ``Shard(0)`` parameters (global ``[E, ...]``) and the gradient
convention of :mod:`moe_dispatch.parallel` applies (``finalize_ep_gradients`` after backward).
"""
from __future__ import annotations

from moe_dispatch import TokenDispatcher, TopKRouter
from moe_dispatch.experts import SwiGLUExperts
from moe_dispatch.moe import MoELayer

from ..common.attention import RMSNorm, SelfAttention
from ..common.modeling import (NVMoEDecoderLayer, NVMoEForCausalLM, NVMoEModel, NVMoEModelOutput, NVMoEPreTrainedModel,
                               default_dispatcher, moe_aux_loss, moe_aux_loss_coefficient, resolve_layer_precision)
from .config import NVMixtralConfig

__all__ = ["NVMixtralPreTrainedModel", "NVMixtralModel", "NVMixtralForCausalLM", "NVMixtralSparseMoeBlock",
           "NVMixtralDecoderLayer", "NVMixtralModelOutput", "default_dispatcher", "resolve_layer_precision",
           "moe_aux_loss", "moe_aux_loss_coefficient"]

NVMixtralModelOutput = NVMoEModelOutput


class NVMixtralSparseMoeBlock(MoELayer):
    """Mixtral's sparse MoE block on a token dispatcher.

    Router: ``TopKRouter`` with ``"renorm"`` (HF Mixtral: fp32 softmax over all experts, top-k,
    divide by the sum), its gate kept in fp32 whatever the model dtype. ``router_jitter_noise``
    multiplies the router input only (HF also perturbs the experts' input).

    Args:
        config: ``NVMixtralConfig``.
        dispatcher: shared ``TokenDispatcher``; default :func:`default_dispatcher`.
        expert_backend: overrides ``config.expert_backend``.
    """

    def __init__(self, config: NVMixtralConfig, dispatcher: TokenDispatcher | None = None,
                 expert_backend: str | None = None) -> None:
        router = TopKRouter(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                            normalization="renorm", jitter_noise=config.router_jitter_noise,
                            aux_loss_coeff=float(config.moe_aux_loss_coeff))
        experts = SwiGLUExperts(config.num_local_experts // config.expert_parallel_size, config.hidden_size,
                                config.intermediate_size, backend=expert_backend or config.expert_backend,
                                activation=config.hidden_act)
        super().__init__(router, experts, dispatcher if dispatcher is not None else default_dispatcher(config))


class NVMixtralDecoderLayer(NVMoEDecoderLayer):
    """Pre-norm attention + pre-norm sparse MoE, residual around each (HF Mixtral)."""

    def __init__(self, config: NVMixtralConfig, layer_idx: int, dispatcher: TokenDispatcher,
                 attn_backend: str = "sdpa", expert_backend: str | None = None) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config, layer_idx, attn_backend)
        self.mlp = NVMixtralSparseMoeBlock(config, dispatcher, expert_backend)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class NVMixtralPreTrainedModel(NVMoEPreTrainedModel):
    """Weights init, checkpoint and generation plumbing shared by the Mixtral models."""

    config_class = NVMixtralConfig
    config: NVMixtralConfig
    _no_split_modules = ["NVMixtralDecoderLayer"]


class NVMixtralModel(NVMoEModel, NVMixtralPreTrainedModel):
    """Embeddings, Mixtral decoder layers, final norm (see :class:`~moe_dispatch.models.common.modeling.NVMoEModel`
    for the arguments and ``forward``)."""

    def build_decoder_layer(self, config, layer_idx, dispatcher, attn_backend, expert_backend) -> NVMixtralDecoderLayer:
        return NVMixtralDecoderLayer(config, layer_idx, dispatcher, attn_backend, expert_backend)


class NVMixtralForCausalLM(NVMoEForCausalLM, NVMixtralPreTrainedModel):
    """Mixtral causal LM on a pluggable dispatcher.

    Args:
        config: ``NVMixtralConfig``.
        fp8_recipe, fp4_recipe: TE recipes (see :class:`NVMixtralModel`). ``lm_head`` and the
            router gates always run in high precision.
        dispatcher: ``TokenDispatcher`` shared by all layers; default :func:`default_dispatcher`.
    """

    base_model_class = NVMixtralModel


def _register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` load ``model_type="nv_mixtral"`` checkpoints."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(NVMixtralConfig.model_type, NVMixtralConfig, exist_ok=True)
    AutoModel.register(NVMixtralConfig, NVMixtralModel, exist_ok=True)
    AutoModelForCausalLM.register(NVMixtralConfig, NVMixtralForCausalLM, exist_ok=True)


_register_auto_classes()
