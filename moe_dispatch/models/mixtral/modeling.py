"""Mixtral on a pluggable token dispatcher: HF-compatible, per-layer FP8 / FP4, THD packing.

Shape legend::

    B  batch     S  tokens per sequence of this forward    T  packed tokens (THD)
    N  tokens (B * S)     H  hidden size     V  vocabulary     E  experts (global)

Each decoder layer is HF Mixtral's: ``x + attn(norm(x))`` then ``x + moe(norm(x))``; the MoE
block is route -> dispatch -> experts -> combine on a :class:`~moe_dispatch.TokenDispatcher`
shared by all layers.

Parameter layout (per layer ``i``; the expert weights hold only this EP rank's
``E // expert_parallel_size`` experts, stacked so they can be wrapped as DTensor ``Shard(0)``)::

    model.layers.i.self_attn.{q,k,v,o}_proj.weight
    model.layers.i.input_layernorm.weight / post_attention_layernorm.weight
    model.layers.i.mlp.router.gate.weight                 [E, H]        fp32 always
    model.layers.i.mlp.experts.experts_gate_up_weight     [E/P, 2I, H]  gate rows, then up rows
    model.layers.i.mlp.experts.experts_down_weight        [E/P, H, I]

With ``expert_parallel_size = P > 1`` call ``model.set_ep_groups(...)`` on every rank: the two
expert weights become DTensor ``Shard(0)`` parameters (global ``[E, ...]``) and the gradient
convention of :mod:`.parallel` applies (``finalize_ep_gradients`` after backward).
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from moe_dispatch import AllToAllTokenDispatcher, TokenDispatcher, TopKRouter
from moe_dispatch.routing import LoadStats, pool_load_stats
from moe_dispatch.experts import SwiGLUExperts, import_transformer_engine
from moe_dispatch.moe import MoELayer, MoEOutput

from .attention import (AttentionInputs, NVMixtralAttention, NVMixtralRMSNorm, NVMixtralRotaryEmbedding,
                        packed_position_ids, resolve_attn_backend)
from .._cache import CACHE_FIELD, cache_length, resolve_cache, with_cache
from .config import NVMixtralConfig
from .parallel import EPState, set_ep_groups, slice_full_expert_weights

try:  # transformers' init helpers skip parameters that from_pretrained already loaded
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - older transformers
    _init = torch.nn.init

__all__ = ["NVMixtralPreTrainedModel", "NVMixtralModel", "NVMixtralForCausalLM", "NVMixtralSparseMoeBlock",
           "NVMixtralDecoderLayer", "NVMixtralModelOutput", "default_dispatcher", "resolve_layer_precision"]


def default_dispatcher(config: NVMixtralConfig) -> AllToAllTokenDispatcher:
    """``AllToAllTokenDispatcher(E, E // P, H, P, permute_backend=config.permute_backend)``."""
    ep = config.expert_parallel_size
    return AllToAllTokenDispatcher(config.num_local_experts, config.num_local_experts // ep, config.hidden_size, ep,
                                   permute_backend=config.permute_backend)


def resolve_layer_precision(config: NVMixtralConfig, fp8_recipe=None, fp4_recipe=None) -> list[tuple[str | None, object]]:
    """``[(precision, recipe)]`` per layer from ``config.layer_precision`` and the recipes.

    - no ``layer_precision``: ``fp8_recipe`` alone -> all layers FP8; ``fp4_recipe`` alone -> all FP4;
      both -> RuntimeError (ambiguous); neither -> all high precision.
    - an ``"fp4"`` layer needs ``fp4_recipe`` (RuntimeError); an ``"fp8"`` layer without
      ``fp8_recipe`` uses TE's default recipe (``recipe=None``).

    Raises:
        RuntimeError: ambiguous / missing recipe.
        ImportError: a quantized layer without TransformerEngine installed.
    """
    precisions = config.layer_precision
    if precisions is None:
        if fp8_recipe is not None and fp4_recipe is not None:
            raise RuntimeError("fp8_recipe and fp4_recipe both given without config.layer_precision: "
                               "set layer_precision to say which layers use which")
        default = "fp8" if fp8_recipe is not None else "fp4" if fp4_recipe is not None else None
        precisions = [default] * config.num_hidden_layers
    if "fp4" in precisions and fp4_recipe is None:
        raise RuntimeError(f"layer_precision {precisions} has FP4 layers but no fp4_recipe was given")
    resolved = [(p, fp8_recipe if p == "fp8" else fp4_recipe if p == "fp4" else None) for p in precisions]
    if any(p is not None for p, _ in resolved):
        import_transformer_engine()  # ImportError with the install hint
    return resolved


def _te_autocast(enabled: bool, recipe):
    te = import_transformer_engine()
    if hasattr(te, "autocast"):  # TE >= 2.8
        return te.autocast(enabled=enabled, recipe=recipe)
    return te.fp8_autocast(enabled=enabled, fp8_recipe=recipe)


def _te_quantized_model_init(recipe):
    te = import_transformer_engine()
    if hasattr(te, "quantized_model_init"):  # TE >= 2.8
        return te.quantized_model_init(enabled=True, recipe=recipe)
    return te.fp8_model_init(enabled=True, recipe=recipe)


class NVMixtralSparseMoeBlock(MoELayer):
    """Mixtral's sparse MoE block on a token dispatcher.

    Router: ``TopKRouter`` with ``"renorm"`` (HF Mixtral: fp32 softmax over all experts, top-k,
    divide by the sum), its gate kept in fp32 whatever the model dtype. ``router_jitter_noise``
    multiplies the router input only (HF also perturbs the experts' input).

    Args:
        config: ``NVMixtralConfig``.
        dispatcher: shared ``TokenDispatcher``; default :func:`default_dispatcher`.
        expert_backend: overrides ``config.expert_backend``.
    """

    def __init__(self, config: NVMixtralConfig, dispatcher: TokenDispatcher | None = None,
                 expert_backend: str | None = None) -> None:
        router = TopKRouter(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                            normalization="renorm", jitter_noise=config.router_jitter_noise,
                            aux_loss_coeff=float(config.moe_aux_loss_coeff))
        experts = SwiGLUExperts(config.num_local_experts // config.expert_parallel_size, config.hidden_size,
                                config.intermediate_size, backend=expert_backend or config.expert_backend,
                                activation=config.hidden_act)
        super().__init__(router, experts, dispatcher if dispatcher is not None else default_dispatcher(config))


class NVMixtralDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention + pre-norm sparse MoE, residual around each (HF Mixtral)."""

    def __init__(self, config: NVMixtralConfig, layer_idx: int, dispatcher: TokenDispatcher,
                 attn_backend: str = "sdpa", expert_backend: str | None = None) -> None:
        super().__init__()
        self.self_attn = NVMixtralAttention(config, layer_idx, attn_backend)
        self.mlp = NVMixtralSparseMoeBlock(config, dispatcher, expert_backend)
        self.input_layernorm = NVMixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = NVMixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_inputs: AttentionInputs, past_key_values=None, *, token_mask: torch.Tensor | None = None,
                need_load_stats: bool = False) -> MoEOutput:
        """``hidden_states [B, S, H]`` -> ``MoEOutput(hidden_states [B, S, H], aux_loss, router_logits, load_stats)``.

        ``token_mask`` bool ``[B, S]`` (False: padding) keeps padding out of the router's load statistics.
        """
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                       attention_inputs, past_key_values)
        hidden_states = residual + hidden_states
        moe = self.mlp(self.post_attention_layernorm(hidden_states), token_mask, need_load_stats=need_load_stats)
        return moe._replace(hidden_states=hidden_states + moe.hidden_states)


@dataclass
class NVMixtralModelOutput(MoeModelOutputWithPast):
    """``MoeModelOutputWithPast`` plus ``aux_loss``: the already-scaled load-balancing loss
    (see :func:`moe_aux_loss`; None when it is off). The cache field is ``cache`` on
    transformers >= 5.24, ``past_key_values`` before."""

    aux_loss: torch.Tensor | None = None


def moe_aux_loss_coefficient(config: NVMixtralConfig, output_router_logits: bool | None) -> float:
    """The coefficient of the load-balancing loss in this forward (0: off).

    ``config.moe_aux_loss_coeff`` when it is > 0; otherwise, as HF Mixtral does, the router loss
    is on exactly when router logits are output (``output_router_logits`` of the call, else of
    the config), scaled by ``config.router_aux_loss_coef``.
    """
    if config.moe_aux_loss_coeff > 0:
        return float(config.moe_aux_loss_coeff)
    wanted = config.output_router_logits if output_router_logits is None else output_router_logits
    return float(getattr(config, "router_aux_loss_coef", 0.0)) if wanted else 0.0


def moe_aux_loss(layer_stats: list[LoadStats], router: TopKRouter, coefficient: float, loss_type: str) -> torch.Tensor:
    """The model's load-balancing loss from each MoE layer's router statistics.

    - ``"global"`` (HF transformers' ``load_balancing_loss_func``): the statistics of all layers
      are pooled, ``f_e`` and ``P_e`` taken over every (layer, token), and one loss computed:
      ``coefficient * E * sum_e f_e * P_e``.
    - ``"per_layer"`` (Megatron-Core): each layer's loss is computed on its own statistics and
      the losses are summed, ``coefficient * sum_l E * sum_e f_le * P_le``.

    ``f_e`` counts top-k assignments per token (``router.aux_loss_convention``, ``"switch"``
    by default: ``f_e = count_e / T``; Megatron's ``count_e / (T * K)`` is K times smaller).
    Padding tokens are left out and, with an EP group, the statistics are summed over it.
    """
    if loss_type == "global":
        return coefficient * router.load_balancing_loss(pool_load_stats(layer_stats))
    return coefficient * torch.stack([router.load_balancing_loss(stats) for stats in layer_stats]).sum()


class NVMixtralPreTrainedModel(PreTrainedModel):
    """Weights init, checkpoint and generation plumbing shared by the Mixtral models."""

    config_class = NVMixtralConfig
    config: NVMixtralConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NVMixtralDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_cache_class = True
    _keep_in_fp32_modules_strict = ["mlp.router"]
    # TE modules checkpoint their FP8 scaling state as `_extra_state`; a model built without TE
    # (or with other backends) neither needs nor has it.
    _keys_to_ignore_on_load_unexpected = [r"_extra_state$"]
    _keys_to_ignore_on_load_missing = [r"_extra_state$"]

    def create_masks_for_generate(self, *args, attention_mask=None, **kwargs):
        """``generate``'s hook for 4-D masks with compilable (static) caches: keep the 2-D
        ``attention_mask``. The attention builds its own mask from it and the cache's key
        positions (:mod:`moe_dispatch.models._cache`)."""
        return attention_mask

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # nn.Linear (router gate too), nn.Embedding, RMSNorm, rotary buffers
        std = self.config.initializer_range
        if isinstance(module, SwiGLUExperts):
            _init.normal_(module.experts_gate_up_weight, mean=0.0, std=std)
            _init.normal_(module.experts_down_weight, mean=0.0, std=std)
        elif type(module).__module__.startswith("transformer_engine") and isinstance(
                getattr(module, "weight", None), nn.Parameter):
            _init.normal_(module.weight, mean=0.0, std=std)  # te.Linear projections


class NVMixtralModel(NVMixtralPreTrainedModel):
    """Embeddings, decoder layers, final norm.

    Args:
        config: ``NVMixtralConfig``.
        fp8_recipe, fp4_recipe: TE recipes for the quantized layers (see
            :func:`resolve_layer_precision`); each quantized layer runs under
            ``te.autocast(enabled=True, recipe=...)``, the others under ``enabled=False``.
        dispatcher: one ``TokenDispatcher`` for all layers; default :func:`default_dispatcher`.
    """

    def __init__(self, config: NVMixtralConfig, fp8_recipe=None, fp4_recipe=None,
                 dispatcher: TokenDispatcher | None = None) -> None:
        super().__init__(config)
        self.layer_recipes = resolve_layer_precision(config, fp8_recipe, fp4_recipe)
        self.quantized = any(p is not None for p, _ in self.layer_recipes)
        self.dispatcher = dispatcher if dispatcher is not None else default_dispatcher(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([self._build_layer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = NVMixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = NVMixtralRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.ep_state = EPState(config.num_local_experts, config.expert_parallel_size)
        if config.expert_parallel_size > 1:  # a full (EP=1) state dict loads as this rank's slice
            self.register_load_state_dict_pre_hook(slice_full_expert_weights)
        self.post_init()

    def set_ep_groups(self, ep_group=None, ep_mesh=None, *, router_group=None) -> None:
        """Bind to the EP group: the dispatcher exchanges tokens over ``ep_group``, every router
        sums its load-balancing statistics over it (or ``router_group``), and each layer's expert
        weights become DTensor ``Shard(0)`` parameters on ``ep_mesh`` (E // P local experts each).

        Call on every rank, after moving the model to its device, before ``fully_shard`` and
        before building the optimizer. Gradients then need
        :func:`~moe_dispatch.models.mixtral.finalize_ep_gradients` after backward (the gradient
        convention is in :mod:`moe_dispatch.models.mixtral.parallel`).
        See :func:`moe_dispatch.models.mixtral.parallel.set_ep_groups` for the arguments.
        """
        set_ep_groups(self, ep_group, ep_mesh, router_group=router_group)

    def _build_layer(self, config: NVMixtralConfig, layer_idx: int) -> NVMixtralDecoderLayer:
        precision, recipe = self.layer_recipes[layer_idx]
        attn_backend = resolve_attn_backend(config.attn_backend if precision is None else
                                            ("te" if config.attn_backend == "auto" else config.attn_backend))
        expert_backend = config.expert_backend
        if precision is not None:
            if expert_backend == "auto":
                expert_backend = "te"  # only TE's grouped GEMM runs quantized
            elif expert_backend != "te":
                warnings.warn(f"layer {layer_idx} is {precision} but expert_backend={expert_backend!r}: "
                              f"its experts run in high precision (use 'te' or 'auto')", stacklevel=3)
        init_ctx = (_te_quantized_model_init(recipe) if precision is not None and config.use_quantized_model_init
                    else nullcontext())
        with init_ctx:
            return NVMixtralDecoderLayer(config, layer_idx, self.dispatcher, attn_backend, expert_backend)

    def _layer_autocast(self, layer_idx: int):
        if not self.quantized:
            return nullcontext()
        precision, recipe = self.layer_recipes[layer_idx]
        return _te_autocast(precision is not None, recipe)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        cache=None,
        **kwargs,
    ) -> NVMixtralModelOutput:
        """Run the decoder.

        Args:
            input_ids: int64 ``[B, S]`` (``[1, T]`` packed), or ``inputs_embeds [B, S, H]``.
            attention_mask: ``[B, past + S]`` 1 = token, 0 = padding (left or right). Padding
                is also left out of the router load-balancing statistics (as HF does).
            position_ids: ``[B, S]``; default ``past + arange(S)`` (packed: restart per sequence).
            past_key_values, cache: a transformers ``Cache`` (dynamic, sliding-window or static),
                under either name (``cache`` is transformers >= 5.24's); created when
                ``use_cache``. Returned under the installed transformers' name.
            use_cache: default ``config.use_cache``; ignored for packed input.
            output_hidden_states: also return the input of every layer and the final output.
            output_router_logits: return each MoE layer's fp32 gate logits ``[B * S, E]``
                (default ``config.output_router_logits``); also switches HF's router loss on
                (see :func:`moe_aux_loss_coefficient`).
            kwargs: packed THD input (``config.attn_input_format == "thd"``): ``cu_seq_lens_q``
                or ``cu_seqlens`` int32 ``[num_seqs + 1]``, optional ``max_length_q`` /
                ``max_length``. Other HF kwargs are ignored.

        Returns:
            ``NVMixtralModelOutput(last_hidden_state [B, S, H], cache, hidden_states, router_logits, aux_loss)``.
        """
        past_key_values = resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions=True is not supported by NVMixtral (fused attention)")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq, _ = inputs_embeds.shape

        cu_seqlens = next((kwargs[k] for k in ("cu_seq_lens_q", "cu_seqlens") if kwargs.get(k) is not None), None)
        max_seqlen = next((kwargs[k] for k in ("max_length_q", "max_length") if kwargs.get(k) is not None), None)
        token_mask = None
        if cu_seqlens is not None:
            attention_inputs = self._packed_inputs(cu_seqlens, max_seqlen, batch, attention_mask, past_key_values)
            past_key_values = None
            if position_ids is None:
                position_ids = packed_position_ids(cu_seqlens.to(inputs_embeds.device), seq)
        else:
            use_cache = self.config.use_cache if use_cache is None else use_cache
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache(config=self.config)
            past_length = cache_length(past_key_values)
            padding_mask = self._padding_mask(attention_mask, batch, past_length + seq)
            attention_inputs = AttentionInputs(padding_mask=padding_mask, past_length=past_length)
            token_mask = None if padding_mask is None else padding_mask[:, -seq:]
            if position_ids is None:
                position_ids = (torch.arange(seq, device=inputs_embeds.device) + past_length).unsqueeze(0)

        output_router_logits = (self.config.output_router_logits if output_router_logits is None
                                else output_router_logits)
        aux_coefficient = moe_aux_loss_coefficient(self.config, output_router_logits)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = [] if output_hidden_states else None
        router_logits, layer_stats = [], []
        for layer_idx, decoder_layer in enumerate(self.layers):
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            with self._layer_autocast(layer_idx):
                layer_out = decoder_layer(hidden_states, position_embeddings, attention_inputs,
                                          past_key_values=past_key_values, token_mask=token_mask,
                                          need_load_stats=aux_coefficient > 0)
            hidden_states = layer_out.hidden_states
            router_logits.append(layer_out.router_logits)
            layer_stats.append(layer_out.load_stats)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)

        aux_loss = None
        if aux_coefficient > 0 and self.layers:
            aux_loss = moe_aux_loss(layer_stats, self.layers[0].mlp.router, aux_coefficient,
                                    self.config.moe_aux_loss_type)
        return NVMixtralModelOutput(**with_cache(dict(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            router_logits=tuple(router_logits) if output_router_logits else None,
            aux_loss=aux_loss,
        ), past_key_values))

    def _packed_inputs(self, cu_seqlens, max_seqlen, batch, attention_mask, past_key_values) -> AttentionInputs:
        if self.config.attn_input_format != "thd":
            raise ValueError("cu_seq_lens_q / cu_seqlens given but config.attn_input_format is "
                             f"{self.config.attn_input_format!r}: set attn_input_format='thd' for packed input")
        if batch != 1:
            raise ValueError(f"packed (THD) input must be input_ids [1, total_tokens], got batch size {batch}")
        if past_key_values is not None or attention_mask is not None:
            raise ValueError("packed (THD) input takes neither past_key_values nor attention_mask "
                             "(sequence boundaries come from cu_seqlens)")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be a 1-D int tensor [num_seqs + 1], got {cu_seqlens!r}")
        return AttentionInputs(cu_seqlens=cu_seqlens.to(torch.int32),
                               max_seqlen=int(max_seqlen) if max_seqlen is not None else None)

    @staticmethod
    def _padding_mask(attention_mask, batch: int, total_len: int) -> torch.Tensor | None:
        """bool ``[B, past + S]`` or None when there is no padding."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, total_len):
            raise ValueError(f"attention_mask must be 2-D [batch, past + seq] = [{batch}, {total_len}], "
                             f"got shape {tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        if bool(mask.all()):  # host sync: an all-ones mask lets the fused (unmasked) attention run
            return None
        return mask


class NVMixtralForCausalLM(NVMixtralPreTrainedModel, GenerationMixin):
    """Mixtral causal LM on a pluggable dispatcher.

    Args:
        config: ``NVMixtralConfig``.
        fp8_recipe, fp4_recipe: TE recipes (see :class:`NVMixtralModel`). ``lm_head`` and the
            router gates always run in high precision.
        dispatcher: ``TokenDispatcher`` shared by all layers; default :func:`default_dispatcher`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NVMixtralConfig, fp8_recipe=None, fp4_recipe=None,
                 dispatcher: TokenDispatcher | None = None) -> None:
        super().__init__(config)
        self.model = NVMixtralModel(config, fp8_recipe=fp8_recipe, fp4_recipe=fp4_recipe, dispatcher=dispatcher)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def dispatcher(self) -> TokenDispatcher:
        """The dispatcher every MoE layer uses."""
        return self.model.dispatcher

    def set_ep_groups(self, ep_group=None, ep_mesh=None, *, router_group=None) -> None:
        """:meth:`NVMixtralModel.set_ep_groups` of ``self.model``."""
        self.model.set_ep_groups(ep_group, ep_mesh, router_group=router_group)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        cache=None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Logits, and the loss when ``labels`` are given.

        Args:
            input_ids ... use_cache, output_router_logits, cache: as :meth:`NVMixtralModel.forward`.
            labels: int64 ``[B, S]`` (``[1, T]`` packed), -100 = ignored; shifted inside (HF).
            logits_to_keep: compute logits for the last this-many positions only (0: all), or
                an index tensor of positions.
            kwargs: packed-input kwargs (see :meth:`NVMixtralModel.forward`); ``num_items_in_batch``
                for the loss; ``return_dict=False`` gives a tuple.

        Returns:
            ``MoeCausalLMOutputWithPast``: ``loss`` = HF causal-LM loss + ``aux_loss`` (the scaled
            load-balancing loss, see :func:`moe_aux_loss`; None when off), ``logits [B, S, V]``,
            the cache (``cache`` / ``past_key_values``), ``hidden_states``, ``router_logits``.
        """
        return_dict = kwargs.pop("return_dict", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=resolve_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_router_logits=output_router_logits, **kwargs)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)  # high precision: never under a TE autocast

        loss = None
        if labels is not None:
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
            loss = self.loss_function(logits, labels, self.vocab_size, **loss_kwargs)
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss.to(loss.device)

        output = MoeCausalLMOutputWithPast(**with_cache(dict(
            loss=loss, aux_loss=outputs.aux_loss, logits=logits, hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits), outputs[CACHE_FIELD] if CACHE_FIELD in outputs else None))
        return output.to_tuple() if return_dict is False else output


def _register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` load ``model_type="nv_mixtral"`` checkpoints."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(NVMixtralConfig.model_type, NVMixtralConfig, exist_ok=True)
    AutoModel.register(NVMixtralConfig, NVMixtralModel, exist_ok=True)
    AutoModelForCausalLM.register(NVMixtralConfig, NVMixtralForCausalLM, exist_ok=True)


_register_auto_classes()
