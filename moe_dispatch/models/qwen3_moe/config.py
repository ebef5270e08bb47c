"""``NVQwen3MoeConfig``: ``transformers.Qwen3MoeConfig`` plus the dispatch / precision / layout knobs."""
from __future__ import annotations

from transformers import Qwen3MoeConfig

from ..common.config import NVMoEConfigFields

__all__ = ["NVQwen3MoeConfig"]


class NVQwen3MoeConfig(NVMoEConfigFields, Qwen3MoeConfig):
    """Qwen3-MoE configuration for :class:`~moe_dispatch.models.qwen3_moe.NVQwen3MoeForCausalLM`.

    Every ``Qwen3MoeConfig`` field keeps its meaning: ``num_experts`` is the global number of
    experts E, ``moe_intermediate_size`` the experts' FFN size, ``intermediate_size`` the dense
    MLP's (layers in ``mlp_only_layers``, or not a multiple of ``decoder_sparse_step``),
    ``norm_topk_prob`` renormalises the top-k weights. The added fields are documented on
    :class:`~moe_dispatch.models.common.config.NVMoEConfigFields`.

    Raises:
        ValueError naming the field on a bad value.
    """

    model_type = "nv_qwen3_moe"
    experts_field = "num_experts"

    def check_model_fields(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive int (dense-only Qwen3 is Qwen3ForCausalLM), "
                             f"got {self.num_experts!r}")
        if not isinstance(self.decoder_sparse_step, int) or self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be a positive int, got {self.decoder_sparse_step!r}")
        bad = [i for i in self.mlp_only_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mlp_only_layers entries must be layer indices in [0, {self.num_hidden_layers}), got {bad}")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` is sparse (HF's rule: not in ``mlp_only_layers`` and
        ``(layer_idx + 1) % decoder_sparse_step == 0``)."""
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the sparse decoder layers."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]
