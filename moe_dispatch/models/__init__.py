"""Model implementations on ``moe_dispatch`` dispatchers (each imports only the public API).

Importing a model needs ``transformers``; import the subpackage, e.g.
``from moe_dispatch.models.mixtral import NVMixtralForCausalLM`` or
``from moe_dispatch.models.qwen3_moe import NVQwen3MoeForCausalLM``. What they share (attention,
decoder stack, caches, losses, conversion) is in :mod:`moe_dispatch.models.common`.
"""
