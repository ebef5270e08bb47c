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
