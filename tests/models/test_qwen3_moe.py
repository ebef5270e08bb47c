"""NVQwen3Moe against transformers' Qwen3MoeForCausalLM on CPU in fp32: golden logits / loss with
HF's router loss, dense layers among MoE layers, conversion round trips, generate with every
cache, packed (THD) input, every dispatcher, checkpoints and config validation.

Models are tiny and random (no downloads), weights re-randomised larger than HF's init (std 0.02
makes every model nearly the same function and hides differences). Assertion messages name the
HF API or convention that differed.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_dispatch.models.qwen3_moe import (NVQwen3MoeConfig, NVQwen3MoeForCausalLM, NVQwen3MoeMLP,
                                           NVQwen3MoeSparseMoeBlock, convert_qwen3_moe_hf_to_te,
                                           convert_qwen3_moe_te_to_hf, hf_state_dict_to_te)

from .dispatchers import dispatcher_params
from .hf_checks import (VOCAB, assert_cache_under_both_names, assert_generate_equals_hf, assert_padded_loss_equals_hf,
                        assert_same_logits_and_grads, prompts, randomize_weights_)

# GQA with explicit head_dim != hidden / heads, top-3 of 8 renormalised, a dense layer in the
# middle (mlp_only_layers); MHA, top-2 of 6 not renormalised, every second layer sparse
# (decoder_sparse_step=2), tied embeddings, attention bias.
CONFIGS = {
    "gqa-top3-dense1": dict(hidden_size=32, head_dim=12, intermediate_size=40, moe_intermediate_size=24,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
                            norm_topk_prob=True, mlp_only_layers=[1]),
    "mha-top2-step2": dict(hidden_size=24, intermediate_size=32, moe_intermediate_size=16, num_attention_heads=3,
                           num_key_value_heads=3, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
                           decoder_sparse_step=2, tie_word_embeddings=True, attention_bias=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


def hf_model(name: str = "gqa-top3-dense1", seed: int = 0, num_hidden_layers: int = 3, **overrides) -> Qwen3MoeForCausalLM:
    fields = dict(vocab_size=VOCAB, num_hidden_layers=num_hidden_layers, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, attn_implementation="eager", **CONFIGS[name])
    fields.update(overrides)
    torch.manual_seed(seed)
    return randomize_weights_(Qwen3MoeForCausalLM(Qwen3MoeConfig(**fields)).eval())  # q/k norms too


# --- golden ------------------------------------------------------------------------------------------
def test_layers_follow_mlp_only_layers_and_decoder_sparse_step():
    kinds = {name: [type(layer.mlp) for layer in convert_qwen3_moe_hf_to_te(hf_model(name, num_hidden_layers=4)).model.layers]
             for name in CONFIGS}
    S, D = NVQwen3MoeSparseMoeBlock, NVQwen3MoeMLP
    assert kinds["gqa-top3-dense1"] == [S, D, S, S], "mlp_only_layers=[1] must make layer 1 dense (HF's rule)"
    assert kinds["mha-top2-step2"] == [D, S, D, S], "decoder_sparse_step=2: layers 1 and 3 sparse (HF's rule)"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("seed", [0, 1])
def test_golden_logits_loss_and_router_loss(name, padding, seed):
    """HF pools the router statistics of the sparse layers (``load_balancing_loss_func``), leaves
    padding out of them and adds ``router_aux_loss_coef * aux_loss`` to the LM loss."""
    model_hf = hf_model(name, seed, output_router_logits=True, router_aux_loss_coef=0.05)
    model_nv = convert_qwen3_moe_hf_to_te(model_hf).eval()
    assert model_nv.config.moe_aux_loss_type == "global" and model_nv.config.moe_aux_loss_coeff == 0.05
    assert_padded_loss_equals_hf(model_hf, model_nv, padding, seed, 0.05)


def test_sdpa_and_no_router_logits_golden():
    model_hf = hf_model("gqa-top3-dense1", seed=2, attn_implementation="sdpa")
    model_nv = convert_qwen3_moe_hf_to_te(model_hf).eval()
    ids, _ = prompts(2, 11, 2)
    with torch.no_grad():
        out_hf, out_nv = model_hf(ids, labels=ids), model_nv(ids, labels=ids)
    torch.testing.assert_close(out_nv.logits, out_hf.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_nv.loss, out_hf.loss, atol=1e-5, rtol=0)
    assert out_nv.aux_loss is None and out_nv.router_logits is None


# --- conversion ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_hf_te_hf_is_bitwise(name):
    model_hf = hf_model(name, seed=3)
    back = convert_qwen3_moe_te_to_hf(convert_qwen3_moe_hf_to_te(model_hf))
    assert isinstance(back, Qwen3MoeForCausalLM)
    ref, got = model_hf.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    bad = [k for k in ref if not torch.equal(ref[k], got[k]) or ref[k].dtype != got[k].dtype]
    assert not bad, f"round trip changed {bad}"
    ids, _ = prompts(2, 6, 3)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model_hf(ids).logits)


def test_convert_from_per_expert_hub_checkpoint_keys():
    """Hub checkpoints store ``mlp.experts.<e>.{gate,up,down}_proj.weight`` per expert."""
    model_hf = hf_model("gqa-top3-dense1", seed=4)
    fused = model_hf.state_dict()
    per_expert = {}
    for key, value in fused.items():
        if key.endswith("experts.gate_up_proj"):
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                per_expert[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e]
                per_expert[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e]
        elif key.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                per_expert[key.replace("down_proj", f"{e}.down_proj.weight")] = value[e]
        else:
            per_expert[key] = value
    model_nv = convert_qwen3_moe_hf_to_te(per_expert, config=model_hf.config)
    reference = convert_qwen3_moe_hf_to_te(model_hf)
    for key, value in reference.state_dict().items():
        assert torch.equal(model_nv.state_dict()[key], value), key
    bad = dict(per_expert)
    bad.pop("model.layers.0.mlp.experts.5.up_proj.weight")
    with pytest.raises(ValueError, match="up_proj weights of experts"):
        hf_state_dict_to_te(bad, model_nv.config)


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = convert_qwen3_moe_hf_to_te(hf_model("mha-top2-step2", seed=5), moe_aux_loss_coeff=0.01)
    model.save_pretrained(tmp_path)
    loaded = NVQwen3MoeForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config, NVQwen3MoeConfig) and loaded.config.moe_aux_loss_coeff == 0.01
    assert loaded.config.decoder_sparse_step == 2
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), NVQwen3MoeForCausalLM)
    bf16 = NVQwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.model.layers[1].mlp.router.gate.weight.dtype == torch.float32
    assert bf16.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16


# --- generate --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_left_padded_batch_equals_hf(name, use_cache):
    model_hf = hf_model(name, seed=6)
    model_nv = convert_qwen3_moe_hf_to_te(model_hf).eval()
    assert_generate_equals_hf(model_hf, model_nv, f"greedy generate (use_cache={use_cache})", seq=7, seed=6,
                              max_new_tokens=7, use_cache=use_cache)


def test_static_cache_generate_equals_hf():
    model_hf = hf_model("gqa-top3-dense1", seed=7)
    model_nv = convert_qwen3_moe_hf_to_te(model_hf).eval()
    assert_generate_equals_hf(model_hf, model_nv, "generate(cache_implementation='static')", seq=6, seed=7,
                              nv_only=dict(cache_implementation="static"), max_new_tokens=6)


def test_forward_takes_the_cache_under_both_names():
    model_nv = convert_qwen3_moe_hf_to_te(hf_model("gqa-top3-dense1", seed=8)).eval()
    ids, _ = prompts(2, 6, 8)
    with torch.no_grad():
        assert_cache_under_both_names(model_nv, ids)


# --- THD, dispatchers ---------------------------------------------------------------------------------------
def test_thd_matches_padded_bshd():
    model = convert_qwen3_moe_hf_to_te(hf_model("gqa-top3-dense1", seed=9), attn_input_format="thd").eval()
    lengths = [5, 3, 7]
    padded, _ = prompts(len(lengths), max(lengths), 9)
    mask = torch.zeros_like(padded)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    packed = torch.cat([padded[i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)  # [1, T]
    cu_seqlens = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    with torch.no_grad():
        bshd = model(padded, attention_mask=mask).logits
        thd = model(packed, cu_seq_lens_q=cu_seqlens, max_length_q=max(lengths)).logits
    torch.testing.assert_close(thd[0], bshd[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("make_dispatcher", dispatcher_params("cpu"))
def test_every_dispatcher_gives_same_logits_and_grads(make_dispatcher):
    # Tiny: the triton permute runs in Triton's interpreter on CPU.
    reference = convert_qwen3_moe_hf_to_te(hf_model("gqa-top3-dense1", seed=10, num_hidden_layers=2)).train()
    config = reference.config
    model = NVQwen3MoeForCausalLM(config, dispatcher=make_dispatcher(config)).train()
    model.load_state_dict(reference.state_dict())
    ids, _ = prompts(2, 5, 10)
    assert_same_logits_and_grads(model, reference, ids)


# --- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, field_name", [
    (dict(mlp_only_layers=[5]), "mlp_only_layers"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step"),
    (dict(num_experts=6, expert_parallel_size=4), "expert_parallel_size"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(moe_aux_loss_type="sum"), "moe_aux_loss_type"),
])
def test_bad_config_raises_value_error_naming_the_field(fields, field_name):
    base = dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2)
    with pytest.raises(ValueError, match=field_name):
        NVQwen3MoeConfig(**{**base, **fields})
