"""Model implementations on ``moe_dispatch`` dispatchers (each imports only the public API).

Importing a model needs ``transformers``; import the subpackage, e.g.
``from moe_dispatch.models.mixtral import NVMixtralForCausalLM``.
"""
