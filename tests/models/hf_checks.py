"""Assertions the model tests share: an NV model's outputs against transformers' on HF's conventions."""
from __future__ import annotations

import torch


def assert_loss_and_router_logits_equal_hf(out_nv, out_hf, coefficient: float) -> None:
    """``aux_loss`` (ours scaled, HF's unscaled: ``load_balancing_loss_func``), ``loss`` (LM +
    ``router_aux_loss_coef * aux``) and ``router_logits`` (one ``[B * S, E]`` per MoE layer)."""
    torch.testing.assert_close(out_nv.aux_loss, coefficient * out_hf.aux_loss, atol=1e-6, rtol=1e-5,
                               msg=lambda m: f"router loss differs from HF's load_balancing_loss_func: {m}")
    torch.testing.assert_close(out_nv.loss, out_hf.loss, atol=1e-5, rtol=0,
                               msg=lambda m: f"loss (LM + router_aux_loss_coef * aux) differs from HF's: {m}")
    assert len(out_nv.router_logits) == len(out_hf.router_logits), "router_logits: one per MoE layer, as HF"
    for ours, theirs in zip(out_nv.router_logits, out_hf.router_logits):
        assert ours.shape == theirs.shape, f"router_logits shape {ours.shape} != HF's {theirs.shape}"
        torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)
