"""What the model tests share: HF-style tiny models' weights and prompts, and assertions of an NV
model's outputs against transformers' on HF's conventions (and of two NV models against each other)."""
from __future__ import annotations

import torch

from moe_dispatch.models._cache import CACHE_FIELD

VOCAB = 96


def randomize_weights_(model: torch.nn.Module) -> torch.nn.Module:
    """Re-randomise larger than HF's init (std 0.02 makes every model nearly the same function and
    hides differences): norm weights (layer norms, q/k norms) uniform in [0.5, 1.5], the rest N(0, 0.15)."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    return model


def prompts(batch: int, seq: int, seed: int, left_pad: bool = False):
    """``(ids, mask)`` ``[batch, seq]``: random tokens ``>= 3``; with ``left_pad`` row ``b`` starts
    with ``min(seq - 1, 2 * b)`` pad tokens (id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        for b in range(1, batch):
            pad = min(seq - 1, 2 * b)
            ids[b, :pad] = 0
            mask[b, :pad] = 0
    return ids, mask


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


def assert_padded_loss_equals_hf(model_hf, model_nv, padding: str, seed: int, coefficient: float):
    """A ``[3, 9]`` batch padded ``"none"``, ``"left"`` or ``"right"``, labels -100 on padding:
    logits of the real tokens (HF's eager attention leaves padded rows arbitrary), then
    :func:`assert_loss_and_router_logits_equal_hf`. Returns ``(out_nv, out_hf)``."""
    ids, mask = prompts(3, 9, seed, left_pad=padding == "left")
    if padding == "right":
        mask[1, 6:] = 0
        mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out_hf = model_hf(ids, attention_mask=mask, labels=labels)
        out_nv = model_nv(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(
        out_nv.logits[real], out_hf.logits[real], atol=1e-5, rtol=0,
        msg=lambda m: f"logits of real tokens differ from {type(model_hf).__name__}'s (padding={padding}): {m}")
    assert_loss_and_router_logits_equal_hf(out_nv, out_hf, coefficient)
    return out_nv, out_hf


def assert_generate_equals_hf(model_hf, model_nv, what: str, *, seq: int, seed: int, nv_only: dict | None = None,
                              **kwargs) -> None:
    """On left-padded ``[3, seq]`` :func:`prompts` from ``seed``, ``generate(ids, attention_mask=mask,
    do_sample=False, pad_token_id=0, **kwargs)`` gives HF's tokens; ``nv_only`` goes to our
    ``generate`` alone (e.g. ``cache_implementation="static"`` against HF's dynamic cache, the
    reference tokens). ``what`` names the call in the message."""
    ids, mask = prompts(3, seq, seed, left_pad=True)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, **kwargs)
    ref = model_hf.generate(ids, **kwargs)
    out = model_nv.generate(ids, **(nv_only or {}), **kwargs)
    assert torch.equal(out, ref), (f"{what} differs from transformers' "
                                   f"{type(model_hf).__name__}.generate:\n{out}\n{ref}")


def assert_cache_under_both_names(model_nv, ids, prefix: int = 4) -> None:
    """A ``DynamicCache`` passed as ``cache=`` or ``past_key_values=`` comes back as
    ``output[CACHE_FIELD]``, and decoding after ``prefix`` tokens with it equals a full forward."""
    from transformers.cache_utils import DynamicCache

    full = model_nv(ids, use_cache=False).logits
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=model_nv.config)
        first = model_nv(ids[:, :prefix], **{name: cache})
        assert first[CACHE_FIELD] is cache, f"the cache passed as {name}= must come back as output.{CACHE_FIELD}"
        step = model_nv(ids[:, prefix:], **{name: cache})
        torch.testing.assert_close(step.logits, full[:, prefix:], atol=1e-5, rtol=0,
                                   msg=lambda m: f"cached decoding with {name}= differs from a full forward: {m}")


def assert_same_grads(model, reference, atol: float = 1e-6) -> None:
    """Every parameter's ``.grad`` of ``model`` equals ``reference``'s (matched by name)."""
    grads_ref = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads_ref[name].grad, atol=atol, rtol=0, msg=name)


def assert_same_logits_and_grads(model, reference, input_ids, atol: float = 1e-6) -> None:
    """``model`` and ``reference`` (same weights, in train mode): LM forward with ``labels=input_ids``
    gives the same logits, and ``loss.backward()`` the same gradients."""
    out_ref = reference(input_ids, labels=input_ids)
    out = model(input_ids, labels=input_ids)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=atol, rtol=0)
    out_ref.loss.backward()
    out.loss.backward()
    assert_same_grads(model, reference, atol)
