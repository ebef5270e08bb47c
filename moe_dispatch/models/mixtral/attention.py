"""Mixtral self-attention: GQA, RoPE, optional sliding window, causal; SDPA or TransformerEngine.

Shape legend::

    B  batch          S  query tokens of this forward      T  packed tokens (THD, B == 1)
    h  query heads    g  key/value heads (GQA)             D  head dim       H  hidden size
    C  cached + new key/value tokens visible to a query (``C >= S``)

Both backends share one parameter layout, HF's (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
no bias), so a checkpoint loads whatever the machine:

- ``"sdpa"``: ``nn.Linear`` projections + ``F.scaled_dot_product_attention`` (any device). It
  handles every case: KV cache (transformers ``Cache``), left/right padding, sliding window,
  packed THD input (block-diagonal causal mask).
- ``"te"``: ``te.Linear`` projections (FP8 / FP4 under ``te.autocast``) + TE
  ``DotProductAttention`` (fused kernels, ``thd`` with ``cu_seqlens``). TE's core runs when no
  earlier tokens are cached and there is no padding (training, prefill of unpadded batches);
  otherwise (decoding steps, padded batches) the same projections feed the SDPA core.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_dispatch.experts import import_transformer_engine

from .._cache import kv_positions

__all__ = ["AttentionInputs", "NVMixtralAttention", "NVMixtralRotaryEmbedding", "NVMixtralRMSNorm",
           "apply_rotary_pos_emb", "rope_theta", "resolve_attn_backend", "packed_position_ids"]


def rope_theta(config) -> float:
    """RoPE base: ``config.rope_parameters["rope_theta"]`` (transformers 5), else ``config.rope_theta``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    if theta is not None:
        return float(theta)
    return float(getattr(config, "default_theta", 1_000_000.0))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def resolve_attn_backend(backend: str) -> str:
    """``"auto"`` -> ``"te"`` when TransformerEngine imports and CUDA is available, else ``"sdpa"``."""
    if backend == "auto":
        if not torch.cuda.is_available():
            return "sdpa"
        try:
            import_transformer_engine()
        except ImportError:
            return "sdpa"
        return "te"
    if backend not in ("sdpa", "te"):
        raise ValueError(f"attn_backend must be one of ('auto', 'sdpa', 'te'), got {backend!r}")
    return backend


class NVMixtralRMSNorm(nn.Module):
    """RMSNorm with HF Mixtral's numerics (normalise in fp32, scale in the input dtype)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[..., H] -> [..., H]`` in the input dtype."""
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


class NVMixtralRotaryEmbedding(nn.Module):
    """cos / sin tables of RoPE for given positions (HF's ``MixtralRotaryEmbedding`` math).

    Laid out like HF's (``inv_freq``, ``original_inv_freq``, ``rope_type``, ``config``,
    ``compute_default_rope_parameters``) so ``PreTrainedModel._init_weights`` recomputes the
    buffers after a meta-device ``from_pretrained``. Non-default ``rope_type`` use transformers'
    ``ROPE_INIT_FUNCTIONS`` (static scaling only).
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        params = getattr(config, "rope_parameters", None) or {}
        self.rope_type = params.get("rope_type", "default")
        inv_freq, self.attention_scaling = self._rope_init_fn()(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    def _rope_init_fn(self):
        if self.rope_type == "default":
            return self.compute_default_rope_parameters
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope_parameters['rope_type'] must be one of {sorted(ROPE_INIT_FUNCTIONS)}, got {self.rope_type!r}")
        return ROPE_INIT_FUNCTIONS[self.rope_type]

    @staticmethod
    def compute_default_rope_parameters(config, *args, **kwargs) -> tuple[torch.Tensor, float]:
        """``(inv_freq fp32 [D/2], attention_scaling=1.0)`` of the original RoPE."""
        dim = _head_dim(config)
        inv_freq = 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids [B, S]`` -> ``(cos, sin)`` ``[B, S, D]`` in ``x``'s dtype (computed in fp32)."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """RoPE on ``q [B, h, S, D]`` and ``k [B, g, S, D]`` with ``cos``/``sin`` ``[B, S, D]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def packed_position_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """int64 ``[1, T]``: positions restarting at 0 at each ``cu_seqlens`` boundary.

    Example: ``cu_seqlens = [0, 3, 5]`` -> ``[[0, 1, 2, 0, 1]]``.
    """
    tokens = torch.arange(total_tokens, device=cu_seqlens.device)
    seq_id = torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)
    return (tokens - cu_seqlens.long()[seq_id]).unsqueeze(0)


@dataclass(frozen=True)
class AttentionInputs:
    """Per-forward masking facts, shared by all layers (built once by the model).

    Attributes:
        padding_mask: bool ``[B, past_length + S]`` (True: real token) or None (no padding).
        past_length: tokens already in the KV cache before this forward (0 without cache).
        cu_seqlens: int32 ``[num_seqs + 1]`` for packed THD input, else None.
        max_seqlen: longest packed sequence (THD), else None.
    """

    padding_mask: torch.Tensor | None = None
    past_length: int = 0
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None


class NVMixtralAttention(nn.Module):
    """Multi-head self-attention with grouped KV heads and rotary embeddings.

    Args:
        config: an ``NVMixtralConfig`` (``hidden_size``, ``num_attention_heads``,
            ``num_key_value_heads``, ``head_dim``, ``sliding_window``, ``attention_dropout``).
        layer_idx: index of the layer in the KV cache.
        backend: ``"sdpa"`` or ``"te"`` (resolved, see :func:`resolve_attn_backend`).
    """

    def __init__(self, config, layer_idx: int, backend: str = "sdpa") -> None:
        super().__init__()
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({config.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({config.num_key_value_heads})")
        self.layer_idx = layer_idx
        self.backend = backend
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = _head_dim(config)
        self.scaling = self.head_dim ** -0.5
        self.sliding_window = config.sliding_window
        self.attention_dropout = config.attention_dropout
        hidden, q_out, kv_out = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if backend == "te":
            te = import_transformer_engine()
            device = torch.get_default_device() if hasattr(torch, "get_default_device") else "cuda"
            linear = lambda i, o: te.Linear(i, o, bias=False, device=device, params_dtype=torch.get_default_dtype())  # noqa: E731
            window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
            self.core_attention = te.DotProductAttention(
                self.num_heads, self.head_dim, num_gqa_groups=self.num_kv_heads,
                attention_dropout=self.attention_dropout, qkv_format="bshd", attn_mask_type="causal",
                window_size=window, layer_number=layer_idx + 1, softmax_scale=self.scaling)
        else:
            linear = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
            self.core_attention = None
        self.q_proj = linear(hidden, q_out)
        self.k_proj = linear(hidden, kv_out)
        self.v_proj = linear(hidden, kv_out)
        self.o_proj = linear(q_out, hidden)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_inputs: AttentionInputs,
        past_key_values=None,
    ) -> torch.Tensor:
        """Self-attention of ``hidden_states [B, S, H]`` (``[1, T, H]`` when packed).

        Args:
            position_embeddings: ``(cos, sin)`` ``[B, S, D]`` from the rotary embedding.
            attention_inputs: padding / cache / packing facts of this forward.
            past_key_values: a transformers ``Cache`` (updated in place) or None.

        Returns:
            ``[B, S, H]``.
        """
        batch, seq, _ = hidden_states.shape
        q_BhSD = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k_BgSD = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BgSD = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        q_BhSD, k_BgSD = apply_rotary_pos_emb(q_BhSD, k_BgSD, cos, sin)

        kv_len, kv_pos_C = kv_positions(past_key_values, self.layer_idx, seq, attention_inputs.past_length,
                                        hidden_states.device)
        if past_key_values is not None:
            k_BgSD, v_BgSD = past_key_values.update(k_BgSD, v_BgSD, self.layer_idx)  # now [B, g, C, D]
            if k_BgSD.shape[2] != kv_len:
                raise RuntimeError(
                    f"{type(past_key_values).__name__}.update returned {k_BgSD.shape[2]} keys for layer {self.layer_idx} "
                    f"but get_mask_sizes announced {kv_len}: the transformers Cache API (get_mask_sizes(query_length, "
                    f"layer_idx) -> (kv_length, kv_offset)) changed")

        # TE's fused core covers self-attention over exactly this forward's tokens (training,
        # prefill): no earlier cached tokens and no padding.
        use_te = (self.core_attention is not None and hidden_states.is_cuda and attention_inputs.past_length == 0
                  and k_BgSD.shape[2] == seq and attention_inputs.padding_mask is None)
        if use_te:
            out_BSX = self._te_core(q_BhSD, k_BgSD, v_BgSD, attention_inputs)
        else:
            out_BSX = self._sdpa_core(q_BhSD, k_BgSD, v_BgSD, attention_inputs, kv_pos_C)
        return self.o_proj(out_BSX)

    # --- cores: [B, h, S, D] q and [B, g, C, D] k, v -> [B, S, h*D] ------------------------------
    def _sdpa_core(self, q, k, v, inputs: AttentionInputs, kv_pos: torch.Tensor) -> torch.Tensor:
        batch, _, seq, _ = q.shape
        mask, is_causal = self._sdpa_mask(inputs, batch, seq, kv_pos, q.device, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling,
            dropout_p=self.attention_dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads)
        return out.transpose(1, 2).reshape(batch, seq, -1)

    def _sdpa_mask(self, inputs: AttentionInputs, batch, q_len, kv_pos: torch.Tensor, device, dtype):
        """``(additive mask [B|1, 1, S, C] or None, is_causal)`` for SDPA.

        Key ``j`` has token position ``kv_pos[j]`` (see :func:`moe_dispatch.models._cache.kv_positions`:
        every transformers cache layer returns keys at consecutive positions from an offset;
        a static cache's unwritten slots lie past the last query and stay causally masked),
        query ``i`` position ``past + i``. Fully masked rows (left padding) attend uniformly,
        as HF's eager mask.
        """
        past, window, kv_len = inputs.past_length, self.sliding_window, kv_pos.numel()
        if inputs.cu_seqlens is not None:  # packed: block-diagonal causal
            pos = torch.arange(q_len, device=device)
            seq_id = torch.searchsorted(inputs.cu_seqlens[1:].long().to(device), pos, right=True)
            allowed = (seq_id[:, None] == seq_id[None, :]) & (pos[None, :] <= pos[:, None])
            if window is not None:
                allowed &= pos[None, :] > pos[:, None] - window
            allowed = allowed[None, None]
        else:
            if (inputs.padding_mask is None and past == 0 and kv_len == q_len
                    and (window is None or window >= q_len)):
                return None, True
            q_pos = past + torch.arange(q_len, device=device)
            allowed = kv_pos[None, :] <= q_pos[:, None]
            if window is not None:
                allowed &= kv_pos[None, :] > q_pos[:, None] - window
            allowed = allowed[None, None]
            if inputs.padding_mask is not None:
                # static-cache slots past the last token have no mask entry; causality hides them
                last = inputs.padding_mask.shape[1] - 1
                allowed = allowed & inputs.padding_mask[:, kv_pos.clamp(max=last)][:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min), False

    def _te_core(self, q, k, v, inputs: AttentionInputs) -> torch.Tensor:
        batch, _, seq, _ = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, heads, D]
        if inputs.cu_seqlens is None:
            out = self.core_attention(q.contiguous(), k.contiguous(), v.contiguous(), qkv_format="bshd",
                                      attn_mask_type="causal")
            return out.view(batch, seq, -1)
        cu = inputs.cu_seqlens.to(device=q.device, dtype=torch.int32)
        max_seqlen = inputs.max_seqlen
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())  # host sync: TE needs the longest sequence
        out = self.core_attention(
            q[0].contiguous(), k[0].contiguous(), v[0].contiguous(), qkv_format="thd", attn_mask_type="padding_causal",
            cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
        return out.view(1, seq, -1)
