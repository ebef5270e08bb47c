"""NVMixtral against transformers' MixtralForCausalLM on the conventions users meet through HF:
KV caches and ``generate``, the router (load-balancing) loss, ``router_logits``, activations.

Weights are re-randomised larger than HF's init (std 0.02 makes every model nearly the same
function and hides differences). Every assertion message names the HF API or convention that
differed, so an API change in a new transformers release says what moved.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moe_dispatch.models._cache import CACHE_FIELD
from moe_dispatch.models.mixtral import NVMixtralConfig, NVMixtralForCausalLM, convert_mixtral_hf_to_te

from .hf_checks import (VOCAB, assert_cache_under_both_names, assert_generate_equals_hf, assert_padded_loss_equals_hf,
                        prompts, randomize_weights_)

CONFIGS = {
    "gqa-top2": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                     num_local_experts=4, num_experts_per_tok=2),
    "window-top1": dict(hidden_size=24, head_dim=8, intermediate_size=40, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=1, sliding_window=5),
    "mha-top3": dict(hidden_size=32, intermediate_size=24, num_attention_heads=4, num_key_value_heads=4,
                     num_local_experts=5, num_experts_per_tok=3),
}


def hf_model(name: str, seed: int, num_hidden_layers: int = 2, **overrides) -> MixtralForCausalLM:
    fields = dict(vocab_size=VOCAB, num_hidden_layers=num_hidden_layers, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, attn_implementation="eager", **CONFIGS[name])
    fields.update(overrides)
    torch.manual_seed(seed)
    return randomize_weights_(MixtralForCausalLM(MixtralConfig(**fields)).eval())


# --- KV cache conventions and generate ------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_left_padded_batch_equals_hf(name, seed, use_cache):
    model_hf = hf_model(name, seed)
    model_nv = convert_mixtral_hf_to_te(model_hf).eval()
    assert_generate_equals_hf(model_hf, model_nv, f"greedy generate (use_cache={use_cache})", seq=7, seed=seed,
                              max_new_tokens=8, use_cache=use_cache)


@pytest.mark.parametrize("name", ["gqa-top2", "window-top1"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_equals_hf(name, use_cache):
    model_hf = hf_model(name, seed=3)
    model_nv = convert_mixtral_hf_to_te(model_hf).eval()
    assert_generate_equals_hf(model_hf, model_nv, f"beam search (num_beams=3, use_cache={use_cache})", seq=6, seed=3,
                              max_new_tokens=6, num_beams=3, use_cache=use_cache)


@pytest.mark.parametrize("name", ["gqa-top2", "window-top1"])
def test_static_cache_generate_equals_hf(name):
    """``cache_implementation="static"``: a preallocated cache (sliding-window layers too) and,
    on transformers >= 5.24, generate's 4-D mask hook (``create_masks_for_generate``)."""
    model_hf = hf_model(name, seed=4)
    model_nv = convert_mixtral_hf_to_te(model_hf).eval()
    assert_generate_equals_hf(model_hf, model_nv, "generate(cache_implementation='static')", seq=6, seed=4,
                              nv_only=dict(cache_implementation="static"), max_new_tokens=7)


def test_forward_takes_the_cache_under_both_names_and_returns_it():
    from transformers.cache_utils import DynamicCache

    model_nv = convert_mixtral_hf_to_te(hf_model("gqa-top2", seed=5)).eval()
    ids, _ = prompts(2, 6, 5, left_pad=False)
    assert_cache_under_both_names(model_nv, ids)
    with pytest.raises(ValueError, match="KV cache once"):
        model_nv(ids, cache=DynamicCache(config=model_nv.config), past_key_values=DynamicCache(config=model_nv.config))


def test_transformers_generate_api_we_rely_on():
    """What this package's models assume of transformers; each failure names the API."""
    from transformers import GenerationMixin
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    fields = MoeCausalLMOutputWithPast.__dataclass_fields__
    assert "cache" in fields or "past_key_values" in fields, (
        "transformers' MoeCausalLMOutputWithPast has neither a 'cache' nor a 'past_key_values' field")
    prepare = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert CACHE_FIELD in prepare, (
        f"GenerationMixin.prepare_inputs_for_generation no longer takes {CACHE_FIELD!r}; "
        f"models/_cache.py CACHE_FIELD must follow the new name (parameters: {list(prepare)})")
    forward = inspect.signature(NVMixtralForCausalLM.forward).parameters
    assert "cache" in forward and "past_key_values" in forward
    mask_sizes = list(inspect.signature(Cache.get_mask_sizes).parameters)
    assert mask_sizes[1:3] == ["query_length", "layer_idx"], (
        f"transformers' Cache.get_mask_sizes(query_length, layer_idx) changed to {mask_sizes}: "
        "models/_cache.kv_positions relies on it")


# --- router loss, router logits -------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_with_router_logits_equals_hf(layers, padding, seed):
    """HF pools all layers' router statistics into one loss (``load_balancing_loss_func``) and
    leaves padding (attention_mask == 0) out of them."""
    model_hf = hf_model("gqa-top2", seed, num_hidden_layers=layers, output_router_logits=True,
                        router_aux_loss_coef=0.05)
    model_nv = convert_mixtral_hf_to_te(model_hf).eval()
    assert model_nv.config.moe_aux_loss_type == "global" and model_nv.config.moe_aux_loss_coeff == 0.05
    out_nv, out_hf = assert_padded_loss_equals_hf(model_hf, model_nv, padding, seed, 0.05)
    assert len(out_nv.router_logits) == len(out_hf.router_logits) == layers


def test_output_router_logits_at_call_time_switches_hfs_loss_on():
    model_hf = hf_model("mha-top3", seed=2, num_hidden_layers=2, router_aux_loss_coef=0.03)
    model_nv = convert_mixtral_hf_to_te(model_hf).eval()
    ids, mask = prompts(2, 8, 2, left_pad=True)
    with torch.no_grad():
        for flag in (None, False, True):
            kw = {} if flag is None else dict(output_router_logits=flag)
            out_hf = model_hf(ids, attention_mask=mask, labels=ids, **kw)
            out_nv = model_nv(ids, attention_mask=mask, labels=ids, **kw)
            torch.testing.assert_close(out_nv.loss, out_hf.loss, atol=1e-5, rtol=0,
                                       msg=lambda m: f"loss with output_router_logits={flag} differs from HF: {m}")
            assert (out_nv.router_logits is None) == (out_hf.router_logits is None)
            assert (out_nv.aux_loss is None) == (out_hf.aux_loss is None)


def test_per_layer_loss_is_the_sum_of_each_layers_loss():
    from moe_dispatch.routing import load_balancing_loss, router_load_stats

    model_hf = hf_model("gqa-top2", seed=6, num_hidden_layers=3)
    model_nv = convert_mixtral_hf_to_te(model_hf, moe_aux_loss_coeff=0.1, moe_aux_loss_type="per_layer").eval()
    ids, mask = prompts(2, 7, 6, left_pad=True)
    with torch.no_grad():
        out = model_nv(ids, attention_mask=mask, output_router_logits=True)
    token_mask = mask.reshape(-1).bool()
    ref = sum(load_balancing_loss(router_load_stats(torch.softmax(l, -1), torch.softmax(l, -1).topk(2, -1).indices,
                                                    token_mask), 2) for l in out.router_logits)
    torch.testing.assert_close(out.aux_loss, 0.1 * ref)
    glob = convert_mixtral_hf_to_te(model_hf, moe_aux_loss_coeff=0.1)(ids, attention_mask=mask).aux_loss
    assert not torch.allclose(glob, out.aux_loss), "global and per_layer must differ on a 3-layer model"
    with pytest.raises(ValueError, match="moe_aux_loss_type"):
        NVMixtralConfig(moe_aux_loss_type="sum")


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "gelu_new", "relu", "silu"])
def test_hidden_act_golden(act):
    model_hf = hf_model("gqa-top2", seed=7, hidden_act=act)
    model_nv = convert_mixtral_hf_to_te(model_hf).eval()
    ids, _ = prompts(2, 8, 7, left_pad=False)
    with torch.no_grad():
        torch.testing.assert_close(model_nv(ids).logits, model_hf(ids).logits, atol=1e-5, rtol=0,
                                   msg=lambda m: f"hidden_act={act!r} differs from HF's ACT2FN[{act!r}]: {m}")


def test_activations_match_transformers_act2fn_bitwise():
    from transformers.activations import ACT2FN

    from moe_dispatch.experts import ACTIVATIONS

    x = torch.randn(4096) * 4
    for name, fn in ACTIVATIONS.items():
        assert torch.equal(fn(x), ACT2FN[name](x)), f"activation {name!r} differs from transformers' ACT2FN[{name!r}]"
    with pytest.raises(ValueError, match="hidden_act"):
        NVMixtralConfig(hidden_act="softplus2")
