"""Convert between HF ``MixtralForCausalLM`` and :class:`NVMixtralForCausalLM` (bitwise both ways).

Key mapping (layer ``i``, expert ``e``; ``model.`` prefix optional on input; the shared
:mod:`moe_dispatch.models.common.convert` does it)::

    HF (transformers 5, in memory)          HF (checkpoints, transformers 4)        NVMixtral
    mlp.gate.weight [E, H]                  block_sparse_moe.gate.weight            mlp.router.gate.weight (fp32)
    mlp.experts.gate_up_proj [E, 2I, H]     block_sparse_moe.experts.e.w1 [I, H]    mlp.experts.experts_gate_up_weight
                                            + ...experts.e.w3 [I, H]                  [E, 2I, H] = [w1; w3] per expert
    mlp.experts.down_proj [E, H, I]         block_sparse_moe.experts.e.w2 [H, I]    mlp.experts.experts_down_weight

Everything else (embeddings, attention projections, norms, ``lm_head``) keeps its name. The
router is stored in fp32 here and cast back to the HF model's dtype on the way back (exact for
bf16 / fp16 / fp32). A fused ``gate_up_proj`` stored transposed (``[E, H, 2I]``) is recognised by
its shape and transposed.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from ..common.convert import (HFMoENames, convert_hf_to_nv, convert_nv_to_hf, hf_moe_state_dict_to_nv,
                              nv_moe_state_dict_to_hf)
from ..common.convert import hf_config_from_nv as _hf_config_from_nv
from ..common.convert import nv_config_from_hf as _nv_config_from_hf
from .config import NVMixtralConfig
from .modeling import NVMixtralForCausalLM

__all__ = ["convert_mixtral_hf_to_te", "convert_mixtral_te_to_hf", "hf_state_dict_to_te", "te_state_dict_to_hf",
           "nv_config_from_hf", "hf_config_from_nv", "MIXTRAL_NAMES"]

#: HF Mixtral's MoE names: ``block_sparse_moe`` in checkpoints, ``mlp`` in transformers 5.
MIXTRAL_NAMES = HFMoENames(blocks=("block_sparse_moe", "mlp"), per_expert=("w1", "w3", "w2"))


def nv_config_from_hf(hf_config: MixtralConfig, **overrides) -> NVMixtralConfig:
    """An ``NVMixtralConfig`` with every field of ``hf_config``, then ``overrides`` (HF's router
    loss coefficient carried over when ``output_router_logits``)."""
    return _nv_config_from_hf(hf_config, NVMixtralConfig, **overrides)


def hf_config_from_nv(nv_config: NVMixtralConfig) -> MixtralConfig:
    """The ``MixtralConfig`` of ``nv_config`` (its added fields dropped)."""
    return _hf_config_from_nv(nv_config, MixtralConfig)


def hf_state_dict_to_te(state_dict: Mapping[str, torch.Tensor], config: NVMixtralConfig) -> dict[str, torch.Tensor]:
    """HF Mixtral state dict (fused transformers-5 or per-expert ``w1/w2/w3`` keys) -> NVMixtral's.

    Raises:
        ValueError: missing / unexpected MoE keys, wrong shapes, or ``expert_parallel_size != 1``.
    """
    if config.expert_parallel_size != 1:
        raise ValueError("convert with expert_parallel_size=1 (all experts), then shard the experts over the EP group")
    return hf_moe_state_dict_to_nv(state_dict, MIXTRAL_NAMES, num_experts=config.num_local_experts,
                                   hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                   moe_layers=range(config.num_hidden_layers))


def te_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVMixtral state dict -> the layout of ``target`` (an HF Mixtral state dict, for its keys,
    shapes and dtypes: fused ``gate_up_proj`` or per-expert ``w1/w2/w3``)."""
    return nv_moe_state_dict_to_hf(state_dict, target, MIXTRAL_NAMES)


def convert_mixtral_hf_to_te(model_hf, *, config: MixtralConfig | None = None, dispatcher=None, fp8_recipe=None,
                             fp4_recipe=None, **config_overrides) -> NVMixtralForCausalLM:
    """HF Mixtral -> :class:`NVMixtralForCausalLM` with the same weights (bitwise).

    Args:
        model_hf: a ``transformers.MixtralForCausalLM``, or an HF state dict (fused or per-expert
            ``w1/w2/w3`` keys, e.g. read from safetensors files) together with ``config``.
        config: the ``MixtralConfig`` when ``model_hf`` is a state dict.
        dispatcher, fp8_recipe, fp4_recipe: passed to ``NVMixtralForCausalLM``.
        config_overrides: ``NVMixtralConfig`` fields, e.g. ``expert_backend="loop"``.

    Returns:
        The model on ``model_hf``'s device and dtype (router gates fp32), in its train/eval mode.
    """
    return convert_hf_to_nv(model_hf, config, NVMixtralConfig, NVMixtralForCausalLM, hf_state_dict_to_te,
                            dispatcher=dispatcher, fp8_recipe=fp8_recipe, fp4_recipe=fp4_recipe, **config_overrides)


def convert_mixtral_te_to_hf(model_te: NVMixtralForCausalLM) -> MixtralForCausalLM:
    """:class:`NVMixtralForCausalLM` -> ``transformers.MixtralForCausalLM`` (bitwise weights; the
    router back in the model's dtype), on the same device, in the same train/eval mode.

    Raises:
        ValueError: the model holds only one EP rank's experts (``expert_parallel_size > 1``).
    """
    return convert_nv_to_hf(model_te, MixtralConfig, MixtralForCausalLM, te_state_dict_to_hf)
