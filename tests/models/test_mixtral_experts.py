"""SwiGLUExperts backends and the Mixtral MoE block against HF's ``MixtralSparseMoeBlock`` (CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moe_dispatch import AllToAllTokenDispatcher, TopKRouter
from moe_dispatch.experts import SwiGLUExperts, resolve_expert_backend
from moe_dispatch.models.mixtral import NVMixtralConfig, NVMixtralSparseMoeBlock
from moe_dispatch.moe import MoELayer


def reference_experts(x_RH, counts, gate_up, down):
    """Row by row: expert of row r from the counts."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    out = torch.zeros_like(x_RH)
    for r, e in enumerate(expert_of_row.tolist()):
        gate, up = (gate_up[e] @ x_RH[r]).chunk(2)
        out[r] = down[e] @ (F.silu(gate) * up)
    return out


def make_experts(num_experts=5, hidden=12, inter=20, dtype=torch.float32, backend="loop", seed=0):
    torch.manual_seed(seed)
    experts = SwiGLUExperts(num_experts, hidden, inter, backend=backend, dtype=dtype)
    experts.reset_parameters(std=0.3)
    return experts


@pytest.mark.parametrize("counts", [[3, 0, 4, 1, 2], [0, 0, 0, 0, 7], [0, 0, 0, 0, 0]])
def test_loop_experts_match_row_by_row_reference(counts):
    experts = make_experts()
    x = torch.randn(sum(counts), 12)
    out = experts(x, torch.tensor(counts))
    torch.testing.assert_close(out, reference_experts(x, counts, experts.experts_gate_up_weight.detach(),
                                                      experts.experts_down_weight.detach()), atol=1e-5, rtol=1e-5)


def test_padding_rows_give_zero_and_every_weight_gets_a_gradient():
    experts = make_experts()
    counts = [2, 0, 1, 0, 3]
    x = torch.randn(sum(counts) + 4, 12, requires_grad=True)  # 4 padding rows at the end
    out = experts(x, torch.tensor(counts))
    assert out.shape == x.shape and torch.equal(out[-4:], torch.zeros(4, 12))
    out.sum().backward()
    assert experts.experts_gate_up_weight.grad is not None and experts.experts_down_weight.grad is not None
    assert torch.equal(experts.experts_down_weight.grad[1], torch.zeros(12, 20))  # expert 1 had no rows


def test_grouped_mm_math_matches_loop():
    # torch._grouped_mm has a CPU fallback on recent torch (forward only); the backend itself only
    # runs on CUDA, so call its implementation directly.
    experts = make_experts()
    counts = torch.tensor([3, 0, 4, 1, 2])
    x = torch.randn(10, 12)
    try:
        out = experts._forward_grouped_mm(x, counts)
    except (RuntimeError, NotImplementedError, AttributeError) as err:
        pytest.skip(f"torch._grouped_mm does not run on CPU here: {err}")
    torch.testing.assert_close(out, experts._forward_loop(x, counts.tolist()), atol=1e-5, rtol=1e-5)


def test_expert_backend_resolution_and_errors():
    x = torch.randn(4, 16)
    assert resolve_expert_backend("auto", x, 16, 32) == "loop"
    assert resolve_expert_backend("loop", x, 16, 32) == "loop"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_expert_backend("grouped_mm", x, 16, 32)
    with pytest.raises(ValueError, match="backend"):
        SwiGLUExperts(2, 16, 32, backend="cutlass")
    with pytest.raises(ValueError, match="num_experts"):
        SwiGLUExperts(0, 16, 32)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        make_experts()(torch.randn(3, 12), torch.tensor([1, 2]))
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"moe_dispatch\[te\]"):
            SwiGLUExperts(2, 16, 32, backend="te")


def test_loop_experts_in_bf16():
    experts = make_experts(dtype=torch.bfloat16)
    counts = [3, 1, 0, 2, 2]
    x = torch.randn(8, 12, dtype=torch.bfloat16)
    out = experts(x, torch.tensor(counts))
    assert out.dtype == torch.bfloat16
    expected = reference_experts(x.float(), counts, experts.experts_gate_up_weight.detach().float(),
                                 experts.experts_down_weight.detach().float())
    assert (out.float() - expected).norm() / expected.norm() < 2e-2


# --- the MoE block against HF ------------------------------------------------------------------------
@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (7, 5), (4, 1)])
def test_moe_block_matches_hf_block(num_experts, top_k):
    fields = dict(hidden_size=24, intermediate_size=40, num_local_experts=num_experts, num_experts_per_tok=top_k,
                  num_hidden_layers=1)
    torch.manual_seed(0)
    block_hf = MixtralSparseMoeBlock(MixtralConfig(**fields))
    with torch.no_grad():
        for p in block_hf.parameters():
            p.normal_(0, 0.2)
    block = NVMixtralSparseMoeBlock(NVMixtralConfig(**fields))
    with torch.no_grad():
        block.router.gate.weight.copy_(block_hf.gate.weight)
        block.experts.experts_gate_up_weight.copy_(block_hf.experts.gate_up_proj)
        block.experts.experts_down_weight.copy_(block_hf.experts.down_proj)
    x = torch.randn(3, 5, 24)
    x_hf, x_nv = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_hf = block_hf(x_hf)
    out = block(x_nv)
    torch.testing.assert_close(out.hidden_states, out_hf, atol=1e-6, rtol=0)
    grad = torch.randn_like(out_hf)
    out_hf.backward(grad)
    out.hidden_states.backward(grad)
    for ours, theirs in ((x_nv.grad, x_hf.grad), (block.router.gate.weight.grad, block_hf.gate.weight.grad),
                         (block.experts.experts_gate_up_weight.grad, block_hf.experts.gate_up_proj.grad),
                         (block.experts.experts_down_weight.grad, block_hf.experts.down_proj.grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_expert_parallel_layout_allocates_only_local_experts():
    config = NVMixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=8, expert_parallel_size=4,
                             num_hidden_layers=1)
    block = NVMixtralSparseMoeBlock(config, dispatcher=AllToAllTokenDispatcher(8, 2, 16, 4))
    assert block.experts.experts_gate_up_weight.shape == (2, 16, 16)
    assert block.experts.experts_down_weight.shape == (2, 16, 8)
    assert block.router.gate.weight.shape == (8, 16)  # the router sees every expert


def test_moe_layer_keeps_router_dtype_exactly():
    router = TopKRouter(8, 4, 2)
    layer = MoELayer(router, SwiGLUExperts(4, 8, 16), AllToAllTokenDispatcher(4, 4, 8))
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(4, 8) * 1e-3 + 1.0 / 3)  # not representable in bf16
    before = router.gate.weight.detach().clone()
    layer.to(torch.bfloat16)
    assert router.gate.weight.dtype == torch.float32 and torch.equal(router.gate.weight, before)
    assert layer.experts.experts_gate_up_weight.dtype == torch.bfloat16
    layer.to(device="meta")
    assert router.gate.weight.device.type == "meta" and router.gate.weight.dtype == torch.float32


def test_moe_layer_rejects_non_dispatchers():
    with pytest.raises(TypeError, match="TokenDispatcher"):
        MoELayer(TopKRouter(8, 4, 2), SwiGLUExperts(4, 8, 16), dispatcher=object())


def test_moe_layer_output_unpacks_as_hidden_and_aux_and_carries_router_details():
    torch.manual_seed(0)
    layer = MoELayer(TopKRouter(8, 4, 2, aux_loss_coeff=0.1), SwiGLUExperts(4, 8, 16), AllToAllTokenDispatcher(4, 4, 8))
    layer.experts.reset_parameters()
    x = torch.randn(3, 5, 8)
    out = layer(x)
    y, aux = out
    assert y is out.hidden_states and aux is out.aux_loss and y.shape == x.shape
    assert out.router_logits.shape == (15, 4) and out.load_stats.tokens.item() == 15
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, :2] = False
    assert layer(x, mask).load_stats.tokens.item() == 13
    with pytest.raises(ValueError, match="token_mask"):
        layer(x, mask[:, :3])
