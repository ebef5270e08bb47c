"""What the NV models share: attention (GQA, RoPE, q/k norm), RMSNorm, the decoder stack with its
caches, losses and EP binding, the NV config fields, and conversion helpers.

A new model subclasses :class:`~moe_dispatch.models.common.modeling.NVMoEModel` /
:class:`~moe_dispatch.models.common.modeling.NVMoEForCausalLM` and supplies its decoder layer
(see :mod:`moe_dispatch.models.qwen3_moe` for a worked example).
"""
