"""Expert-parallel NVQwen3Moe on gloo (CPU, fp32) against the unsharded model: the checks of
``tests/distributed/mixtral_ep_equivalence.py`` (the NCCL torchrun script) on Qwen3-MoE through
the model-independent ``moe_dispatch.parallel`` / ``moe_dispatch.checkpoint``.

EP=2 and EP=4 vs EP=1 (logits, loss, every gradient, per-expert token counts, clipping), FSDP2
dp2 x ep2 gradients and one AdamW step, DCP round trip, ``save_final_model_ep`` ->
``from_pretrained`` -> HF ``Qwen3MoeForCausalLM``. The model has a dense layer between its MoE
layers (``mlp_only_layers``), so the EP helpers must find the MoE pieces wherever they are.
Each world size runs all its checks in one set of processes, once per session.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed import mixtral_ep_equivalence as eq
from tests.distributed.harness import RankChecks, worst

from .ep_checks import FP32_ATOL, assert_dcp_round_trip_bitwise, assert_fsdp_step_matches, assert_save_final_model_loads

pytestmark = pytest.mark.distributed

CPU = torch.device("cpu")
FIELDS = dict(vocab_size=64, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=3,
              mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
              num_experts_per_tok=3, norm_topk_prob=True, max_position_embeddings=64, pad_token_id=0,
              moe_aux_loss_coeff=0.02, expert_backend="loop", attn_backend="sdpa", permute_backend="torch")


def _family() -> eq.ModelFamily:
    from moe_dispatch.models.qwen3_moe import NVQwen3MoeConfig, NVQwen3MoeForCausalLM, convert_qwen3_moe_te_to_hf

    return eq.ModelFamily(NVQwen3MoeConfig, NVQwen3MoeForCausalLM, convert_qwen3_moe_te_to_hf)


CHECKS = {
    "ep": lambda rank, world, workdir: eq.check_forward_backward(
        rank, world, CPU, torch.float32, FIELDS, seed=3, per_rank=2, seq=8, family=_family()),
    "fsdp": lambda rank, world, workdir: eq.check_fsdp_step(
        rank, world, CPU, torch.float32, FIELDS, dp=2, seed=4, family=_family()),
    "dcp": lambda rank, world, workdir: eq.check_dcp_round_trip(
        rank, world, CPU, torch.float32, FIELDS, workdir, seed=6, family=_family()),
    "save_final": lambda rank, world, workdir: eq.check_save_final_model(
        rank, world, CPU, torch.float32, FIELDS, workdir, seed=7, family=_family()),
}
WORLD_CHECKS = {2: ["ep", "dcp", "save_final"], 4: ["ep", "fsdp"]}


RUNS = RankChecks(__name__, WORLD_CHECKS)


def metrics(world: int, check: str, tmp_path_factory) -> list[dict]:
    return RUNS.metrics(world, check, tmp_path_factory)


@pytest.mark.parametrize("world", [2, 4])
def test_ep_matches_ep1_logits_bitwise_and_grads(world, tmp_path_factory):
    per_rank = metrics(world, "ep", tmp_path_factory)
    assert worst(per_rank, "logits_abs") == 0.0, per_rank  # same routing, same per-token math
    assert worst(per_rank, "loss_abs") <= FP32_ATOL, per_rank
    for key in ("grads_abs", "clipped_grads_abs"):
        assert worst(per_rank, key) <= 1e-6, (key, per_rank)
    assert worst(per_rank, "grad_norm_abs") <= FP32_ATOL, per_rank
    assert worst(per_rank, "counts_mismatch") == 0, "gather_tokens_per_expert differs from the EP=1 counts"
    assert all(m["dtensor_expert_grads"] == 4 for m in per_rank), "expert grads must be DTensors (2 per MoE layer)"


def test_fsdp2_dp2_ep2_adamw_step_matches_single_process(tmp_path_factory):
    assert_fsdp_step_matches(metrics(4, "fsdp", tmp_path_factory), clipping=False, update=True)


def test_dcp_round_trip_is_bitwise(tmp_path_factory):
    assert_dcp_round_trip_bitwise(metrics(2, "dcp", tmp_path_factory))


def test_save_final_model_ep_loads_at_ep1_and_in_hf(tmp_path_factory):
    assert_save_final_model_loads(metrics(2, "save_final", tmp_path_factory), "Qwen3MoeForCausalLM")
