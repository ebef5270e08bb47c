"""Convert between HF ``MixtralForCausalLM`` and :class:`NVMixtralForCausalLM` (bitwise both ways).

Key mapping (layer ``i``, expert ``e``; ``model.`` prefix optional on input)::

    HF (transformers 5, in memory)          HF (checkpoints, transformers 4)        NVMixtral
    mlp.gate.weight [E, H]                  block_sparse_moe.gate.weight            mlp.router.gate.weight (fp32)
    mlp.experts.gate_up_proj [E, 2I, H]     block_sparse_moe.experts.e.w1 [I, H]    mlp.experts.experts_gate_up_weight
                                            + ...experts.e.w3 [I, H]                  [E, 2I, H] = [w1; w3] per expert
    mlp.experts.down_proj [E, H, I]         block_sparse_moe.experts.e.w2 [H, I]    mlp.experts.experts_down_weight

Everything else (embeddings, attention projections, norms, ``lm_head``) keeps its name. The
router is stored in fp32 here and cast back to the HF model's dtype on the way back (exact for
bf16 / fp16 / fp32). A fused ``gate_up_proj`` stored transposed (``[E, H, 2I]``) is recognised by
its shape and transposed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from ..common.convert import building, check_loaded, oriented
from ..common.convert import hf_config_from_nv as _hf_config_from_nv
from ..common.convert import nv_config_from_hf as _nv_config_from_hf
from .config import NVMixtralConfig
from .modeling import NVMixtralForCausalLM

__all__ = ["convert_mixtral_hf_to_te", "convert_mixtral_te_to_hf", "hf_state_dict_to_te", "te_state_dict_to_hf",
           "nv_config_from_hf", "hf_config_from_nv"]

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(?:block_sparse_moe|mlp)\.(.+)$")
_PER_EXPERT = re.compile(r"^experts\.(\d+)\.(w1|w2|w3)\.weight$")


def nv_config_from_hf(hf_config: MixtralConfig, **overrides) -> NVMixtralConfig:
    """An ``NVMixtralConfig`` with every field of ``hf_config``, then ``overrides`` (HF's router
    loss coefficient carried over when ``output_router_logits``)."""
    return _nv_config_from_hf(hf_config, NVMixtralConfig, **overrides)


def hf_config_from_nv(nv_config: NVMixtralConfig) -> MixtralConfig:
    """The ``MixtralConfig`` of ``nv_config`` (its added fields dropped)."""
    return _hf_config_from_nv(nv_config, MixtralConfig)


def hf_state_dict_to_te(state_dict: Mapping[str, torch.Tensor], config: NVMixtralConfig) -> dict[str, torch.Tensor]:
    """HF Mixtral state dict (fused transformers-5 or per-expert ``w1/w2/w3`` keys) -> NVMixtral's.

    Raises:
        ValueError: missing / unexpected MoE keys, wrong shapes, or ``expert_parallel_size != 1``.
    """
    if config.expert_parallel_size != 1:
        raise ValueError("convert with expert_parallel_size=1 (all experts), then shard the experts over the EP group")
    num_experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved
        match = _LAYER.match(key)
        if match is None:
            out[key if key.startswith(("model.", "lm_head.")) else f"model.{key}"] = tensor
            continue
        layer, rest = int(match.group(1)), match.group(2)
        prefix = f"model.layers.{layer}.mlp"
        if rest == "gate.weight":
            out[f"{prefix}.router.gate.weight"] = tensor.to(torch.float32)
        elif rest == "experts.gate_up_proj":
            out[f"{prefix}.experts.experts_gate_up_weight"] = oriented(tensor, (num_experts, 2 * inter, hidden), key)
        elif rest == "experts.down_proj":
            out[f"{prefix}.experts.experts_down_weight"] = oriented(tensor, (num_experts, hidden, inter), key)
        elif (expert_match := _PER_EXPERT.match(rest)) is not None:
            per_expert.setdefault((layer, expert_match.group(2)), {})[int(expert_match.group(1))] = tensor
        else:
            raise ValueError(f"unexpected MoE key in the HF state dict: {key!r}")
    layers = sorted({layer for layer, _ in per_expert})
    for layer in layers:
        stacked = {}
        for w in ("w1", "w2", "w3"):
            experts = per_expert.get((layer, w), {})
            if sorted(experts) != list(range(num_experts)):
                raise ValueError(f"layer {layer}: {w} weights of experts {sorted(experts)} found, "
                                 f"expected experts 0..{num_experts - 1}")
            stacked[w] = torch.stack([experts[e] for e in range(num_experts)])
        prefix = f"model.layers.{layer}.mlp.experts"
        out[f"{prefix}.experts_gate_up_weight"] = torch.cat([stacked["w1"], stacked["w3"]], dim=1)  # [E, 2I, H]
        out[f"{prefix}.experts_down_weight"] = stacked["w2"]  # [E, H, I]
    return out


def te_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVMixtral state dict -> the layout of ``target`` (an HF Mixtral state dict, for its keys,
    shapes and dtypes: fused ``gate_up_proj`` or per-expert ``w1/w2/w3``)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("_extra_state"):
            continue  # TE FP8 scaling state: no HF counterpart
        match = re.match(r"^model\.layers\.(\d+)\.mlp\.(.+)$", key)
        if match is None:
            out[key] = tensor
            continue
        layer, rest = match.groups()
        if rest == "router.gate.weight":
            hf_key = _first_present(target, f"model.layers.{layer}.mlp.gate.weight",
                                    f"model.layers.{layer}.block_sparse_moe.gate.weight")
            out[hf_key] = tensor.to(target[hf_key].dtype)
        elif rest in ("experts.experts_gate_up_weight", "experts.experts_down_weight"):
            fused = f"model.layers.{layer}.mlp.experts." + ("gate_up_proj" if "gate_up" in rest else "down_proj")
            if fused in target:
                out[fused] = oriented(tensor, tuple(target[fused].shape), key) if tensor.shape != target[fused].shape else tensor
                continue
            prefix = f"model.layers.{layer}.block_sparse_moe.experts"
            if "gate_up" in rest:
                gate, up = tensor.chunk(2, dim=1)
                for e in range(tensor.shape[0]):
                    out[f"{prefix}.{e}.w1.weight"], out[f"{prefix}.{e}.w3.weight"] = gate[e], up[e]
            else:
                for e in range(tensor.shape[0]):
                    out[f"{prefix}.{e}.w2.weight"] = tensor[e]
        else:
            raise ValueError(f"unexpected MoE key in the NVMixtral state dict: {key!r}")
    return out


def _first_present(mapping: Mapping, *keys: str) -> str:
    for key in keys:
        if key in mapping:
            return key
    raise ValueError(f"none of {keys} in the target HF model")


def convert_mixtral_hf_to_te(model_hf, *, config: MixtralConfig | None = None, dispatcher=None, fp8_recipe=None,
                             fp4_recipe=None, **config_overrides) -> NVMixtralForCausalLM:
    """HF Mixtral -> :class:`NVMixtralForCausalLM` with the same weights (bitwise).

    Args:
        model_hf: a ``transformers.MixtralForCausalLM``, or an HF state dict (fused or per-expert
            ``w1/w2/w3`` keys, e.g. read from safetensors files) together with ``config``.
        config: the ``MixtralConfig`` when ``model_hf`` is a state dict.
        dispatcher, fp8_recipe, fp4_recipe: passed to ``NVMixtralForCausalLM``.
        config_overrides: ``NVMixtralConfig`` fields, e.g. ``expert_backend="loop"``.

    Returns:
        The model on ``model_hf``'s device and dtype (router gates fp32), in its train/eval mode.
    """
    if isinstance(model_hf, Mapping):
        if config is None:
            raise ValueError("converting a state dict needs config= (the HF MixtralConfig)")
        state_dict, hf_config, training = model_hf, config, False
    else:
        state_dict, hf_config, training = model_hf.state_dict(), model_hf.config, model_hf.training
    nv_config = nv_config_from_hf(hf_config, **config_overrides)
    nv_state = hf_state_dict_to_te(state_dict, nv_config)
    if "lm_head.weight" not in nv_state and nv_config.tie_word_embeddings:
        nv_state["lm_head.weight"] = nv_state["model.embed_tokens.weight"]
    embed = nv_state["model.embed_tokens.weight"]
    with building(embed.device, embed.dtype):
        model = NVMixtralForCausalLM(nv_config, fp8_recipe=fp8_recipe, fp4_recipe=fp4_recipe, dispatcher=dispatcher)
    model.load_state_dict(nv_state, strict=False)
    check_loaded(model, nv_state)
    return model.train(training)


def convert_mixtral_te_to_hf(model_te: NVMixtralForCausalLM) -> MixtralForCausalLM:
    """:class:`NVMixtralForCausalLM` -> ``transformers.MixtralForCausalLM`` (bitwise weights; the
    router back in the model's dtype), on the same device, in the same train/eval mode.

    Raises:
        ValueError: the model holds only one EP rank's experts (``expert_parallel_size > 1``).
    """
    if model_te.config.expert_parallel_size != 1:
        raise ValueError("convert_mixtral_te_to_hf needs all experts: gather them (expert_parallel_size=1) first")
    hf_config = hf_config_from_nv(model_te.config)
    embed = model_te.model.embed_tokens.weight
    with building(embed.device, embed.dtype):
        model_hf = MixtralForCausalLM(hf_config)
    hf_state = te_state_dict_to_hf(model_te.state_dict(), model_hf.state_dict())
    model_hf.load_state_dict(hf_state, strict=False)
    check_loaded(model_hf, hf_state)
    return model_hf.train(model_te.training)
