"""AllToAllTokenDispatcher on gloo: EP dispatch/combine equals the dense single-process
reference, forward and backward, at 2 and 4 ranks; bad input raises on every rank."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_dispatch import AllToAllTokenDispatcher

from .ep_cases import run_case, standard_cases
from .harness import RankError, run_ranks

pytestmark = pytest.mark.distributed


def _make(E, L, H, P):
    return AllToAllTokenDispatcher(E, L, H, ep_size=P, permute_backend="torch")


def _all_cases(rank, world_size, seed):
    results = []
    for case in standard_cases(world_size, seed):
        results.append(run_case(rank, world_size, _make, case, dist.group.WORLD, torch.device("cpu")))
    # bf16 on gloo too: same rows, bf16 tolerances
    case = standard_cases(world_size, seed)[1]
    results.append(run_case(rank, world_size, _make, case, dist.group.WORLD, torch.device("cpu"), torch.bfloat16))
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_ep_equals_dense_reference(world_size):
    seed = 1234 + world_size
    results = run_ranks(_all_cases, world_size, seed, timeout=240)
    assert len(results) == world_size


def _mismatched_config(rank, world_size):
    # rank 1 believes in a different hidden size: every rank must raise, none may hang
    hidden = 16 if rank != 1 else 32
    d = AllToAllTokenDispatcher(4 * world_size, 4, hidden, ep_size=world_size)
    d.set_ep_group(dist.group.WORLD)


def _bad_ids_on_one_rank(rank, world_size):
    d = AllToAllTokenDispatcher(2 * world_size, 2, 8, ep_size=world_size)
    d.set_ep_group(dist.group.WORLD)
    x = torch.randn(4, 8)
    se = torch.randint(0, 2 * world_size, (4, 2))
    if rank == 0:
        se[1, 1] = 2 * world_size  # out of range
    d.dispatch(x, se, torch.rand(4, 2))


def _wrong_hidden_dtype_on_one_rank(rank, world_size):
    d = AllToAllTokenDispatcher(2 * world_size, 2, 8, ep_size=world_size)
    d.set_ep_group(dist.group.WORLD)
    x = torch.randn(4, 8, dtype=torch.float32 if rank else torch.bfloat16)
    d.dispatch(x, torch.randint(0, 2 * world_size, (4, 2)), torch.rand(4, 2))


def _wrong_group_size(rank, world_size):
    d = AllToAllTokenDispatcher(8, 2, 8, ep_size=4)
    d.set_ep_group(dist.group.WORLD)


@pytest.mark.parametrize("fn, message", [
    (_mismatched_config, "disagree on hidden_size"),
    (_bad_ids_on_one_rank, "rank(s) [0]"),
    (_wrong_hidden_dtype_on_one_rank, "disagree on hidden_states"),
    (_wrong_group_size, "ep_size=4"),
])
def test_bad_input_raises_on_every_rank(fn, message):
    with pytest.raises(RankError) as info:
        run_ranks(fn, 2, timeout=60)
    errors = info.value.errors
    assert sorted(errors) == [0, 1], f"only ranks {sorted(errors)} raised"
    for tb in errors.values():
        assert "ValueError" in tb and message in tb, tb
