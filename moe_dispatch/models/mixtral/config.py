"""``NVMixtralConfig``: ``transformers.MixtralConfig`` plus the dispatch / precision / layout knobs."""
from __future__ import annotations

from transformers import MixtralConfig

from ..common.config import (ATTN_BACKENDS, ATTN_INPUT_FORMATS, EXPERT_BACKENDS, LAYER_PRECISIONS, MOE_AUX_LOSS_TYPES,
                             NV_FIELDS, PERMUTE_BACKENDS, SELF_ATTN_MASK_TYPES, NVMoEConfigFields)

__all__ = ["NVMixtralConfig", "LAYER_PRECISIONS", "ATTN_INPUT_FORMATS", "SELF_ATTN_MASK_TYPES",
           "EXPERT_BACKENDS", "PERMUTE_BACKENDS", "ATTN_BACKENDS", "MOE_AUX_LOSS_TYPES", "NV_FIELDS"]


class NVMixtralConfig(NVMoEConfigFields, MixtralConfig):
    """Mixtral configuration for :class:`~moe_dispatch.models.mixtral.NVMixtralForCausalLM`.

    Every ``MixtralConfig`` field keeps its meaning (``num_local_experts`` is the *global*
    number of experts E, as in HF). The added fields (``expert_parallel_size``,
    ``layer_precision``, ``use_quantized_model_init``, ``attn_input_format``,
    ``self_attn_mask_type``, ``moe_aux_loss_coeff``, ``moe_aux_loss_type``, ``expert_backend``,
    ``permute_backend``, ``attn_backend``) are documented on
    :class:`~moe_dispatch.models.common.config.NVMoEConfigFields`.

    Raises:
        ValueError naming the field on a bad value.
    """

    model_type = "nv_mixtral"
    experts_field = "num_local_experts"
