"""Expert-parallel NVMixtral on gloo (CPU, fp32) against the unsharded model.

EP=2 and EP=4 vs EP=1 (logits, loss, every gradient, per-expert token counts, gradient
clipping), FSDP2 (dp=2 x ep=1, dp=2 x ep=2, and dense-over-(dp, ep)) gradients and one AdamW step
vs one process, DCP round trip, ``save_final_model_ep`` -> ``from_pretrained`` -> HF, loading full
(EP=1 / HF-converted) state dicts, misuse errors. The checks are the functions of
``tests/distributed/mixtral_ep_equivalence.py`` (the NCCL torchrun script), here with fp32
tolerances.

Starting a rank costs seconds (torch + transformers imports), so each world size runs all of its
checks in one set of processes, once per session (``harness.RankChecks``), and each test asserts
on its check's per-rank metrics (or shows the rank's traceback).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.distributed import mixtral_ep_equivalence as eq
from tests.distributed.harness import RankChecks, worst

from .ep_checks import FP32_ATOL, assert_dcp_round_trip_bitwise, assert_fsdp_step_matches, assert_save_final_model_loads

pytestmark = pytest.mark.distributed

CPU = torch.device("cpu")
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_local_experts=8,
            max_position_embeddings=64, pad_token_id=0, expert_backend="loop", attn_backend="sdpa",
            permute_backend="torch")
CONFIGS = {
    "gqa-top2-aux": dict(BASE, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                         moe_aux_loss_coeff=0.02),
    "mha-top1": dict(BASE, num_attention_heads=4, num_key_value_heads=4, num_experts_per_tok=1,
                     moe_aux_loss_coeff=0.0),
}


# --- checks run inside the ranks ---------------------------------------------------------------------
def _forward_backward(name, padded=False):
    return lambda rank, world, workdir: eq.check_forward_backward(rank, world, CPU, torch.float32, CONFIGS[name],
                                                                  seed=3, per_rank=2, seq=8, padded=padded)


def _hf_model(seed: int = 5):
    from transformers import MixtralConfig, MixtralForCausalLM

    fields = {k: v for k, v in CONFIGS["gqa-top2-aux"].items()
              if k not in ("expert_backend", "attn_backend", "permute_backend", "moe_aux_loss_coeff")}
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**fields, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.3)
    return model


def _load_full_state_dict(rank, world, workdir):
    """An HF model converted at EP=1, its state dict loaded into EP=world models three ways."""
    from torch.distributed.device_mesh import init_device_mesh

    from moe_dispatch.models.mixtral import NVMixtralForCausalLM, convert_mixtral_hf_to_te, load_full_state_dict

    hf = _hf_model()
    reference = convert_mixtral_hf_to_te(hf, expert_backend="loop", attn_backend="sdpa", permute_backend="torch")
    full = reference.state_dict()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    config = copy.deepcopy(reference.config)
    config.expert_parallel_size = world
    ids, _ = eq.make_batch(world, 2, 8, config.vocab_size, 11, CPU)
    mine = slice(rank * 2, (rank + 1) * 2)
    with torch.no_grad():
        ref_logits = reference(input_ids=ids).logits[mine]
        hf_logits = hf(input_ids=ids).logits[mine]
    out = {}

    torch.manual_seed(100 + rank)
    before = NVMixtralForCausalLM(config).eval()
    try:  # a plain load before set_ep_groups cannot know which experts are this rank's
        before.load_state_dict(full)
        out["error_before_bind"] = ""
    except RuntimeError as err:
        out["error_before_bind"] = str(err)
    load_full_state_dict(before, full, ep_rank=rank)
    before.set_ep_groups(ep_mesh=mesh)

    torch.manual_seed(200 + rank)
    after = NVMixtralForCausalLM(config).eval()
    after.set_ep_groups(ep_mesh=mesh)
    after.load_state_dict(full)  # the pre-hook slices the experts

    for label, model in (("ep_rank_then_bind", before), ("bind_then_load", after)):
        with torch.no_grad():
            logits = model(input_ids=ids[mine]).logits
        out[f"{label}_vs_ep1"] = (logits - ref_logits).abs().max().item()
        out[f"{label}_vs_hf"] = (logits - hf_logits).abs().max().item()
        L = config.num_experts_per_rank
        expert = model.model.layers[1].mlp.experts.experts_down_weight
        out[f"{label}_local_slice_equal"] = torch.equal(
            expert.to_local(), full["model.layers.1.mlp.experts.experts_down_weight"][rank * L:(rank + 1) * L])
    return out


def _errors(rank, world, workdir):
    """Clear errors for misuse; set_ep_groups twice is harmless."""
    from torch.distributed.device_mesh import init_device_mesh

    from moe_dispatch.models.mixtral import NVMixtralConfig, NVMixtralForCausalLM, finalize_ep_gradients

    fields = CONFIGS["mha-top1"]
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    out = {}
    wrong = NVMixtralForCausalLM(NVMixtralConfig(**fields, expert_parallel_size=2 * world))
    try:
        wrong.set_ep_groups(ep_mesh=mesh)
    except ValueError as err:
        out["wrong_size"] = str(err)
    model = NVMixtralForCausalLM(NVMixtralConfig(**fields, expert_parallel_size=world))
    try:
        finalize_ep_gradients(model)
    except RuntimeError as err:
        out["finalize_unbound"] = str(err)
    model.set_ep_groups(ep_mesh=mesh)
    params = [p for p in model.parameters()]
    model.set_ep_groups(dist.group.WORLD, mesh)
    out["same_params_after_second_call"] = all(a is b for a, b in zip(params, model.parameters()))
    weight = model.model.layers[0].mlp.experts.experts_gate_up_weight
    out["placement"] = (f"{type(weight).__name__} {weight.placements} {tuple(weight.shape)} "
                        f"{tuple(weight.to_local().shape)}")
    out["is_parameter"] = isinstance(weight, torch.nn.Parameter)
    return out


CHECKS = {
    "ep-gqa-top2-aux": _forward_backward("gqa-top2-aux"),
    "ep-mha-top1": _forward_backward("mha-top1"),
    "ep-gqa-top2-aux-padded": _forward_backward("gqa-top2-aux", padded=True),
    "fsdp": lambda rank, world, workdir: eq.check_fsdp_step(
        rank, world, CPU, torch.float32, CONFIGS["gqa-top2-aux"], dp=2, seed=4),
    "fsdp-flat-dense": lambda rank, world, workdir: eq.check_fsdp_step(
        rank, world, CPU, torch.float32, CONFIGS["gqa-top2-aux"], dp=2, seed=4, flat_dense=True),
    "dcp": lambda rank, world, workdir: eq.check_dcp_round_trip(
        rank, world, CPU, torch.float32, CONFIGS["gqa-top2-aux"], workdir, seed=6),
    "save_final": lambda rank, world, workdir: eq.check_save_final_model(
        rank, world, CPU, torch.float32, CONFIGS["mha-top1"], workdir, seed=7),
    "load_full": _load_full_state_dict,
    "errors": _errors,
}
WORLD_CHECKS = {
    2: ["ep-gqa-top2-aux", "ep-mha-top1", "ep-gqa-top2-aux-padded", "fsdp", "dcp", "save_final", "load_full", "errors"],
    4: ["ep-gqa-top2-aux", "ep-mha-top1", "ep-gqa-top2-aux-padded", "fsdp", "fsdp-flat-dense"],
}

metrics = RankChecks(__name__, WORLD_CHECKS).metrics  # (world, check, tmp_path_factory) -> per-rank metrics


# --- tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_ep_matches_ep1_logits_loss_grads(world, config, tmp_path_factory):
    per_rank = metrics(world, f"ep-{config}", tmp_path_factory)
    for key in ("logits_abs", "loss_abs", "grads_abs", "grad_norm_abs", "clipped_grads_abs"):
        assert worst(per_rank, key) <= FP32_ATOL, (key, per_rank)
    assert worst(per_rank, "counts_mismatch") == 0, "gather_tokens_per_expert differs from the EP=1 counts"
    assert all(m["dtensor_expert_grads"] == 4 for m in per_rank), "expert grads must be DTensors (2 per layer)"


@pytest.mark.parametrize("world", [2, 4])
def test_ep_router_loss_leaves_padding_out_over_the_group(world, tmp_path_factory):
    """Left padding that differs per rank: the load-balancing statistics exclude it and are summed
    over the EP group, so the EP loss and grads equal the unsharded model's (HF's convention)."""
    per_rank = metrics(world, "ep-gqa-top2-aux-padded", tmp_path_factory)
    for key in ("logits_abs", "loss_abs", "grads_abs"):
        assert worst(per_rank, key) <= FP32_ATOL, (key, per_rank)


@pytest.mark.parametrize("world", [2, 4], ids=["dp2-ep1", "dp2-ep2"])
def test_fsdp2_adamw_step_matches_single_process(world, tmp_path_factory):
    assert_fsdp_step_matches(metrics(world, "fsdp", tmp_path_factory), clipping=True, update=True)


def test_fsdp2_torchtitan_layout_dense_over_dp_x_ep(tmp_path_factory):
    """Experts sharded over dp, dense weights over the flattened (dp, ep) mesh (dp=2 x ep=2)."""
    assert_fsdp_step_matches(metrics(4, "fsdp-flat-dense", tmp_path_factory), clipping=True, update=False)


def test_dcp_round_trip_is_bitwise(tmp_path_factory):
    assert_dcp_round_trip_bitwise(metrics(2, "dcp", tmp_path_factory))


def test_save_final_model_ep_loads_at_ep1_and_converts_to_hf(tmp_path_factory):
    assert_save_final_model_loads(metrics(2, "save_final", tmp_path_factory), "MixtralForCausalLM")


def test_full_state_dict_loads_into_ep_model(tmp_path_factory):
    per_rank = metrics(2, "load_full", tmp_path_factory)
    for m in per_rank:
        assert "set_ep_groups" in m["error_before_bind"] and "ep_rank" in m["error_before_bind"], m
        for label in ("ep_rank_then_bind", "bind_then_load"):
            assert m[f"{label}_local_slice_equal"], (label, m)
            assert m[f"{label}_vs_ep1"] <= FP32_ATOL, (label, m)
            assert m[f"{label}_vs_hf"] <= FP32_ATOL, (label, m)


def test_set_ep_groups_errors_and_idempotence(tmp_path_factory):
    for m in metrics(2, "errors", tmp_path_factory):
        assert "expert_parallel_size=4" in m["wrong_size"], m
        assert "set_ep_groups" in m["finalize_unbound"], m
        assert m["same_params_after_second_call"]
        assert m["placement"] == "DTensor (Shard(dim=0),) (8, 96, 32) (4, 96, 32)", m
        assert m["is_parameter"]
