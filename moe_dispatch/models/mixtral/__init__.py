"""Mixtral on pluggable token dispatchers: config, model, attention and HF conversion.

Quick start::

    from moe_dispatch import AllToAllTokenDispatcher
    from moe_dispatch.models.mixtral import NVMixtralConfig, NVMixtralForCausalLM

    config = NVMixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = NVMixtralForCausalLM(config, dispatcher=AllToAllTokenDispatcher(8, 8, 64))
"""
from .config import NVMixtralConfig
from .convert import convert_mixtral_hf_to_te, convert_mixtral_te_to_hf, hf_state_dict_to_te, te_state_dict_to_hf
from .modeling import (
    NVMixtralDecoderLayer,
    NVMixtralForCausalLM,
    NVMixtralModel,
    NVMixtralPreTrainedModel,
    NVMixtralSparseMoeBlock,
)

__all__ = [
    "NVMixtralConfig", "NVMixtralPreTrainedModel", "NVMixtralModel", "NVMixtralForCausalLM",
    "NVMixtralSparseMoeBlock", "NVMixtralDecoderLayer",
    "convert_mixtral_hf_to_te", "convert_mixtral_te_to_hf", "hf_state_dict_to_te", "te_state_dict_to_hf",
]
