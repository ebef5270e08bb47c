"""FusedTokenRouter (DeepEP backend).

Without a GPU the router's logic runs against a fake ``deep_ep`` module whose ``Buffer`` has
DeepEP V1's normal-mode semantics (one rank in this process, or several spawned gloo ranks),
checked against the dense torch reference of ``tests/distributed/ep_cases.py``;
``test_gpu_equivalence`` runs the real DeepEP on 2 GPUs through torchrun
(``tests/distributed/deepep_equivalence.py``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_dispatch.dispatchers import deepep as deepep_mod
from moe_dispatch.dispatchers.deepep import DEFAULT_NUM_SMS, SMS_ENV_VAR, FusedRouterHandle, FusedTokenRouter
from moe_dispatch.protocol import TokenDispatcher

from .distributed.ep_cases import Case, make_inputs, run_case, standard_cases
from .distributed.harness import run_ranks

REPO = Path(__file__).resolve().parents[1]


# --- a fake deep_ep: V1 normal-mode semantics over a gloo group --------------------------------
def make_fake_deep_ep() -> types.ModuleType:
    """A fresh ``deep_ep`` stand-in with DeepEP V1 normal-mode semantics, moving tokens with
    gloo object all-gathers (CPU; one rank or several). It checks the preconditions DeepEP v1.2.1
    asserts (dtypes, contiguity, 16-byte rows, bf16-only combine, explicit configs, rows that fit
    the NVLink buffer) and logs every call. Semantics modelled on v1.2.1's intranode kernels: a
    token goes once to each rank holding one of its experts, with ids rewritten to that rank's
    local ids (-1 elsewhere) and weights zeroed at -1 slots; received tokens are ordered by
    (source rank, source token); combine sums (no weights) the rows sent back for each token, in
    fp32, output in bf16; the handle does not fix the row width, so combine (and cached dispatch)
    may move rows of another width than the dispatch did.

    Combine also refuses rows that are not a whole number of 32 16-byte vectors (bf16: hidden not
    a multiple of 256): v1.2.1's intranode combine kernel runs three full-warp ``__syncwarp()``
    inside ``for (int i = lane_id; i < hidden_int4; i += 32)`` (csrc/kernels/intranode.cu, the
    receiver's TMA-store loop), so for such rows part of the warp skips them - undefined
    behaviour that silently and nondeterministically corrupts combined rows on H100/H200 (fixed
    upstream only after v1.2.1, DeepEP PR #413). The real kernel does not raise; the fake does,
    so the CPU tests catch a router that hands DeepEP such rows."""

    class Config:
        def __init__(self, num_sms=20, nvl_send=6, nvl_recv=256, rdma_send=6, rdma_recv=256):
            self.num_sms, self.nvl_send, self.nvl_recv = num_sms, nvl_send, nvl_recv

        def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
            return (self.num_sms // 2) * num_ranks * self.nvl_recv * hidden_bytes

        def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
            return 0

    class Buffer:
        num_sms = 20
        log: list = []

        def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                     allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=False):
            assert group is not None, "Either 'group' or 'comm' must be provided."
            self.group, self.num_nvl_bytes, self.num_rdma_bytes = group, num_nvl_bytes, num_rdma_bytes
            self.rank, self.group_size = dist.get_rank(group), dist.get_world_size(group)
            self.explicitly_destroy, self.destroyed = explicitly_destroy, False
            Buffer.log.append(("init", num_nvl_bytes, num_rdma_bytes))

        @staticmethod
        def set_num_sms(new_num_sms):
            assert new_num_sms % 2 == 0, "The SM count must be even"
            Buffer.num_sms = new_num_sms

        @staticmethod
        def get_dispatch_config(num_ranks):
            return Config(Buffer.num_sms, 24, 256, 6, 128)

        @staticmethod
        def get_combine_config(num_ranks):
            return Config(Buffer.num_sms, 10, 256, 6, 128)

        def destroy(self):
            assert self.explicitly_destroy and not self.destroyed
            self.destroyed = True
            Buffer.log.append(("destroy",))

        def _alive(self, config):
            assert not self.destroyed, "buffer used after destroy()"
            assert config is not None and config.num_sms % 2 == 0

        def _check_fits(self, x, config):
            # deep_ep.cpp intranode_dispatch / intranode_combine: EP_HOST_ASSERT that the channel
            # data buffers (plus metadata, not modelled) fit num_nvl_bytes.
            data_bytes = (config.num_sms // 2) * self.group_size * config.nvl_recv * x.shape[1] * x.element_size()
            assert data_bytes <= self.num_nvl_bytes, (
                f"rows of {x.shape[1] * x.element_size()} bytes do not fit the {self.num_nvl_bytes}-byte NVL buffer")

        def _exchange(self, payloads):
            """``payloads[r]`` goes to rank r; returns what each rank sent here, by source rank."""
            everything = [None] * self.group_size
            dist.all_gather_object(everything, payloads, group=self.group)
            return [sent[self.rank] for sent in everything]

        def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                                allocate_on_comm_stream=False):
            assert not self.destroyed
            assert topk_idx.dtype == torch.int64 and topk_idx.dim() == 2 and topk_idx.is_contiguous()
            Buffer.log.append(("layout",))
            valid = topk_idx >= 0
            per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
            dest = torch.where(valid, topk_idx // (num_experts // self.group_size), -1)
            in_rank = torch.stack([(dest == r).any(1) for r in range(self.group_size)], 1).reshape(-1, self.group_size)
            return in_rank.sum(0).to(torch.int32), None, per_expert, in_rank.contiguous(), None

        def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                     is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                     expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None,
                     async_finish=False, allocate_on_comm_stream=False):
            self._alive(config)
            assert x.dim() == 2 and x.is_contiguous() and (x.shape[1] * x.element_size()) % 16 == 0
            self._check_fits(x, config)
            if handle is not None:  # cached mode: the backward of combine
                assert topk_idx is None and topk_weights is None
                Buffer.log.append(("dispatch_cached",))
                send_idx, _, _ = handle
                received = self._exchange([x[i] for i in send_idx])
                return torch.cat(received).reshape(-1, x.shape[1]), None, None, None, None, None
            Buffer.log.append(("dispatch", config.num_sms))
            assert topk_idx.dtype == torch.int64 and topk_idx.is_contiguous()
            assert topk_weights.dtype == torch.float32 and topk_weights.is_contiguous()
            assert num_tokens_per_rank.dtype == torch.int32 and num_tokens_per_expert.dtype == torch.int32
            assert is_token_in_rank.dtype == torch.bool and is_token_in_rank.shape == (x.shape[0], self.group_size)
            num_local = num_tokens_per_expert.numel() // self.group_size
            payloads, send_idx = [], []
            for r in range(self.group_size):
                idx = is_token_in_rank[:, r].nonzero().squeeze(1)  # in source-token order
                ids = topk_idx[idx]
                local = torch.where((ids >= r * num_local) & (ids < (r + 1) * num_local), ids - r * num_local, -1)
                payloads.append((x[idx], local, topk_weights[idx].masked_fill(local < 0, 0.0)))
                send_idx.append(idx)
            received = self._exchange(payloads)  # by source rank
            K = topk_idx.shape[1]
            recv_x = torch.cat([p[0] for p in received]).reshape(-1, x.shape[1])
            recv_idx = torch.cat([p[1] for p in received]).reshape(-1, K)
            recv_w = torch.cat([p[2] for p in received]).reshape(-1, K)
            counts = torch.bincount(recv_idx[recv_idx >= 0], minlength=num_local).tolist()
            handle = (send_idx, [p[0].shape[0] for p in received], x.shape[0])
            return recv_x, recv_idx, recv_w, counts, handle, None

        def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                    async_finish=False, allocate_on_comm_stream=False):
            self._alive(config)
            assert x.dtype == torch.bfloat16, "Unsupported type"  # SWITCH_TYPES: bf16 only
            assert x.dim() == 2 and x.is_contiguous()
            assert (x.shape[1] * x.element_size()) % 16 == 0
            hidden_int4 = x.shape[1] * x.element_size() // 16
            assert hidden_int4 % 32 == 0, (
                f"DeepEP v1.2.1 intranode combine of rows of {hidden_int4} 16-byte vectors (not a multiple of 32): "
                f"partial-warp __syncwarp() in the receiver's TMA-store loop silently corrupts the output")
            self._check_fits(x, config)
            Buffer.log.append(("combine", topk_weights is not None, x.shape[1]))
            send_idx, recv_counts, num_tokens = handle
            assert x.shape[0] == sum(recv_counts)
            if topk_weights is not None:
                assert topk_weights.dtype == torch.float32 and topk_weights.is_contiguous()
            starts = [sum(recv_counts[:s]) for s in range(self.group_size)]
            back = self._exchange([
                (x[starts[s]:starts[s] + recv_counts[s]],
                 None if topk_weights is None else topk_weights[starts[s]:starts[s] + recv_counts[s]])
                for s in range(self.group_size)])
            out = torch.zeros(num_tokens, x.shape[1])
            out_w = None if topk_weights is None else torch.zeros(num_tokens, topk_weights.shape[1])
            for r, (rows, w) in enumerate(back):  # what rank r computed for the tokens sent to it
                out.index_add_(0, send_idx[r], rows.float())
                if out_w is not None:
                    out_w.index_add_(0, send_idx[r], w)
            return out.to(x.dtype), out_w, None

    mod = types.ModuleType("deep_ep")
    mod.Buffer, mod.Config = Buffer, Config
    return mod


@pytest.fixture
def fake_deep_ep(monkeypatch):
    mod = make_fake_deep_ep()
    monkeypatch.setitem(sys.modules, "deep_ep", mod)
    return mod


@pytest.fixture(scope="module")
def one_rank_group():
    """A real gloo process group of one rank (this process)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


# --- without deep_ep ----------------------------------------------------------------------------
def test_missing_deep_ep_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_ep", None)  # import deep_ep -> ImportError, even where installed
    with pytest.raises(ImportError, match="install_hybridep.sh"):
        FusedTokenRouter(8, 4, 64, 2)


def test_argument_errors_name_the_argument(fake_deep_ep, monkeypatch):
    with pytest.raises(ValueError, match="num_local_experts"):
        FusedTokenRouter(8, 3, 64, 2)
    with pytest.raises(ValueError, match="hidden_size"):
        FusedTokenRouter(8, 4, 72, 2)  # 144-byte rows: not whole pairs of 16-byte vectors
    with pytest.raises(ValueError, match="hidden_size"):
        FusedTokenRouter(8, 4, 8192, 2)
    with pytest.raises(ValueError, match="num_local_experts"):
        FusedTokenRouter(2 * 129, 129, 64, 2)
    with pytest.raises(ValueError, match="num_sms"):
        FusedTokenRouter(8, 4, 64, 2, num_sms=7)
    with pytest.raises(ValueError, match="permute_backend"):
        FusedTokenRouter(8, 4, 64, 2, permute_backend="cuda-magic")
    monkeypatch.setenv(SMS_ENV_VAR, "many")
    with pytest.raises(ValueError, match=SMS_ENV_VAR):
        FusedTokenRouter(8, 4, 64, 2)


def test_num_sms_argument_env_default(fake_deep_ep, monkeypatch):
    monkeypatch.delenv(SMS_ENV_VAR, raising=False)
    assert FusedTokenRouter(8, 4, 64, 2).num_sms == DEFAULT_NUM_SMS == 20
    monkeypatch.setenv(SMS_ENV_VAR, "24")
    assert FusedTokenRouter(8, 4, 64, 2).num_sms == 24
    assert FusedTokenRouter(8, 4, 64, 2, num_sms=32).num_sms == 32


def test_protocol_conformance(fake_deep_ep):
    router = FusedTokenRouter(8, 8, 64, 1)
    assert isinstance(router, TokenDispatcher)
    assert "FusedTokenRouter" in repr(router)


# --- one rank, no group: local path, no DeepEP --------------------------------------------------
def _one_rank_cases(seed=0):
    n = [13]
    return [
        Case(4, 16, 2, n, "random", seed),
        Case(4, 32, 2, n, "uneven", seed + 1),
        Case(4, 16, 2, n, "one_expert", seed + 2),        # every token to one expert
        Case(6, 16, 3, n, "empty_experts", seed + 3),
        Case(4, 16, 2, n, "with_drops", seed + 4),        # -1 slots
        Case(4, 16, 4, n, "topk_all", seed + 5),          # top-k = number of experts
        Case(4, 16, 2, [0], "random", seed + 6),          # no tokens
    ]


def _make(E, L, H, P):
    return FusedTokenRouter(E, L, H, P, permute_backend="torch")


@pytest.mark.parametrize("case", _one_rank_cases(), ids=lambda c: f"{c.routing}-N{c.tokens_per_rank[0]}")
def test_local_path_matches_dense_reference(fake_deep_ep, case):
    run_case(0, 1, _make, case, None, torch.device("cpu"), torch.float32)
    assert fake_deep_ep.Buffer.log == []  # no group: DeepEP never touched


# --- one rank through the (fake) DeepEP buffer --------------------------------------------------
@pytest.mark.parametrize("case", _one_rank_cases(100), ids=lambda c: f"{c.routing}-N{c.tokens_per_rank[0]}")
def test_deepep_path_matches_dense_reference(fake_deep_ep, one_rank_group, case):
    run_case(0, 1, _make, case, one_rank_group, torch.device("cpu"), torch.bfloat16)
    kinds = [entry[0] for entry in fake_deep_ep.Buffer.log]
    assert kinds[0] == "init" and "layout" in kinds and "dispatch" in kinds
    assert "combine" in kinds and "dispatch_cached" in kinds  # both backward passes ran


def test_deepep_path_with_triton_permute(fake_deep_ep, one_rank_group):
    from moe_dispatch.permute import resolve_backend

    try:
        resolve_backend("triton", torch.device("cpu"))
    except ValueError as exc:
        pytest.skip(str(exc))
    make = lambda E, L, H, P: FusedTokenRouter(E, L, H, P, permute_backend="triton")  # noqa: E731
    for case in (Case(4, 16, 2, [13], "with_drops", 1), Case(4, 32, 4, [9], "topk_all", 2)):
        run_case(0, 1, make, case, one_rank_group, torch.device("cpu"), torch.bfloat16)


def test_identity_experts_give_weighted_sum(fake_deep_ep, one_rank_group):
    xs, ses, ws, _ = make_inputs(Case(8, 64, 3, [21], "with_drops", 7), 1)
    x, se, w = xs[0].bfloat16(), ses[0], ws[0]
    router = FusedTokenRouter(8, 8, 64, 1, num_sms=24)
    router.set_ep_group(one_rank_group)
    out = router.dispatch(x, se, w)
    assert out.expert_input.dtype == torch.bfloat16 and out.tokens_per_expert.dtype == torch.int64
    assert out.tokens_per_expert.tolist() == torch.bincount(se[se >= 0], minlength=8).tolist()
    y = router.combine(out.expert_input, out.handle)
    expected = ((w * (se >= 0)).sum(1, keepdim=True) * x.double()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)
    assert ("dispatch", 24) in fake_deep_ep.Buffer.log  # the router's own config went to DeepEP
    assert fake_deep_ep.Buffer.num_sms == 20  # DeepEP's process-wide SM count left as it was
    router.close()


def test_weight_gradient_reaches_only_chosen_slots(fake_deep_ep, one_rank_group):
    xs, ses, ws, W = make_inputs(Case(4, 16, 2, [9], "with_drops", 3), 1)
    x = xs[0].bfloat16().requires_grad_()
    w = ws[0].clone().requires_grad_()
    router = FusedTokenRouter(4, 4, 16, 1)
    router.set_ep_group(one_rank_group)
    out = router.dispatch(x, ses[0], w)
    rows = out.expert_input.double()
    y = router.combine((rows * rows.sum(1, keepdim=True)).to(torch.bfloat16), out.handle)
    y.float().sum().backward()
    assert bool((w.grad[ses[0] < 0] == 0).all())
    x_ref = xs[0].clone().requires_grad_()
    w_ref = ws[0].double().requires_grad_()
    valid = (ses[0] >= 0).double()
    y_ref = ((w_ref * valid).sum(1, keepdim=True) * x_ref * x_ref.sum(1, keepdim=True))
    y_ref.sum().backward()
    err = (w.grad.double() - w_ref.grad).norm() / w_ref.grad.norm()
    assert err < 1e-2
    router.close()


def test_fake_combine_refuses_partial_warp_rows(fake_deep_ep, one_rank_group):
    """The fake models DeepEP v1.2.1's intranode combine, which is only correct for rows of whole
    warps of 16-byte vectors (bf16 hidden % 256 == 0); other widths corrupt its output."""
    Buffer = fake_deep_ep.Buffer
    config = Buffer.get_combine_config(1)
    buffer = Buffer(one_rank_group, config.get_nvl_buffer_size_hint(3072 * 2, 1), 0, explicitly_destroy=True)
    se = torch.tensor([[0], [1], [0]])
    layout = buffer.get_dispatch_layout(se, 2)
    for hidden in (64, 128, 2880):
        x = torch.randn(3, hidden, dtype=torch.bfloat16)
        recv_x, _, _, _, handle, _ = buffer.dispatch(
            x, topk_idx=se, topk_weights=torch.ones(3, 1), num_tokens_per_rank=layout[0],
            is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], config=Buffer.get_dispatch_config(1))
        with pytest.raises(AssertionError, match="v1.2.1 intranode combine"):
            buffer.combine(recv_x, handle, config=config)
        wide = torch.nn.functional.pad(recv_x, (0, -hidden % 256))  # the handle does not fix the width
        combined, _, _ = buffer.combine(wide, handle, config=config)
        torch.testing.assert_close(combined[:, :hidden], x)
    buffer.destroy()


@pytest.mark.parametrize("hidden,width", [(16, 256), (48, 256), (256, 256), (272, 512), (2880, 3072)])
def test_combine_moves_rows_padded_to_whole_warps(fake_deep_ep, one_rank_group, hidden, width):
    """Every DeepEP combine (forward, and the backward of dispatch) moves rows padded to a
    multiple of 256; dispatch rows (and the cached dispatch of combine's backward) keep H."""
    torch.manual_seed(hidden)
    router = FusedTokenRouter(4, 4, hidden, 1)
    router.set_ep_group(one_rank_group)
    x = torch.randn(7, hidden, dtype=torch.bfloat16, requires_grad=True)
    se = torch.tensor([[0, 1], [2, -1], [3, 0], [-1, -1], [1, 2], [3, -1], [0, 3]])
    w = torch.rand(7, 2, requires_grad=True)
    out = router.dispatch(x, se, w)
    y = router.combine(out.expert_input, out.handle)
    assert y.shape == (7, hidden) and y.dtype == torch.bfloat16 and y.is_contiguous()
    expected = ((w.detach() * (se >= 0)).sum(1, keepdim=True) * x.detach().double()).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    combines = [e for e in fake_deep_ep.Buffer.log if e[0] == "combine"]
    assert [(e[1], e[2]) for e in combines] == [(False, width), (True, width)]
    router.close()


def test_checks_run_before_any_collective(fake_deep_ep, one_rank_group):
    router = FusedTokenRouter(4, 4, 16, 1)
    router.set_ep_group(one_rank_group)
    fake_deep_ep.Buffer.log.clear()
    torch.manual_seed(0)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    se = torch.randint(0, 4, (5, 2))
    w = torch.rand(5, 2)
    bad = se.clone()
    bad[2, 1] = 4  # one past the last expert
    with pytest.raises(ValueError, match="selected_experts"):
        router.dispatch(x, bad, w)
    with pytest.raises(TypeError, match="hidden_states"):
        router.dispatch(x.float(), se, w)  # DeepEP's combine reduces bf16 only
    with pytest.raises(ValueError, match="hidden_states"):
        router.dispatch(torch.randn(5, 32, dtype=torch.bfloat16), se, w)
    with pytest.raises(ValueError, match="routing_weights"):
        router.dispatch(x, se, w[:, :1])
    with pytest.raises(TypeError, match="selected_experts"):
        router.dispatch(x, se.float(), w)
    wide = FusedTokenRouter(64, 64, 16, 1)
    wide.set_ep_group(one_rank_group)
    fake_deep_ep.Buffer.log.clear()
    with pytest.raises(ValueError, match="selected_experts"):
        wide.dispatch(x, torch.arange(33).repeat(5, 1), torch.rand(5, 33))  # top-k > 32
    assert fake_deep_ep.Buffer.log == []
    router.close()
    wide.close()


def test_buffer_lifecycle(fake_deep_ep, one_rank_group):
    log = fake_deep_ep.Buffer.log
    router = FusedTokenRouter(4, 4, 16, 1)
    router.set_ep_group(one_rank_group)
    router.set_ep_group(one_rank_group)  # same group: keep the buffer
    assert [e[0] for e in log] == ["init"]
    # Sized by the configs' hints: dispatch for 16 bf16 (32 B) rows, combine for rows padded to 256 (512 B).
    assert log[0][1] == max(10 * 1 * 256 * 32, 10 * 1 * 256 * 512)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = router.dispatch(x, torch.tensor([[0, 1], [2, -1], [3, 0]]), torch.rand(3, 2))
    assert isinstance(out.handle, FusedRouterHandle)
    with pytest.raises(AttributeError):
        out.handle.num_rows = 0  # frozen

    other = dist.new_group([0])  # a different group: a new buffer, the old one freed
    router.set_ep_group(other)
    assert [e[0] for e in log][-2:] == ["destroy", "init"]
    with pytest.raises(ValueError, match="closed or replaced"):
        router.combine(out.expert_input, out.handle)  # stale handle

    router.close()
    router.close()  # idempotent
    assert [e[0] for e in log].count("destroy") == 2
    with pytest.raises(RuntimeError, match="closed"):
        router.dispatch(x, torch.tensor([[0, 1], [2, -1], [3, 0]]), torch.rand(3, 2))
    router.set_ep_group(None)  # ep_size 1: back to local
    router.dispatch(x, torch.tensor([[0, 1], [2, -1], [3, 0]]), torch.rand(3, 2))


def test_group_required_and_size_checked(fake_deep_ep, one_rank_group):
    router = FusedTokenRouter(8, 4, 16, 2)
    with pytest.raises(RuntimeError, match="set_ep_group"):
        router.dispatch(torch.randn(2, 16, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    with pytest.raises(ValueError, match="group"):
        router.set_ep_group(None)
    with pytest.raises(ValueError, match="ep_size=2"):
        router.set_ep_group(one_rank_group)
    assert fake_deep_ep.Buffer.log == []


def test_routing_map_from_handle(fake_deep_ep, one_rank_group):
    router = FusedTokenRouter(4, 4, 16, 1)
    router.set_ep_group(one_rank_group)
    se = torch.tensor([[2, 0], [-1, 1], [-1, -1]])
    w = torch.tensor([[0.7, 0.3], [0.5, 0.9], [0.2, 0.2]], requires_grad=True)
    out = router.dispatch(torch.randn(3, 16, dtype=torch.bfloat16), se, w)
    routing_map, dense = router.routing_map(out.handle, backend="torch")
    # token 2 chose no expert: DeepEP does not send it, so two tokens are received
    assert routing_map.tolist() == [[True, False, True, False], [False, True, False, False]]
    torch.testing.assert_close(dense, torch.tensor([[0.3, 0.0, 0.7, 0.0], [0.0, 0.9, 0.0, 0.0]]))
    (dense * torch.arange(1.0, 5.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([[3.0, 1.0], [0.0, 2.0], [0.0, 0.0]]))
    router.close()


# --- several ranks through the fake DeepEP (gloo, spawned processes) ------------------------------
def _fake_ep_worker(rank, world_size, seed):
    sys.modules["deep_ep"] = make_fake_deep_ep()
    # DeepEP rows are whole pairs of 16-byte vectors: widen the shared cases' smaller hidden sizes.
    for case in standard_cases(world_size, seed):
        case = dataclasses.replace(case, hidden=max(16, case.hidden // 16 * 16))
        run_case(rank, world_size, _make, case, dist.group.WORLD, torch.device("cpu"), torch.bfloat16)
    kinds = {entry[0] for entry in sys.modules["deep_ep"].Buffer.log}
    return sorted(kinds)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_several_ranks_through_fake_deepep(world_size):
    """Cross-rank logic (local ids, weights applied before DeepEP's unweighted sum, gradients
    through both autograd Functions) against the dense reference, on the shared EP cases."""
    for kinds in run_ranks(_fake_ep_worker, world_size, 4321 + world_size, timeout=240):
        assert {"init", "layout", "dispatch", "combine", "dispatch_cached"} <= set(kinds)


# --- install_hybridep.sh --------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_install_script_dry_run(tmp_path):
    src = tmp_path / "DeepEP"
    (src / "csrc").mkdir(parents=True)
    (src / "setup.py").write_text("print('not run in a dry run')\n")
    (src / "csrc" / "deep_ep.cpp").write_text("// empty\n")
    env = dict(os.environ, FORCE_ARCH="9.0")
    res = subprocess.run(["bash", str(REPO / "install_hybridep.sh"), "--dry-run", "--src", str(src), "--intranode-only",
                          "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "TORCH_CUDA_ARCH_LIST=9.0" in res.stdout
    assert "pip wheel --no-build-isolation --no-deps" in res.stdout
    assert "import deep_ep" in res.stdout
    assert not (tmp_path / "work").exists()  # a dry run writes nothing
    assert os.access(REPO / "install_hybridep.sh", os.X_OK)


# --- real DeepEP on 2 GPUs ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.skipif(importlib.util.find_spec("deep_ep") is None, reason=f"deep_ep not installed ({deepep_mod._INSTALL_HINT})")
def test_gpu_equivalence():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "distributed" / "deepep_equivalence.py")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "DEEPEP EQUIVALENCE: PASS" in out, out[-8000:]
