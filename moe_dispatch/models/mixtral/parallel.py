"""Expert parallelism for NVMixtral: the model-independent :mod:`moe_dispatch.parallel`,
re-exported under the names this module always had (the gradient convention is documented there)."""
from moe_dispatch.parallel import (EXPERT_WEIGHTS, EPState, attach_ep_state, clip_grad_norm_ep_, ep_parameter_groups,
                                   ep_state, expert_parameters, finalize_ep_gradients, full_state_dict,
                                   gather_tokens_per_expert, load_full_state_dict, set_ep_groups,
                                   slice_full_expert_weights)

__all__ = ["EPState", "EXPERT_WEIGHTS", "ep_state", "attach_ep_state", "set_ep_groups", "finalize_ep_gradients",
           "clip_grad_norm_ep_", "load_full_state_dict", "full_state_dict", "gather_tokens_per_expert",
           "expert_parameters", "ep_parameter_groups", "slice_full_expert_weights"]
