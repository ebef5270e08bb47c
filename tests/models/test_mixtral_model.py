"""NVMixtral against HF Mixtral on CPU in fp32: golden logits / loss, conversion round trips,
generation, packed (THD) input, every dispatcher, checkpoints and config validation.

All models are tiny and random (no downloads).
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from moe_dispatch import AllToAllTokenDispatcher
from moe_dispatch.models.mixtral import (
    NVMixtralConfig,
    NVMixtralForCausalLM,
    convert_mixtral_hf_to_te,
    convert_mixtral_te_to_hf,
    hf_state_dict_to_te,
    te_state_dict_to_hf,
)

from moe_dispatch.models.mixtral.convert import nv_config_from_hf

from .dispatchers import dispatcher_params
from .hf_checks import assert_same_grads, assert_same_logits_and_grads

VOCAB = 128

# Small shapes that still cover GQA on/off, top-1/top-2, non-square attention (head_dim * heads
# != hidden, odd hidden size), sliding window shorter than the sequence and tied embeddings.
CONFIGS = {
    "gqa-top2": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                     num_local_experts=4, num_experts_per_tok=2),
    "mha-top1": dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4,
                     num_local_experts=8, num_experts_per_tok=1),
    "odd-hidden-window": dict(hidden_size=36, head_dim=12, intermediate_size=40, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, sliding_window=4),
    "window-top2-tied": dict(hidden_size=32, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                             num_local_experts=8, num_experts_per_tok=2, sliding_window=6, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


def hf_config(name: str = "gqa-top2", **overrides) -> MixtralConfig:
    fields = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, attn_implementation="eager", **CONFIGS[name])
    fields.update(overrides)
    return MixtralConfig(**fields)


def hf_model(name: str = "gqa-top2", seed: int = 0, **overrides) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    model = MixtralForCausalLM(hf_config(name, **overrides)).eval()
    with torch.no_grad():  # HF inits norms to ones; random norms make the test sharper
        for name_, p in model.named_parameters():
            if "layernorm" in name_ or name_.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def labels_for(input_ids: torch.Tensor) -> torch.Tensor:
    labels = input_ids.clone()
    labels[:, :2] = -100
    return labels


# --- golden ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_golden_logits_and_loss(name, attn_implementation):
    model_hf = hf_model(name, attn_implementation=attn_implementation)
    model_nv = convert_mixtral_hf_to_te(model_hf)
    input_ids = tokens(2, 12)
    with torch.no_grad():
        out_hf = model_hf(input_ids, labels=labels_for(input_ids))
        out_nv = model_nv(input_ids, labels=labels_for(input_ids))
    torch.testing.assert_close(out_nv.logits, out_hf.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_nv.loss, out_hf.loss, atol=1e-5, rtol=0)


def test_golden_with_padding_mask():
    model_hf = hf_model("odd-hidden-window")
    model_nv = convert_mixtral_hf_to_te(model_hf)
    input_ids = tokens(3, 10)
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    with torch.no_grad():
        logits_hf = model_hf(input_ids, attention_mask=mask).logits
        logits_nv = model_nv(input_ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(logits_nv[keep], logits_hf[keep], atol=1e-5, rtol=0)


def test_golden_aux_loss():
    # One layer: HF's load-balancing loss (over all layers' logits at once) equals ours per layer.
    model_hf = hf_model("gqa-top2", num_hidden_layers=1, output_router_logits=True, router_aux_loss_coef=0.02)
    model_nv = convert_mixtral_hf_to_te(model_hf)
    assert model_nv.config.moe_aux_loss_coeff == 0.02
    input_ids = tokens(2, 9)
    with torch.no_grad():
        out_hf = model_hf(input_ids, labels=input_ids)
        out_nv = model_nv(input_ids, labels=input_ids)
    torch.testing.assert_close(out_nv.aux_loss, 0.02 * out_hf.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_nv.loss, out_hf.loss, atol=1e-5, rtol=0)


def test_aux_loss_is_summed_over_layers_and_trains_the_router():
    model = convert_mixtral_hf_to_te(hf_model("gqa-top2"), moe_aux_loss_coeff=0.1).train()
    input_ids = tokens(2, 8)
    out = model(input_ids, labels=input_ids)
    plain = convert_mixtral_hf_to_te(hf_model("gqa-top2")).train()(input_ids, labels=input_ids)
    assert out.aux_loss is not None and out.aux_loss > 0 and plain.aux_loss is None
    torch.testing.assert_close(out.loss, plain.loss + out.aux_loss, atol=1e-6, rtol=0)
    out.aux_loss.backward()
    assert model.model.layers[0].mlp.router.gate.weight.grad.abs().sum() > 0


# --- conversion round trips -----------------------------------------------------------------------
def _assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["gqa-top2", "window-top2-tied"])
def test_round_trip_hf_te_hf_is_bitwise(name):
    model_hf = hf_model(name)
    model_back = convert_mixtral_te_to_hf(convert_mixtral_hf_to_te(model_hf))
    _assert_state_dicts_equal(model_hf.state_dict(), model_back.state_dict())
    input_ids = tokens(2, 7)
    with torch.no_grad():
        assert torch.equal(model_back(input_ids).logits, model_hf(input_ids).logits)


def test_round_trip_bf16_keeps_router_fp32():
    model_hf = hf_model("gqa-top2").to(torch.bfloat16)
    model_nv = convert_mixtral_hf_to_te(model_hf)
    assert model_nv.model.layers[0].mlp.router.gate.weight.dtype == torch.float32
    assert model_nv.model.layers[0].mlp.experts.experts_gate_up_weight.dtype == torch.bfloat16
    _assert_state_dicts_equal(model_hf.state_dict(), convert_mixtral_te_to_hf(model_nv).state_dict())


def _per_expert_state_dict(model_hf: MixtralForCausalLM) -> dict[str, torch.Tensor]:
    """The transformers-4 / checkpoint layout: block_sparse_moe.experts.e.w1/w2/w3."""
    out = {}
    for key, tensor in model_hf.state_dict().items():
        key = key.replace(".mlp.", ".block_sparse_moe.")
        if key.endswith("experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.w1.weight"], out[f"{prefix}{e}.w3.weight"] = gate[e].clone(), up[e].clone()
        elif key.endswith("experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = tensor[e].clone()
        else:
            out[key] = tensor
    return out


def test_convert_from_per_expert_state_dict():
    model_hf = hf_model("odd-hidden-window")
    legacy = _per_expert_state_dict(model_hf)
    from_model = convert_mixtral_hf_to_te(model_hf)
    from_legacy = convert_mixtral_hf_to_te(legacy, config=model_hf.config).eval()
    _assert_state_dicts_equal(from_model.state_dict(), from_legacy.state_dict())
    # and back into the per-expert layout, bitwise
    back = te_state_dict_to_hf(from_legacy.state_dict(), legacy)
    _assert_state_dicts_equal(legacy, back)
    input_ids = tokens(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(from_legacy(input_ids).logits, model_hf(input_ids).logits, atol=1e-5, rtol=0)


def test_convert_accepts_transposed_fused_layout():
    model_hf = hf_model("gqa-top2")
    state = {k: (v.transpose(1, 2) if k.endswith(("gate_up_proj", "down_proj")) else v)
             for k, v in model_hf.state_dict().items()}
    config = nv_config_from_hf(model_hf.config)
    converted = hf_state_dict_to_te(state, config)
    expected = hf_state_dict_to_te(model_hf.state_dict(), config)
    _assert_state_dicts_equal(expected, converted)


def test_convert_rejects_bad_state_dicts():
    model_hf = hf_model("gqa-top2")
    legacy = _per_expert_state_dict(model_hf)
    del legacy["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    with pytest.raises(ValueError, match="w2 weights of experts"):
        convert_mixtral_hf_to_te(legacy, config=model_hf.config)
    with pytest.raises(ValueError, match="config="):
        convert_mixtral_hf_to_te(model_hf.state_dict())
    with pytest.raises(ValueError, match="expert_parallel_size=1"):
        convert_mixtral_hf_to_te(model_hf, expert_parallel_size=2)


# --- generation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", ["gqa-top2", "odd-hidden-window"])
def test_greedy_generate_matches_hf(name, use_cache):
    model_hf = hf_model(name)
    model_nv = convert_mixtral_hf_to_te(model_hf)
    input_ids = tokens(2, 6)
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0  # left padding, as generate expects
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0)
    expected = model_hf.generate(input_ids, **kwargs)
    assert torch.equal(model_nv.generate(input_ids, **kwargs), expected)


def test_cached_decoding_matches_full_forward():
    model = convert_mixtral_hf_to_te(hf_model("odd-hidden-window"))
    input_ids = tokens(2, 11)
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        out = model(input_ids[:, :7], use_cache=True)
        steps = [out.logits]
        for t in range(7, 11):
            out = model(input_ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


# --- packed (THD) input ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gqa-top2", "odd-hidden-window"])
@pytest.mark.parametrize("kwarg_names", [("cu_seq_lens_q", "max_length_q"), ("cu_seqlens", "max_length")])
def test_thd_matches_padded_bshd(name, kwarg_names):
    model = convert_mixtral_hf_to_te(hf_model(name), attn_input_format="thd")
    lengths = [5, 3, 7]
    padded = tokens(len(lengths), max(lengths))
    mask = torch.zeros_like(padded)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    packed = torch.cat([padded[i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)  # [1, T]
    cu_seqlens = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    cu_name, max_name = kwarg_names
    with torch.no_grad():
        bshd = model(padded, attention_mask=mask).logits
        thd = model(packed, **{cu_name: cu_seqlens, max_name: max(lengths)}).logits
    assert thd.shape == (1, sum(lengths), VOCAB)
    torch.testing.assert_close(thd[0], bshd[mask.bool()], atol=1e-5, rtol=0)


def test_thd_input_errors():
    model = convert_mixtral_hf_to_te(hf_model("gqa-top2"))
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="attn_input_format='thd'"):
        model(tokens(1, 4), cu_seq_lens_q=cu)
    model.config.attn_input_format = "thd"
    with pytest.raises(ValueError, match=r"\[1, total_tokens\]"):
        model(tokens(2, 2), cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens(1, 4), attention_mask=torch.ones(1, 4), cu_seq_lens_q=cu)


# --- dispatchers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_dispatcher", dispatcher_params("cpu"))
def test_every_dispatcher_gives_same_logits_and_grads(make_dispatcher):
    # Tiny: the triton permute runs in Triton's interpreter on CPU.
    model_hf = hf_model("gqa-top2", num_hidden_layers=1)
    reference = convert_mixtral_hf_to_te(model_hf).train()
    config = reference.config
    model = NVMixtralForCausalLM(config, dispatcher=make_dispatcher(config)).train()
    model.load_state_dict(reference.state_dict())
    assert model.dispatcher is not reference.dispatcher
    assert all(layer.mlp.dispatcher is model.dispatcher for layer in model.model.layers)
    assert_same_logits_and_grads(model, reference, tokens(2, 5))


def test_last_tokens_per_expert_records_the_load():
    model = convert_mixtral_hf_to_te(hf_model("odd-hidden-window"))
    assert model.model.layers[0].mlp.last_tokens_per_expert is None
    with torch.no_grad():
        model(tokens(2, 9))
    for layer in model.model.layers:
        counts = layer.mlp.last_tokens_per_expert
        assert counts.shape == (5,) and counts.dtype == torch.int64 and not counts.requires_grad
        assert int(counts.sum()) == 2 * 9 * 2


# --- precision / dtype --------------------------------------------------------------------------------
def test_router_stays_fp32_when_model_is_cast():
    model = convert_mixtral_hf_to_te(hf_model("gqa-top2")).to(torch.bfloat16)
    mlp = model.model.layers[0].mlp
    assert mlp.router.gate.weight.dtype == torch.float32
    assert mlp.experts.experts_down_weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    logits = model(tokens(2, 5)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    model.half()
    assert mlp.router.gate.weight.dtype == torch.float32


def test_fp8_recipe_errors():
    config = nv_config_from_hf(hf_config())
    with pytest.raises(RuntimeError, match="layer_precision"):
        NVMixtralForCausalLM(config, fp8_recipe=object(), fp4_recipe=object())
    config.layer_precision = ["fp4", None]
    with pytest.raises(RuntimeError, match="fp4_recipe"):
        NVMixtralForCausalLM(config, fp8_recipe=object())


def test_fp8_without_transformer_engine_says_how_to_install():
    try:
        import transformer_engine.pytorch  # noqa: F401
        pytest.skip("TransformerEngine is installed")
    except ImportError:
        pass
    config = nv_config_from_hf(hf_config())
    with pytest.raises(ImportError, match=r"moe_dispatch\[te\]"):
        NVMixtralForCausalLM(config, fp8_recipe=object())
    config.layer_precision = ["fp8", None]
    with pytest.raises(ImportError, match="transformer-engine"):
        NVMixtralForCausalLM(config)


# --- checkpoints ---------------------------------------------------------------------------------------
def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = convert_mixtral_hf_to_te(hf_model("window-top2-tied"), moe_aux_loss_coeff=0.01)
    model.save_pretrained(tmp_path)
    loaded = NVMixtralForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config, NVMixtralConfig) and loaded.config.moe_aux_loss_coeff == 0.01
    _assert_state_dicts_equal(model.state_dict(), loaded.state_dict())
    input_ids = tokens(2, 8)
    with torch.no_grad():  # not bitwise: safetensors' mmapped tensors are aligned differently (BLAS paths)
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=0)

    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(auto, NVMixtralForCausalLM)

    dispatcher = AllToAllTokenDispatcher(8, 8, 32, permute_backend="torch")
    bf16 = NVMixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, dispatcher=dispatcher)
    assert bf16.dispatcher is dispatcher
    assert bf16.model.layers[1].mlp.router.gate.weight.dtype == torch.float32
    assert bf16.model.layers[1].mlp.experts.experts_gate_up_weight.dtype == torch.bfloat16
    assert torch.equal(bf16.model.layers[1].mlp.router.gate.weight, model.model.layers[1].mlp.router.gate.weight)


def test_gradient_checkpointing_gives_same_grads():
    model = convert_mixtral_hf_to_te(hf_model("gqa-top2")).train()
    checkpointed = copy.deepcopy(model)
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers >= 5.2x
        checkpointed.activation_checkpointing_enable({"use_reentrant": False})
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.layers)
    input_ids = tokens(2, 6)
    model(input_ids, labels=input_ids, use_cache=False).loss.backward()
    checkpointed(input_ids, labels=input_ids, use_cache=False).loss.backward()
    assert_same_grads(checkpointed, model)


# --- config validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, field_name", [
    (dict(layer_precision=["fp8"]), "layer_precision"),
    (dict(layer_precision=["fp8", "int8"]), "layer_precision"),
    (dict(layer_precision="fp8"), "layer_precision"),
    (dict(attn_input_format="sbhd"), "attn_input_format"),
    (dict(num_local_experts=6, expert_parallel_size=4), "expert_parallel_size"),
    (dict(expert_parallel_size=0), "expert_parallel_size"),
    (dict(expert_backend="cutlass"), "expert_backend"),
    (dict(permute_backend="fast"), "permute_backend"),
    (dict(self_attn_mask_type="bidirectional"), "self_attn_mask_type"),
    (dict(moe_aux_loss_coeff=-1.0), "moe_aux_loss_coeff"),
    (dict(attn_backend="flash"), "attn_backend"),
])
def test_bad_config_raises_value_error_naming_the_field(fields, field_name):
    with pytest.raises(ValueError, match=field_name):
        NVMixtralConfig(num_hidden_layers=2, num_local_experts=fields.pop("num_local_experts", 8), **fields)


def test_config_round_trip(tmp_path):
    config = NVMixtralConfig(num_hidden_layers=3, layer_precision=["fp8", None, "fp4"], expert_parallel_size=2,
                             attn_input_format="thd", expert_backend="loop", moe_aux_loss_coeff=0.01,
                             rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
    config.save_pretrained(tmp_path)
    loaded = NVMixtralConfig.from_pretrained(tmp_path)
    assert loaded.model_type == "nv_mixtral"
    assert loaded.to_dict() == config.to_dict()
    assert loaded.num_experts_per_rank == 4
