"""What every dispatcher shares (``dispatchers/_base.py``): ``close()`` on the protocol, ``with``
support, constructor limits checked before anything is allocated, one ``repr``, the
``DeepEPTokenDispatcher`` alias, and the NVLink wire format's layout table."""
from __future__ import annotations

import sys

import pytest
import torch

import moe_dispatch
from moe_dispatch import AllToAllTokenDispatcher, DeepEPTokenDispatcher, FusedTokenRouter, NVLinkTokenDispatcher
from moe_dispatch.kernels.nvlink import wire
from moe_dispatch.protocol import TokenDispatcher


def test_all_to_all_close_is_a_noop_and_with_closes():
    d = AllToAllTokenDispatcher(4, 4, 8)
    assert isinstance(d, TokenDispatcher)
    d.close()
    d.close()  # idempotent
    x, se, w = torch.randn(3, 8), torch.tensor([[0, 1], [2, -1], [3, 3]]), torch.rand(3, 2)
    with AllToAllTokenDispatcher(4, 4, 8) as d2:
        out = d2.dispatch(x, se, w)
        y = d2.combine(out.expert_input, out.handle)
    ref = torch.zeros_like(x)
    for n in range(3):
        for k in range(2):
            if se[n, k] >= 0:
                ref[n] += w[n, k] * x[n]
    torch.testing.assert_close(y, ref)


def test_nvlink_with_calls_close(monkeypatch):
    closed = []
    d = NVLinkTokenDispatcher(4, 4, 8)
    monkeypatch.setattr(d, "close", lambda: closed.append(True))
    with d as same:
        assert same is d
    assert closed == [True]


@pytest.mark.parametrize("ep_size", [16, 32])
def test_nvlink_ep_size_limit_checked_in_init(ep_size):
    with pytest.raises(ValueError, match="ep_size must be at most 8"):
        NVLinkTokenDispatcher(ep_size * 2, 2, 8, ep_size)


def test_nvlink_int32_slot_limit_checked_in_init():
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        NVLinkTokenDispatcher(8, 1, 8, 8, max_tokens_per_rank=2**28, dropless=False)
    NVLinkTokenDispatcher(8, 1, 8, 8, max_tokens_per_rank=2**27, dropless=False)  # fits


def test_repr_names_the_class_and_arguments():
    assert repr(AllToAllTokenDispatcher(4, 2, 8, 2, "torch")) == (
        "AllToAllTokenDispatcher(num_experts=4, num_local_experts=2, hidden_size=8, ep_size=2, permute_backend='torch', "
        "max_tokens_per_rank=None, dropless=True)")
    assert repr(AllToAllTokenDispatcher(4, 2, 8, 2, max_tokens_per_rank=16, dropless=False)).endswith(
        "max_tokens_per_rank=16, dropless=False)")
    assert repr(NVLinkTokenDispatcher(4, 2, 8, 2)).startswith("NVLinkTokenDispatcher(num_experts=4,")


def test_deepep_alias(monkeypatch):
    assert DeepEPTokenDispatcher is FusedTokenRouter
    assert "DeepEPTokenDispatcher" in moe_dispatch.__all__
    monkeypatch.setitem(sys.modules, "deep_ep", None)
    with pytest.raises(ImportError, match="install_hybridep.sh"):
        DeepEPTokenDispatcher(8, 4, 64, 2)


@pytest.mark.parametrize("num_experts,world_size", [(4, 2), (7, 1), (64, 8)])
def test_snap_layout_decodes_named_fields(num_experts, world_size):
    lay = wire.snap_layout(num_experts, world_size)
    cs = lay.cs
    assert cs == num_experts + world_size + wire.ROW_TAIL
    assert lay.base == world_size * cs and lay.misc == lay.base + num_experts
    assert lay.host == lay.misc + wire.SNAP_HOST_FIELDS and lay.size == lay.misc + wire.SNAP_MISC_WIDTH
    table = list(range(1000, 1000 + lay.host))
    t = lay.decode(table)
    for r, row in enumerate(t.rows):
        start = 1000 + r * cs
        assert row.expert_slots == list(range(start, start + num_experts))
        assert row.tokens_to == list(range(start + num_experts, start + num_experts + world_size))
        tail = start + num_experts + world_size
        assert (row.num_tokens, row.bad_ids, row.hidden_size, row.dtype_code) == (
            tail + wire.ROW_NUM_TOKENS, tail + wire.ROW_BAD_IDS, tail + wire.ROW_HIDDEN, tail + wire.ROW_DTYPE)
    m = 1000 + lay.misc
    assert (t.rows_here, t.max_tokens, t.chunk_tokens, t.bad_ids, t.status) == (
        m + wire.SNAP_ROWS_HERE, m + wire.SNAP_MAX_TOKENS, m + wire.SNAP_CHUNK_TOKENS, m + wire.SNAP_BAD_IDS,
        m + wire.SNAP_STATUS)


def test_wire_dtype_codes_round_trip():
    assert {wire.CODE_DTYPES[c] for c in wire.DTYPE_CODES.values()} == set(wire.DTYPE_CODES)
