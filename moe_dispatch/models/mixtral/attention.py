"""Mixtral self-attention: the shared :mod:`moe_dispatch.models.common.attention` (no q/k norm),
under the names this module always had."""
from ..common.attention import (AttentionInputs, RMSNorm, RotaryEmbedding, SelfAttention, apply_rotary_pos_emb,
                                packed_position_ids, resolve_attn_backend, rope_theta)

NVMixtralAttention = SelfAttention
NVMixtralRotaryEmbedding = RotaryEmbedding
NVMixtralRMSNorm = RMSNorm

__all__ = ["AttentionInputs", "NVMixtralAttention", "NVMixtralRotaryEmbedding", "NVMixtralRMSNorm",
           "apply_rotary_pos_emb", "rope_theta", "resolve_attn_backend", "packed_position_ids"]
