"""NVQwen3Moe on CUDA in bf16: golden vs transformers' Qwen3MoeForCausalLM, every expert backend
that runs there, generate. Marked ``gpu`` (skipped without CUDA). Agreement: ``||a - b|| / ||b||``.
"""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_dispatch.models.qwen3_moe import convert_qwen3_moe_hf_to_te

from .test_mixtral_gpu import _fp32_router_forward, rel_err

pytestmark = pytest.mark.gpu

VOCAB = 128
# Multiples of 16 (grouped_mm / TE GEMMs); a dense layer among the MoE layers; top-8 of 32 as Qwen3-30B-A3B's top-8 of 128.
FIELDS = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
              mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=32,
              num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=512, pad_token_id=0,
              attn_implementation="sdpa")


def _backends() -> list[str]:
    backends = ["loop"]
    if torch.cuda.is_available() and hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= (9, 0):
        backends.append("grouped_mm")
    return backends


@pytest.mark.parametrize("expert_backend", _backends())
@pytest.mark.parametrize("attn_backend", ["sdpa", "auto"])
def test_bf16_golden_vs_hf(expert_backend, attn_backend):
    torch.manual_seed(0)
    model_hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**FIELDS)).eval().to(device="cuda", dtype=torch.bfloat16)
    for layer in model_hf.model.layers:  # HF routes in bf16; ours in fp32: route HF in fp32 too
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.forward = _fp32_router_forward(layer.mlp.gate)
    model = convert_qwen3_moe_hf_to_te(model_hf, attn_backend=attn_backend, expert_backend=expert_backend)
    assert model.model.layers[0].mlp.router.gate.weight.dtype == torch.float32
    input_ids = torch.randint(3, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        out_hf = model_hf(input_ids, labels=input_ids)
        out = model(input_ids, labels=input_ids)
    assert rel_err(out.logits, out_hf.logits) < 1e-2
    assert abs(out.loss.item() - out_hf.loss.item()) < 1e-2 * out_hf.loss.item()
    tokens = model.generate(input_ids[:, :16], max_new_tokens=8, do_sample=False)
    assert tokens.shape == (2, 24)
