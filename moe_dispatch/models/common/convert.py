"""HF <-> NV conversion every model shares: the MoE weights' key mapping, config fields, building
without init, checking that every tensor was converted.

Key mapping (layer ``i`` an MoE layer, expert ``e``; ``model.`` prefix optional on input;
``<block>`` and the per-expert names come from :class:`HFMoENames`)::

    HF (transformers 5, in memory)        HF (checkpoints, per expert)             NV
    <block>.gate.weight [E, H]            <block>.gate.weight                      mlp.router.gate.weight (fp32)
    mlp.experts.gate_up_proj [E, 2I, H]   <block>.experts.e.<gate> [I, H]          mlp.experts.experts_gate_up_weight
                                          + <block>.experts.e.<up> [I, H]            [E, 2I, H] = [gate; up] per expert
    mlp.experts.down_proj [E, H, I]       <block>.experts.e.<down> [H, I]          mlp.experts.experts_down_weight

Everything else (embeddings, attention, norms, dense MLP layers, ``lm_head``) keeps its name. The
router is stored in fp32 and cast back to the HF model's dtype on the way back (exact for bf16 /
fp16 / fp32). A fused ``gate_up_proj`` stored transposed (``[E, H, 2I]``) is recognised by its
shape and transposed.
"""
from __future__ import annotations

import re
from collections.abc import Container, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import NV_FIELDS

__all__ = ["HFMoENames", "hf_moe_state_dict_to_nv", "nv_moe_state_dict_to_hf", "convert_hf_to_nv", "convert_nv_to_hf",
           "nv_config_from_hf", "hf_config_from_nv", "oriented", "building", "check_loaded"]

_CONFIG_META = ("model_type", "architectures", "transformers_version", "auto_map")


def nv_config_from_hf(hf_config, nv_config_class, **overrides):
    """A ``nv_config_class`` with every field of ``hf_config``, then ``overrides``.

    HF adds its router loss only with ``output_router_logits``; then ``moe_aux_loss_coeff``
    defaults to its ``router_aux_loss_coef``.
    """
    fields = {k: v for k, v in hf_config.to_dict().items() if k not in _CONFIG_META}
    if fields.get("output_router_logits"):
        fields["moe_aux_loss_coeff"] = fields.get("router_aux_loss_coef", 0.0)
    # Not a field of to_dict(); kept so that converting back gives the same attention kernel.
    fields["attn_implementation"] = getattr(hf_config, "_attn_implementation", None)
    fields.update(overrides)
    return nv_config_class(**fields)


def hf_config_from_nv(nv_config, hf_config_class):
    """The ``hf_config_class`` config of ``nv_config`` (its added fields dropped)."""
    fields = {k: v for k, v in nv_config.to_dict().items() if k not in _CONFIG_META and k not in NV_FIELDS}
    fields["attn_implementation"] = getattr(nv_config, "_attn_implementation", None)
    return hf_config_class(**fields)


def oriented(tensor: torch.Tensor, shape: tuple[int, int, int], name: str) -> torch.Tensor:
    if tuple(tensor.shape) == shape:
        return tensor
    if tuple(tensor.shape) == (shape[0], shape[2], shape[1]):
        return tensor.transpose(1, 2).contiguous()
    raise ValueError(f"{name} must have shape {list(shape)} (or its transpose in the last two dims), got {list(tensor.shape)}")


@contextmanager
def building(device: torch.device, dtype: torch.dtype):
    """Construct modules on ``device`` in ``dtype`` without running their initialisers."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


def check_loaded(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Every parameter / persistent buffer of ``model`` came from ``state`` (ignoring TE's
    ``_extra_state`` and tied weights), and nothing in ``state`` was left over."""
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")


@dataclass(frozen=True)
class HFMoENames:
    """How an HF model names its MoE block's weights.

    Attributes:
        blocks: names of the MoE block in the layer's keys, the one written per expert first
            (Mixtral: ``("block_sparse_moe", "mlp")``; Qwen3-MoE: ``("mlp",)``).
        per_expert: checkpoint names of an expert's gate, up and down projections
            (Mixtral: ``("w1", "w3", "w2")``; Qwen3-MoE: ``("gate_proj", "up_proj", "down_proj")``).
    """

    blocks: tuple[str, ...]
    per_expert: tuple[str, str, str]


def hf_moe_state_dict_to_nv(state_dict: Mapping[str, torch.Tensor], names: HFMoENames, *, num_experts: int,
                            hidden_size: int, intermediate_size: int,
                            moe_layers: Container[int]) -> dict[str, torch.Tensor]:
    """HF state dict (fused transformers-5 or per-expert keys) -> the NV models' (module docstring).

    Args:
        moe_layers: indices of the MoE layers; other layers' MLP keys are kept as they are.

    Raises:
        ValueError: missing / unexpected MoE keys or wrong shapes.
    """
    layer_re = re.compile(rf"^(?:model\.)?layers\.(\d+)\.(?:{'|'.join(map(re.escape, names.blocks))})\.(.+)$")
    expert_re = re.compile(rf"^experts\.(\d+)\.({'|'.join(map(re.escape, names.per_expert))})\.weight$")
    E, H, inter = num_experts, hidden_size, intermediate_size
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved
        match = layer_re.match(key)
        if match is None or int(match.group(1)) not in moe_layers:
            out[key if key.startswith(("model.", "lm_head.")) else f"model.{key}"] = tensor
            continue
        layer, rest = int(match.group(1)), match.group(2)
        prefix = f"model.layers.{layer}.mlp"
        if rest == "gate.weight":
            out[f"{prefix}.router.gate.weight"] = tensor.to(torch.float32)
        elif rest == "experts.gate_up_proj":
            out[f"{prefix}.experts.experts_gate_up_weight"] = oriented(tensor, (E, 2 * inter, H), key)
        elif rest == "experts.down_proj":
            out[f"{prefix}.experts.experts_down_weight"] = oriented(tensor, (E, H, inter), key)
        elif (expert_match := expert_re.match(rest)) is not None:
            per_expert.setdefault((layer, expert_match.group(2)), {})[int(expert_match.group(1))] = tensor
        else:
            raise ValueError(f"unexpected MoE key in the HF state dict: {key!r}")
    gate_name, up_name, down_name = names.per_expert
    for layer in sorted({layer for layer, _ in per_expert}):
        stacked = {}
        for w in names.per_expert:
            experts = per_expert.get((layer, w), {})
            if sorted(experts) != list(range(E)):
                raise ValueError(f"layer {layer}: {w} weights of experts {sorted(experts)} found, "
                                 f"expected experts 0..{E - 1}")
            stacked[w] = torch.stack([experts[e] for e in range(E)])
        prefix = f"model.layers.{layer}.mlp.experts"
        out[f"{prefix}.experts_gate_up_weight"] = torch.cat([stacked[gate_name], stacked[up_name]], dim=1)  # [E, 2I, H]
        out[f"{prefix}.experts_down_weight"] = stacked[down_name]  # [E, H, I]
    return out


def nv_moe_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                            names: HFMoENames) -> dict[str, torch.Tensor]:
    """NV state dict -> the layout of ``target`` (an HF state dict, for its keys, shapes and dtypes:
    fused ``gate_up_proj`` or per-expert weights)."""
    out: dict[str, torch.Tensor] = {}
    gate_name, up_name, down_name = names.per_expert
    for key, tensor in state_dict.items():
        if key.endswith("_extra_state"):
            continue  # TE FP8 scaling state: no HF counterpart
        match = re.match(r"^model\.layers\.(\d+)\.mlp\.(router\.gate\.weight|experts\.experts_(?:gate_up|down)_weight)$",
                         key)
        if match is None:  # not an MoE weight (dense MLP layers included): same name
            out[key] = tensor
            continue
        layer, rest = match.groups()
        if rest == "router.gate.weight":
            hf_key = _first_present(target, *(f"model.layers.{layer}.{block}.gate.weight" for block in names.blocks))
            out[hf_key] = tensor.to(target[hf_key].dtype)
            continue
        fused = f"model.layers.{layer}.mlp.experts." + ("gate_up_proj" if "gate_up" in rest else "down_proj")
        if fused in target:
            out[fused] = oriented(tensor, tuple(target[fused].shape), key) if tensor.shape != target[fused].shape else tensor
            continue
        prefix = f"model.layers.{layer}.{names.blocks[0]}.experts"
        if "gate_up" in rest:
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.{gate_name}.weight"], out[f"{prefix}.{e}.{up_name}.weight"] = gate[e], up[e]
        else:
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.{down_name}.weight"] = tensor[e]
    return out


def _first_present(mapping: Mapping, *keys: str) -> str:
    for key in keys:
        if key in mapping:
            return key
    raise ValueError(f"none of {keys} in the target HF model")


def convert_hf_to_nv(model_hf, config, nv_config_class, nv_model_class, state_dict_to_nv, *, dispatcher=None,
                     fp8_recipe=None, fp4_recipe=None, **config_overrides):
    """HF model (or HF state dict + ``config``) -> ``nv_model_class`` with the same weights (bitwise).

    ``state_dict_to_nv(hf_state_dict, nv_config)`` maps the keys. The model is built on the
    weights' device and dtype (router gates fp32), in ``model_hf``'s train/eval mode.
    """
    if isinstance(model_hf, Mapping):
        if config is None:
            raise ValueError("converting a state dict needs config= (the HF config)")
        state_dict, hf_config, training = model_hf, config, False
    else:
        state_dict, hf_config, training = model_hf.state_dict(), model_hf.config, model_hf.training
    nv_config = nv_config_from_hf(hf_config, nv_config_class, **config_overrides)
    nv_state = state_dict_to_nv(state_dict, nv_config)
    if "lm_head.weight" not in nv_state and nv_config.tie_word_embeddings:
        nv_state["lm_head.weight"] = nv_state["model.embed_tokens.weight"]
    embed = nv_state["model.embed_tokens.weight"]
    with building(embed.device, embed.dtype):
        model = nv_model_class(nv_config, fp8_recipe=fp8_recipe, fp4_recipe=fp4_recipe, dispatcher=dispatcher)
    model.load_state_dict(nv_state, strict=False)
    check_loaded(model, nv_state)
    return model.train(training)


def convert_nv_to_hf(model_nv, hf_config_class, hf_model_class, state_dict_to_hf):
    """NV model -> ``hf_model_class`` (bitwise weights; the router back in the model's dtype), on
    the same device, in the same train/eval mode. ``state_dict_to_hf(nv_state, hf_target_state)``.

    Raises:
        ValueError: the model holds only one EP rank's experts (``expert_parallel_size > 1``).
    """
    if model_nv.config.expert_parallel_size != 1:
        raise ValueError(f"converting {type(model_nv).__name__} to HF needs all experts: gather them "
                         f"(expert_parallel_size=1, e.g. save_final_model_ep) first")
    hf_config = hf_config_from_nv(model_nv.config, hf_config_class)
    embed = model_nv.model.embed_tokens.weight
    with building(embed.device, embed.dtype):
        model_hf = hf_model_class(hf_config)
    hf_state = state_dict_to_hf(model_nv.state_dict(), model_hf.state_dict())
    model_hf.load_state_dict(hf_state, strict=False)
    check_loaded(model_hf, hf_state)
    return model_hf.train(model_nv.training)
