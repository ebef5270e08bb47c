"""Mixtral on pluggable token dispatchers: config, model, attention and HF conversion.

Quick start::

    from moe_dispatch import AllToAllTokenDispatcher
    from moe_dispatch.models.mixtral import NVMixtralConfig, NVMixtralForCausalLM

    config = NVMixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = NVMixtralForCausalLM(config, dispatcher=AllToAllTokenDispatcher(8, 8, 64))

Expert parallelism (every rank, after ``init_process_group``)::

    config.expert_parallel_size = P                       # each rank holds E // P experts
    model = NVMixtralForCausalLM(config).to(device)
    model.set_ep_groups(ep_mesh=mesh["ep"])               # DTensor Shard(0) experts
    optimizer = torch.optim.AdamW(ep_parameter_groups(model), lr=1e-4)
    loss.backward(); finalize_ep_gradients(model)         # the DP-mean gradient convention
    clip_grad_norm_ep_(model, 1.0); optimizer.step()
    save_final_model_ep(model, "out/")                    # EP=1 checkpoint, rank 0 writes
"""
from .checkpoint import load_ep_checkpoint, save_ep_checkpoint, save_final_model_ep
from .config import NVMixtralConfig
from .convert import convert_mixtral_hf_to_te, convert_mixtral_te_to_hf, hf_state_dict_to_te, te_state_dict_to_hf
from .modeling import (
    NVMixtralDecoderLayer,
    NVMixtralForCausalLM,
    NVMixtralModel,
    NVMixtralPreTrainedModel,
    NVMixtralSparseMoeBlock,
)
from .parallel import (clip_grad_norm_ep_, ep_parameter_groups, finalize_ep_gradients, full_state_dict,
                       gather_tokens_per_expert, load_full_state_dict)

__all__ = [
    "NVMixtralConfig", "NVMixtralPreTrainedModel", "NVMixtralModel", "NVMixtralForCausalLM",
    "NVMixtralSparseMoeBlock", "NVMixtralDecoderLayer",
    "convert_mixtral_hf_to_te", "convert_mixtral_te_to_hf", "hf_state_dict_to_te", "te_state_dict_to_hf",
    "finalize_ep_gradients", "clip_grad_norm_ep_", "load_full_state_dict", "full_state_dict",
    "gather_tokens_per_expert", "ep_parameter_groups", "save_ep_checkpoint", "load_ep_checkpoint", "save_final_model_ep",
]
