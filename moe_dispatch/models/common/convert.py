"""Helpers of the HF <-> NV conversions every model shares (config fields, building without init,
checking that every tensor was converted)."""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch

from .config import NV_FIELDS

__all__ = ["nv_config_from_hf", "hf_config_from_nv", "oriented", "building", "check_loaded"]

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
