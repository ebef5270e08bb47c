"""Assertions the expert-parallel model tests (``test_*_ep.py``) share on the per-rank metrics of
the checks of ``tests/distributed/mixtral_ep_equivalence.py`` run on gloo ranks in fp32."""
from __future__ import annotations

from tests.distributed.harness import worst

FP32_ATOL = 1e-5


def assert_fsdp_step_matches(per_rank: list[dict], *, clipping: bool, update: bool) -> None:
    """``check_fsdp_step``: gradients and weights after one AdamW step equal one process's; with
    ``clipping`` also the total norm and the gradients clipped by ``clip_grad_norm_ep_``, with
    ``update`` the relative size of the step."""
    assert worst(per_rank, "grads_abs") <= 1e-6, per_rank
    if clipping:
        assert worst(per_rank, "grad_norm_abs") <= FP32_ATOL, per_rank  # clip_grad_norm_ep_ on FSDP + EP grads
        assert worst(per_rank, "clipped_grads_abs") <= 1e-6, per_rank
    assert worst(per_rank, "weights_abs") <= 1e-6, per_rank
    if update:
        assert worst(per_rank, "update_rel") <= 1e-4, per_rank
    assert worst(per_rank, "load_after_fully_shard_mismatches") == 0


def assert_dcp_round_trip_bitwise(per_rank: list[dict]) -> None:
    """``check_dcp_round_trip``: every tensor loaded bitwise, the same logits."""
    assert all(m["mismatched_tensors"] == 0 for m in per_rank), per_rank
    assert worst(per_rank, "logits_abs") == 0.0


def assert_save_final_model_loads(per_rank: list[dict], hf_class: str) -> None:
    """``check_save_final_model``: one EP=1 safetensors checkpoint whose model (and the HF
    ``hf_class`` converted from it) has the reference's weights and logits."""
    assert all(m["mismatched_tensors"] == 0 for m in per_rank), per_rank
    assert all(m["saved_ep_size"] == 1 for m in per_rank)
    assert per_rank[0]["files"] == ["config.json", "model.safetensors"]
    assert worst(per_rank, "logits_abs") <= FP32_ATOL
    assert worst(per_rank, "hf_logits_abs") <= FP32_ATOL, f"the HF {hf_class} of the saved model differs"
