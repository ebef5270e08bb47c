"""TopKRouter: normalization modes against hand-computed values, aux loss, errors."""
from __future__ import annotations

import math

import pytest
import torch

from moe_dispatch import TopKRouter
from moe_dispatch.routing import switch_load_balancing_loss


def _router_with_logits(logits: torch.Tensor, top_k: int, **kw) -> tuple[TopKRouter, torch.Tensor]:
    """A router whose gate reproduces ``logits`` for the identity input."""
    n, e = logits.shape
    router = TopKRouter(n, e, top_k, **kw)
    with torch.no_grad():
        router.gate.weight.copy_(logits.t())
    return router, torch.eye(n)


def test_renorm_is_softmax_over_topk_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    router, x = _router_with_logits(logits, 2)
    se, w, aux = router(x)
    assert se.tolist() == [[1, 2]]
    e3, e2 = math.exp(3.0), math.exp(2.0)
    torch.testing.assert_close(w, torch.tensor([[e3 / (e3 + e2), e2 / (e3 + e2)]]))
    assert aux.item() == 0.0 and w.dtype == torch.float32 and se.dtype == torch.int64


def test_none_is_topk_of_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    router, x = _router_with_logits(logits, 2, normalization="none")
    se, w, _ = router(x)
    total = sum(math.exp(v) for v in (1.0, 3.0, 2.0, 0.0))
    torch.testing.assert_close(w, torch.tensor([[math.exp(3.0) / total, math.exp(2.0) / total]]))


def test_sparse_mixer_hand_computed():
    # top-1 = expert 1 (3.0). eps=0.01 -> margin 0.02 relative: (3.0 - l)/max(|l|, 3.0) <= 0.02 keeps
    # only logits >= 2.94: expert 1 and 3 (2.95). Its weight = softmax over {3.0, 2.95} at 3.0.
    # Second: max of the rest is 2.95 (expert 3); kept: (2.95 - l)/max(|l|, 2.95) <= 0.02 -> l >= 2.891,
    # among the remaining {1.0, 2.0(exp 2), 2.95}: only 2.95 -> weight 1.
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.95]])
    router, x = _router_with_logits(logits, 2, normalization="sparse_mixer")
    se, w, _ = router(x)
    assert se.tolist() == [[1, 3]]
    first = math.exp(3.0) / (math.exp(3.0) + math.exp(2.95))
    torch.testing.assert_close(w, torch.tensor([[first, 1.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_renorm_matches_hf_mixtral_math(seed):
    g = torch.Generator().manual_seed(seed)
    router = TopKRouter(16, 8, 2)
    x = torch.randn(33, 16, generator=g)
    se, w, _ = router(x)
    probs = torch.softmax(router.gate(x).float(), -1)
    ref_w, ref_se = probs.topk(2, -1)
    ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert torch.equal(se, ref_se)
    torch.testing.assert_close(w, ref_w)


def test_aux_loss_switch_formula_and_uniform_minimum():
    probs = torch.full((6, 3), 1 / 3)
    se = torch.tensor([[0], [1], [2], [0], [1], [2]])
    torch.testing.assert_close(switch_load_balancing_loss(probs, se), torch.tensor(1.0))
    probs2 = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    se2 = torch.tensor([[0, 1], [0, 1]])
    # f = [2/2, 2/2, 0], P = [0.65, 0.25, 0.1] -> 3 * (0.65 + 0.25)
    torch.testing.assert_close(switch_load_balancing_loss(probs2, se2), torch.tensor(3 * 0.9))
    router = TopKRouter(8, 4, 2, aux_loss_coeff=0.5)
    x = torch.randn(10, 8, requires_grad=True)
    _, _, aux = router(x)
    aux.backward()
    assert aux.item() > 0 and router.gate.weight.grad.abs().sum() > 0


def test_jitter_only_in_training():
    router = TopKRouter(8, 4, 2, jitter_noise=0.5)
    x = torch.randn(64, 8)
    router.eval()
    a, b = router(x)[1], router(x)[1]
    assert torch.equal(a, b)
    router.train()
    torch.manual_seed(0)
    c = router(x)[1]
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kw, words", [
    (dict(top_k=5), "top_k"), (dict(top_k=0), "top_k"), (dict(normalization="softmax"), "normalization"),
    (dict(num_experts=0), "num_experts"), (dict(aux_loss_coeff=-1.0), "aux_loss_coeff"),
])
def test_bad_router_arguments(kw, words):
    args = dict(hidden_size=8, num_experts=4, top_k=2)
    args.update(kw)
    with pytest.raises(ValueError, match=words):
        TopKRouter(**args)


def test_wrong_hidden_size_is_named():
    with pytest.raises(ValueError, match="hidden_states"):
        TopKRouter(8, 4, 2)(torch.randn(3, 9))


# --- load statistics and the two loss conventions, against HF's own function -------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

from moe_dispatch.routing import (LoadStats, load_balancing_loss, pool_load_stats,  # noqa: E402
                                  router_load_stats)


def _hf_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    return load_balancing_loss_func


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("layers, top_k, num_experts", [(1, 2, 4), (3, 2, 8), (2, 1, 5), (2, 4, 4)])
def test_pooled_stats_equal_hf_load_balancing_loss(seed, layers, top_k, num_experts):
    """HF pools every layer's statistics into one loss (``load_balancing_loss_func``)."""
    g = torch.Generator().manual_seed(seed)
    batch, seq = 3, 7
    logits = [torch.randn(batch * seq, num_experts, generator=g) * 3 for _ in range(layers)]
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    for attention_mask in (None, mask):
        ref = _hf_load_balancing_loss()(tuple(logits), num_experts, top_k, attention_mask)
        token_mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
        stats = [router_load_stats(torch.softmax(l, -1), torch.softmax(l, -1).topk(top_k, -1).indices, token_mask)
                 for l in logits]
        ours = load_balancing_loss(pool_load_stats(stats), top_k)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6,
                                   msg=lambda m: f"differs from transformers' load_balancing_loss_func: {m}")


def test_megatron_convention_is_switch_over_k():
    """Megatron-Core: aux = E * coeff / (T^2 * K) * sum_e probs_sum_e * tokens_per_expert_e."""
    g = torch.Generator().manual_seed(5)
    n, e, k = 40, 8, 3
    probs = torch.softmax(torch.randn(n, e, generator=g), -1)
    selected = probs.topk(k, -1).indices
    tokens_per_expert = torch.bincount(selected.reshape(-1), minlength=e).float()
    megatron_ref = e / (n * n * k) * (probs.sum(0) * tokens_per_expert).sum()
    stats = router_load_stats(probs, selected)
    torch.testing.assert_close(load_balancing_loss(stats, k, "megatron"), megatron_ref)
    torch.testing.assert_close(load_balancing_loss(stats, k, "switch"), k * megatron_ref)
    router = TopKRouter(8, e, k, aux_loss_coeff=1.0, aux_loss_convention="megatron")
    assert router.load_balancing_loss(stats) == load_balancing_loss(stats, k, "megatron")
    with pytest.raises(ValueError, match="aux_loss_convention"):
        TopKRouter(8, e, k, aux_loss_convention="hf")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 30), e=st.integers(1, 9), data=st.data())
def test_load_stats_count_each_slot_once_and_skip_padding_and_dropped(n, e, data):
    k = data.draw(st.integers(1, e))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, e, generator=g), -1)
    selected = torch.randint(-1, e, (n, k), generator=g)
    mask = torch.rand(n, generator=g) > 0.3
    stats = router_load_stats(probs, selected, mask)
    ref_counts = torch.zeros(e)
    for i in range(n):
        for j in range(k):
            if mask[i] and selected[i, j] >= 0:
                ref_counts[selected[i, j]] += 1
    assert torch.equal(stats.assignments, ref_counts)
    torch.testing.assert_close(stats.prob_sum, (probs * mask[:, None]).sum(0))
    assert stats.tokens.item() == mask.sum().item()
    assert isinstance(stats, LoadStats)


def test_router_route_reports_logits_stats_and_masks_padding():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2, aux_loss_coeff=0.1)
    x = torch.randn(6, 8)
    mask = torch.tensor([True, True, False, True, False, True])
    out = router.route(x, mask)
    torch.testing.assert_close(out.logits, x @ router.gate.weight.t())
    ref = 0.1 * load_balancing_loss(router_load_stats(torch.softmax(out.logits, -1), out.selected_experts, mask), 2)
    torch.testing.assert_close(out.aux_loss, ref)
    assert router.route(x).load_stats.tokens.item() == 6 and out.load_stats.tokens.item() == 4
    assert TopKRouter(8, 4, 2).route(x).load_stats is None
    assert TopKRouter(8, 4, 2).route(x, need_load_stats=True).load_stats is not None
    with pytest.raises(ValueError, match="token_mask"):
        router.route(x, mask[:3])
