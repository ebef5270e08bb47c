"""Convert between HF ``Qwen3MoeForCausalLM`` and :class:`NVQwen3MoeForCausalLM` (bitwise both ways).

Key mapping (sparse layer ``i``, expert ``e``; ``model.`` prefix optional on input; the shared
:mod:`moe_dispatch.models.common.convert` does it)::

    HF (transformers 5, in memory)        HF (Hub checkpoints)                   NVQwen3Moe
    mlp.gate.weight [E, H]                mlp.gate.weight                        mlp.router.gate.weight (fp32)
    mlp.experts.gate_up_proj [E, 2I, H]   mlp.experts.e.gate_proj.weight [I, H]  mlp.experts.experts_gate_up_weight
                                          + mlp.experts.e.up_proj.weight [I, H]    [E, 2I, H] = [gate; up] per expert
    mlp.experts.down_proj [E, H, I]       mlp.experts.e.down_proj.weight [H, I]  mlp.experts.experts_down_weight

Everything else (embeddings, attention with ``q_norm`` / ``k_norm``, norms, the dense layers'
``mlp.{gate,up,down}_proj``, ``lm_head``) keeps its name.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from ..common.convert import (HFMoENames, convert_hf_to_nv, convert_nv_to_hf, hf_moe_state_dict_to_nv,
                              nv_moe_state_dict_to_hf)
from .config import NVQwen3MoeConfig
from .modeling import NVQwen3MoeForCausalLM

__all__ = ["convert_qwen3_moe_hf_to_te", "convert_qwen3_moe_te_to_hf", "hf_state_dict_to_te", "te_state_dict_to_hf",
           "QWEN3_MOE_NAMES"]

#: HF Qwen3-MoE's MoE names.
QWEN3_MOE_NAMES = HFMoENames(blocks=("mlp",), per_expert=("gate_proj", "up_proj", "down_proj"))


def hf_state_dict_to_te(state_dict: Mapping[str, torch.Tensor], config: NVQwen3MoeConfig) -> dict[str, torch.Tensor]:
    """HF Qwen3-MoE state dict (fused transformers-5 or per-expert Hub keys) -> NVQwen3Moe's.

    Raises:
        ValueError: missing / unexpected MoE keys, wrong shapes, or ``expert_parallel_size != 1``.
    """
    if config.expert_parallel_size != 1:
        raise ValueError("convert with expert_parallel_size=1 (all experts), then shard the experts over the EP group")
    return hf_moe_state_dict_to_nv(state_dict, QWEN3_MOE_NAMES, num_experts=config.num_experts,
                                   hidden_size=config.hidden_size, intermediate_size=config.moe_intermediate_size,
                                   moe_layers=set(config.moe_layer_indices))


def te_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVQwen3Moe state dict -> the layout of ``target`` (an HF Qwen3-MoE state dict)."""
    return nv_moe_state_dict_to_hf(state_dict, target, QWEN3_MOE_NAMES)


def convert_qwen3_moe_hf_to_te(model_hf, *, config: Qwen3MoeConfig | None = None, dispatcher=None, fp8_recipe=None,
                               fp4_recipe=None, **config_overrides) -> NVQwen3MoeForCausalLM:
    """HF Qwen3-MoE -> :class:`NVQwen3MoeForCausalLM` with the same weights (bitwise).

    Args:
        model_hf: a ``transformers.Qwen3MoeForCausalLM``, or an HF state dict (fused or per-expert
            keys, e.g. read from safetensors files) together with ``config``.
        config: the ``Qwen3MoeConfig`` when ``model_hf`` is a state dict.
        dispatcher, fp8_recipe, fp4_recipe: passed to ``NVQwen3MoeForCausalLM``.
        config_overrides: ``NVQwen3MoeConfig`` fields, e.g. ``expert_backend="loop"``. With
            ``output_router_logits`` in the HF config, ``moe_aux_loss_coeff`` defaults to its
            ``router_aux_loss_coef`` (HF's loss); the router loss type is HF's (``"global"``).

    Returns:
        The model on ``model_hf``'s device and dtype (router gates fp32), in its train/eval mode.
    """
    return convert_hf_to_nv(model_hf, config, NVQwen3MoeConfig, NVQwen3MoeForCausalLM, hf_state_dict_to_te,
                            dispatcher=dispatcher, fp8_recipe=fp8_recipe, fp4_recipe=fp4_recipe, **config_overrides)


def convert_qwen3_moe_te_to_hf(model_te: NVQwen3MoeForCausalLM) -> Qwen3MoeForCausalLM:
    """:class:`NVQwen3MoeForCausalLM` -> ``transformers.Qwen3MoeForCausalLM`` (bitwise weights; the
    router back in the model's dtype), on the same device, in the same train/eval mode.

    Raises:
        ValueError: the model holds only one EP rank's experts (``expert_parallel_size > 1``).
    """
    return convert_nv_to_hf(model_te, Qwen3MoeConfig, Qwen3MoeForCausalLM, te_state_dict_to_hf)
