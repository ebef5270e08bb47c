"""NVMixtral on CUDA in bf16: golden vs HF, expert / attention backends against each other, FP8.

Every test is marked ``gpu`` (skipped without CUDA); TE-specific ones also skip without
TransformerEngine. Agreement is measured as ``||a - b|| / ||b||``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

from moe_dispatch.experts import SwiGLUExperts
from moe_dispatch.models.mixtral import NVMixtralForCausalLM, convert_mixtral_hf_to_te

from .dispatchers import dispatcher_params

pytestmark = pytest.mark.gpu

VOCAB = 128
# Multiples of 16 so grouped_mm / TE / FP8 GEMMs all accept the shapes.
FIELDS = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
              pad_token_id=0, attn_implementation="sdpa")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _te():
    return pytest.importorskip("transformer_engine.pytorch", reason="needs TransformerEngine")


def _fp32_router_forward(router):
    """HF's router math with fp32 logits (as ours), so both models route identically."""

    def forward(hidden_states):
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        logits = F.linear(hidden_states.float(), router.weight.float())
        top, index = torch.topk(torch.softmax(logits, dim=-1), router.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    return forward


def hf_model_cuda(seed: int = 0, **overrides) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**{**FIELDS, **overrides})).eval()
    return model.to(device="cuda", dtype=torch.bfloat16)


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("attn_backend", ["sdpa", "auto"])
def test_bf16_golden_vs_hf(attn_backend):
    model_hf = hf_model_cuda()
    for layer in model_hf.model.layers:
        layer.mlp.gate.forward = _fp32_router_forward(layer.mlp.gate)
    model = convert_mixtral_hf_to_te(model_hf, attn_backend=attn_backend)
    assert model.model.layers[0].mlp.router.gate.weight.dtype == torch.float32
    input_ids = tokens(2, 64)
    with torch.no_grad():
        out_hf = model_hf(input_ids, labels=input_ids)
        out = model(input_ids, labels=input_ids)
    assert rel_err(out.logits, out_hf.logits) < 1e-2
    assert abs(out.loss.item() - out_hf.loss.item()) < 1e-2 * out_hf.loss.item()


def test_bf16_generate_runs_with_and_without_cache():
    model = convert_mixtral_hf_to_te(hf_model_cuda())
    input_ids = tokens(2, 16)
    with_cache = model.generate(input_ids, max_new_tokens=8, do_sample=False, use_cache=True)
    without = model.generate(input_ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert with_cache.shape == without.shape == (2, 24)


def _experts_and_input(backend: str, counts=(37, 0, 64, 5, 120, 1, 9, 20), hidden=128, inter=256, seed=0):
    torch.manual_seed(seed)
    experts = SwiGLUExperts(len(counts), hidden, inter, backend=backend, device="cuda", dtype=torch.bfloat16)
    experts.reset_parameters(std=0.05)
    x = torch.randn(sum(counts), hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return experts, x, torch.tensor(counts, device="cuda")


def _run_experts(experts, x, counts):
    out = experts(x, counts)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad, experts.experts_gate_up_weight.grad, experts.experts_down_weight.grad


def test_grouped_mm_experts_match_loop():
    if not hasattr(torch, "_grouped_mm") or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm needs torch >= 2.8 and sm90+")
    _check_experts_match_loop("grouped_mm")


def test_te_grouped_linear_experts_match_loop():
    _te()
    _check_experts_match_loop("te")


def _check_experts_match_loop(backend: str) -> None:
    ref = _run_experts(*_experts_and_input("loop"))
    got = _run_experts(*_experts_and_input(backend))
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-2


def test_te_attention_matches_sdpa():
    _te()
    model_hf = hf_model_cuda(sliding_window=24)
    sdpa = convert_mixtral_hf_to_te(model_hf, attn_backend="sdpa", expert_backend="loop")
    te_model = convert_mixtral_hf_to_te(model_hf, attn_backend="te", expert_backend="loop")
    assert te_model.model.layers[0].self_attn.core_attention is not None
    input_ids = tokens(2, 64)
    with torch.no_grad():
        assert rel_err(te_model(input_ids).logits, sdpa(input_ids).logits) < 1e-2


def test_te_thd_matches_padded_sdpa():
    _te()
    model_hf = hf_model_cuda()
    sdpa = convert_mixtral_hf_to_te(model_hf, attn_backend="sdpa", attn_input_format="thd")
    te_model = convert_mixtral_hf_to_te(model_hf, attn_backend="te", attn_input_format="thd")
    lengths = [40, 16, 64]
    padded = tokens(len(lengths), max(lengths))
    mask = torch.zeros_like(padded)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    packed = torch.cat([padded[i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)
    cu_seqlens = torch.tensor([0, 40, 56, 120], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        expected = sdpa(padded, attention_mask=mask).logits[mask.bool()]
        got = te_model(packed, cu_seq_lens_q=cu_seqlens, max_length_q=64).logits[0]
    assert rel_err(got, expected) < 1e-2


@pytest.mark.parametrize("make_dispatcher", dispatcher_params("cuda"))
def test_every_dispatcher_on_cuda(make_dispatcher):
    reference = convert_mixtral_hf_to_te(hf_model_cuda()).train()
    with torch.device("cuda"):  # TE modules (if any) are built on the default device
        model = NVMixtralForCausalLM(reference.config, dispatcher=make_dispatcher(reference.config))
    model = model.to(torch.bfloat16).train()
    model.load_state_dict(reference.state_dict(), strict=False)
    input_ids = tokens(2, 32)
    out_ref, out = reference(input_ids, labels=input_ids), model(input_ids, labels=input_ids)
    assert rel_err(out.logits, out_ref.logits) < 1e-2
    out_ref.loss.backward()
    out.loss.backward()
    grads_ref = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert rel_err(param.grad, grads_ref[name].grad) < 2e-2, name


def test_fp8_forward_backward_runs():
    te = _te()
    available = getattr(te, "is_fp8_available", None)
    if available is not None:
        ok = available()
        ok, why = ok if isinstance(ok, tuple) else (ok, "")
        if not ok:
            pytest.skip(f"FP8 not available here: {why}")
    from transformer_engine.common.recipe import DelayedScaling

    model_hf = hf_model_cuda()
    model = convert_mixtral_hf_to_te(model_hf, layer_precision=["fp8", None], fp8_recipe=DelayedScaling()).train()
    assert model.model.layers[0].mlp.experts.backend == "te"
    input_ids = tokens(2, 64)
    out = model(input_ids, labels=input_ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    with torch.no_grad():  # FP8 layer 0 stays close to the bf16 reference
        bf16 = convert_mixtral_hf_to_te(model_hf)(input_ids).logits
        assert rel_err(model(input_ids).logits, bf16) < 0.1
