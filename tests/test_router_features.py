"""TopKRouter's DeepSeek-V3 / Megatron features, each against an independent reference:
sigmoid scores, group-limited top-k, selection-only expert bias and its update rule,
routed_scaling_factor, norm_topk_prob, z-loss; the DeepSeek-V3 gate against transformers' own.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_dispatch import AllToAllTokenDispatcher, MoELayer, SwiGLUExperts, TopKRouter
from moe_dispatch.routing import LoadStats, group_limited_mask, z_loss


def router_for_logits(logits_NE: torch.Tensor, top_k: int, **kw) -> tuple[TopKRouter, torch.Tensor]:
    """A router and an input ``[N, N]`` whose gate output is exactly ``logits_NE`` (identity input)."""
    n, e = logits_NE.shape
    router = TopKRouter(max(n, 1), e, top_k, **kw)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[:, :n].copy_(logits_NE.t())
    return router, torch.eye(max(n, 1))[:n]


def reference_route(logits_NE, top_k, *, score_function, bias_E, num_groups, topk_groups, renorm, scale):
    """Token by token in plain Python lists: the selection rule written out, no shared code."""
    selected, weights = [], []
    E = logits_NE.shape[1]
    for row in logits_NE.double().tolist():
        if score_function == "softmax":
            m = max(row)
            ex = [pow(2.718281828459045, v - m) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1.0 / (1.0 + pow(2.718281828459045, -v)) for v in row]
        choice = [s + b for s, b in zip(scores, bias_E)]
        allowed = set(range(E))
        if num_groups is not None:
            size = E // num_groups
            group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(num_groups)]
            best = sorted(range(num_groups), key=lambda g: -group_score[g])[:topk_groups]
            allowed = {g * size + i for g in best for i in range(size)}
        chosen = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        w = [scores[e] for e in chosen]
        if renorm:
            w = [v / sum(w) for v in w]
        selected.append(chosen)
        weights.append([v * scale for v in w])
    return selected, weights


def by_expert(selected_NK: torch.Tensor, weights_NK: torch.Tensor):
    """Rows sorted by expert id (the order of an unsorted top-k is unspecified)."""
    order = selected_NK.argsort(dim=-1)
    return selected_NK.gather(1, order), weights_NK.gather(1, order)


@st.composite
def routing_case(draw):
    num_experts = draw(st.sampled_from([1, 4, 6, 8, 16, 64, 128, 256]))
    divisors = [g for g in range(1, num_experts + 1) if num_experts % g == 0 and g <= 16]
    grouped = draw(st.booleans())
    num_groups = draw(st.sampled_from(divisors)) if grouped else None
    topk_groups = draw(st.integers(1, num_groups)) if grouped else None
    allowed = topk_groups * (num_experts // num_groups) if grouped else num_experts
    top_k = draw(st.integers(1, min(8, allowed)))
    return dict(num_tokens=draw(st.sampled_from([0, 1, 5, 17])), num_experts=num_experts, top_k=top_k,
                num_groups=num_groups, topk_groups=topk_groups,
                score_function=draw(st.sampled_from(["softmax", "sigmoid"])), bias=draw(st.booleans()),
                renorm=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 2.5])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=60, deadline=None)
@given(case=routing_case())
def test_selection_and_weights_equal_the_written_out_rule(case):
    g = torch.Generator().manual_seed(case["seed"])
    E, K = case["num_experts"], case["top_k"]
    logits = torch.randn(case["num_tokens"], E, generator=g) * 3
    bias = torch.randn(E, generator=g) * 0.3 if case["bias"] else torch.zeros(E)
    router, x = router_for_logits(logits, K, score_function=case["score_function"], num_groups=case["num_groups"],
                                  topk_groups=case["topk_groups"], expert_bias=case["bias"],
                                  norm_topk_prob=case["renorm"], routed_scaling_factor=case["scale"])
    if case["bias"]:
        router.expert_bias.copy_(bias)
    out = router.route(x)
    assert out.selected_experts.shape == (case["num_tokens"], K) and out.routing_weights.dtype == torch.float32
    ref_sel, ref_w = reference_route(logits, K, score_function=case["score_function"], bias_E=bias.tolist(),
                                     num_groups=case["num_groups"], topk_groups=case["topk_groups"],
                                     renorm=case["renorm"], scale=case["scale"])
    sel, w = by_expert(out.selected_experts, out.routing_weights)
    ref_sel_t = torch.tensor(ref_sel, dtype=torch.int64).reshape(-1, K)
    ref_w_t = torch.tensor(ref_w, dtype=torch.float64).reshape(-1, K)
    ref_sel_t, ref_w_t = by_expert(ref_sel_t, ref_w_t)
    assert torch.equal(sel, ref_sel_t), (sel, ref_sel_t)
    torch.testing.assert_close(w.double(), ref_w_t, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("shape", [(16, 4, 2, 4), (64, 8, 3, 6), (256, 8, 4, 8)], ids=["E16", "E64", "E256"])
def test_deepseek_v3_gate_equals_transformers_exactly(seed, norm_topk_prob, shape):
    """transformers' DeepseekV3 MoE gate (``DeepseekV3MoE(config).gate``), fp32: the same experts
    and bitwise the same weights, with a random e_score_correction_bias."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    E, G, topk_groups, K = shape
    config = DeepseekV3Config(hidden_size=24, n_routed_experts=E, n_group=G, topk_group=topk_groups,
                              num_experts_per_tok=K, moe_intermediate_size=8, intermediate_size=16, n_shared_experts=1,
                              norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5)
    torch.manual_seed(seed)
    gate_hf = DeepseekV3MoE(config).gate
    with torch.no_grad():
        gate_hf.weight.normal_(0.0, 0.5)
        gate_hf.e_score_correction_bias.normal_(0.0, 0.1)
    ours = TopKRouter(24, E, K, score_function="sigmoid", num_groups=G, topk_groups=topk_groups, expert_bias=True,
                      norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5)
    ours.load_state_dict({"gate.weight": gate_hf.weight.detach().clone(),
                          "expert_bias": gate_hf.e_score_correction_bias.clone()})
    x = torch.randn(40, 24)
    with torch.no_grad():
        logits_hf, weights_hf, selected_hf = gate_hf(x)
        out = ours.route(x)
    assert torch.equal(out.logits, logits_hf), "router logits differ from DeepseekV3TopkRouter's"
    sel, w = by_expert(out.selected_experts, out.routing_weights)
    sel_hf, w_hf = by_expert(selected_hf, weights_hf)
    assert torch.equal(sel, sel_hf), "selected experts differ from DeepseekV3TopkRouter's"
    assert torch.equal(w, w_hf), f"weights differ from DeepseekV3TopkRouter's by {(w - w_hf).abs().max()}"


def test_expert_bias_moves_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    router, x = router_for_logits(logits, 1, expert_bias=True, norm_topk_prob=False)
    assert router.route(x).selected_experts.item() == 0
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    out = router.route(x)
    assert out.selected_experts.item() == 3, "the bias must steer the selection"
    torch.testing.assert_close(out.routing_weights, torch.softmax(logits, -1)[:, 3:], atol=0, rtol=0,
                               msg="the weight must be the unbiased score")
    assert "expert_bias" in router.state_dict(), "the bias is a buffer saved with the model"
    assert not any(n == "expert_bias" for n, _ in router.named_parameters()), "the bias is no parameter"


def test_update_expert_bias_rule_and_errors():
    router = TopKRouter(4, 4, 1, expert_bias=True)
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    router.update_expert_bias(load, update_rate=0.1)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    stats = LoadStats(torch.tensor([1.0, 1.0, 5.0, 1.0]), torch.zeros(4), torch.tensor(8.0))  # mean 2
    router.update_expert_bias(stats, update_rate=0.1)
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.0, 0.2, 0.0, 0.2]))
    with pytest.raises(ValueError, match="load"):
        router.update_expert_bias(torch.ones(3))
    with pytest.raises(RuntimeError, match="expert_bias=True"):
        TopKRouter(4, 4, 1).update_expert_bias(load)


def test_aux_loss_free_balancing_evens_out_a_skewed_router():
    """The update rule, applied every step through update_expert_biases, balances the load."""
    from moe_dispatch.parallel import attach_ep_state, update_expert_biases

    torch.manual_seed(0)
    E, H = 8, 16
    router = TopKRouter(H, E, 2, score_function="sigmoid", expert_bias=True)
    with torch.no_grad():
        router.gate.weight.normal_()
        router.gate.weight[0] += 1.5  # expert 0 is everyone's favourite
    layer = MoELayer(router, SwiGLUExperts(E, H, 8), AllToAllTokenDispatcher(E, E, H, permute_backend="torch"))
    model = torch.nn.Sequential(layer)
    attach_ep_state(model, E, 1)
    x = torch.randn(512, H).abs()

    def imbalance():
        with torch.no_grad():
            layer(x)
        counts = layer.last_tokens_per_expert.float()
        return (counts.max() / counts.mean()).item()

    before = imbalance()
    for _ in range(300):
        with torch.no_grad():
            layer(x)
        update_expert_biases(model, update_rate=0.01)
    after = imbalance()
    assert before > 2.0 and after < 1.3, (before, after)


def test_z_loss_formula_padding_and_gradient():
    logits = torch.randn(6, 5, requires_grad=True)
    mask = torch.tensor([True, True, False, True, False, True])
    ref = (torch.logsumexp(logits.detach(), -1) ** 2)[mask].mean()
    torch.testing.assert_close(z_loss(logits, mask), ref)
    torch.testing.assert_close(z_loss(logits), (torch.logsumexp(logits.detach(), -1) ** 2).mean())
    assert z_loss(torch.zeros(0, 5)).item() == 0.0
    router, x = router_for_logits(logits.detach(), 2, z_loss_coeff=1e-2, aux_loss_coeff=0.1)
    out = router.route(x, mask)
    torch.testing.assert_close(out.z_loss, 1e-2 * ref)
    torch.testing.assert_close(out.aux_loss, 0.1 * router.load_balancing_loss(out.load_stats) + 1e-2 * ref)
    out.aux_loss.backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0
    assert TopKRouter(4, 4, 1).route(torch.randn(3, 4)).z_loss is None


def test_norm_topk_prob_and_scaling_on_the_softmax_path():
    logits = torch.randn(7, 6)
    renorm, x = router_for_logits(logits, 3, normalization="renorm")
    flag, _ = router_for_logits(logits, 3, norm_topk_prob=True)
    none, _ = router_for_logits(logits, 3, norm_topk_prob=False, routed_scaling_factor=2.0)
    assert flag.normalization == "renorm" and none.normalization == "none"
    assert torch.equal(flag.route(x).routing_weights, renorm.route(x).routing_weights)
    torch.testing.assert_close(none.route(x).routing_weights, 2.0 * torch.softmax(logits, -1).topk(3).values)


def test_sigmoid_load_stats_use_normalised_scores():
    logits = torch.randn(9, 4)
    router, x = router_for_logits(logits, 2, score_function="sigmoid", aux_loss_coeff=0.1)
    stats = router.route(x).load_stats
    s = torch.sigmoid(logits)
    torch.testing.assert_close(stats.prob_sum, (s / s.sum(-1, keepdim=True)).sum(0))


def test_group_mask_worked_example():
    mask = group_limited_mask(torch.tensor([[0.9, 0.1, 0.5, 0.4]]), num_groups=2, topk_groups=1)
    assert mask.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("kw, words", [
    (dict(score_function="tanh"), "score_function"),
    (dict(num_groups=3, topk_groups=1), "num_groups"),
    (dict(num_groups=4), "topk_groups"),
    (dict(num_groups=4, topk_groups=5), "topk_groups"),
    (dict(num_groups=4, topk_groups=1, top_k=3), "top_k"),
    (dict(normalization="sparse_mixer", score_function="sigmoid"), "sparse_mixer"),
    (dict(normalization="sparse_mixer", norm_topk_prob=True), "norm_topk_prob"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(z_loss_coeff=-1.0), "z_loss_coeff"),
])
def test_bad_feature_arguments_name_the_argument(kw, words):
    kw = dict(kw)
    top_k = kw.pop("top_k", 2)
    with pytest.raises(ValueError, match=words):
        TopKRouter(8, 8, top_k, **kw)
