"""Qwen3-MoE (e.g. Qwen3-30B-A3B: 128 experts, top-8) on pluggable token dispatchers.

Quick start::

    from moe_dispatch.models.qwen3_moe import NVQwen3MoeConfig, NVQwen3MoeForCausalLM

    config = NVQwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_experts=16, num_experts_per_tok=4, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = NVQwen3MoeForCausalLM(config)      # AllToAll dispatcher; pass dispatcher=... for another

Expert parallelism: the model-independent :mod:`moe_dispatch.parallel` (``model.set_ep_groups``,
``finalize_ep_gradients``, ``clip_grad_norm_ep_``, ...) and :mod:`moe_dispatch.checkpoint`
(``save_final_model_ep``, DCP), re-exported here.
"""
from moe_dispatch.checkpoint import load_ep_checkpoint, save_ep_checkpoint, save_final_model_ep
from moe_dispatch.parallel import (clip_grad_norm_ep_, ep_parameter_groups, finalize_ep_gradients, full_state_dict,
                                   gather_tokens_per_expert, load_full_state_dict)

from .config import NVQwen3MoeConfig
from .convert import convert_qwen3_moe_hf_to_te, convert_qwen3_moe_te_to_hf, hf_state_dict_to_te, te_state_dict_to_hf
from .modeling import (NVQwen3MoeDecoderLayer, NVQwen3MoeForCausalLM, NVQwen3MoeMLP, NVQwen3MoeModel,
                       NVQwen3MoePreTrainedModel, NVQwen3MoeSparseMoeBlock)

__all__ = [
    "NVQwen3MoeConfig", "NVQwen3MoePreTrainedModel", "NVQwen3MoeModel", "NVQwen3MoeForCausalLM",
    "NVQwen3MoeSparseMoeBlock", "NVQwen3MoeMLP", "NVQwen3MoeDecoderLayer",
    "convert_qwen3_moe_hf_to_te", "convert_qwen3_moe_te_to_hf", "hf_state_dict_to_te", "te_state_dict_to_hf",
    "finalize_ep_gradients", "clip_grad_norm_ep_", "load_full_state_dict", "full_state_dict",
    "gather_tokens_per_expert", "ep_parameter_groups", "save_ep_checkpoint", "load_ep_checkpoint", "save_final_model_ep",
]
