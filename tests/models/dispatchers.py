"""Every token dispatcher the model tests run on, in one place: add new dispatchers here.

Each entry is a ``pytest.param(factory, id=...)``; ``factory(config) -> TokenDispatcher`` for an
NV model config (``NVMixtralConfig``, ``NVQwen3MoeConfig``) with ``expert_parallel_size == 1``.
Entries that cannot run on this machine are left out (the triton permute backend runs on CPU
through TRITON_INTERPRET=1, set in tests/conftest.py, and is slow there: tests keep its inputs
tiny).
"""
from __future__ import annotations

import pytest
import torch

from moe_dispatch import AllToAllTokenDispatcher, NVLinkTokenDispatcher
from moe_dispatch.permute import resolve_backend


def _all_to_all(permute_backend: str):
    def factory(config):
        experts = config.num_routed_experts
        return AllToAllTokenDispatcher(experts, experts, config.hidden_size, 1, permute_backend=permute_backend)

    return factory


def _runs_here(permute_backend: str, device: torch.device) -> bool:
    try:
        resolve_backend(permute_backend, device)
    except (ValueError, ImportError):
        return False
    return True


def dispatcher_params(device: torch.device | str = "cpu") -> list:
    """``pytest.param(factory, id=name, marks=...)`` for every dispatcher usable on ``device``."""
    device = torch.device(device)
    params = [pytest.param(_all_to_all("torch"), id="all_to_all-torch")]
    if _runs_here("triton", device):
        params.append(pytest.param(_all_to_all("triton"), id="all_to_all-triton"))
    if device.type == "cuda" and _runs_here("te", device):
        params.append(pytest.param(_all_to_all("te"), id="all_to_all-te"))
    if _runs_here("triton", device):  # the NVLink dispatcher's kernels are Triton (interpreted on CPU)
        params.append(pytest.param(_nvlink, id="nvlink"))
    return params


def _nvlink(config):
    experts = config.num_routed_experts
    return NVLinkTokenDispatcher(experts, experts, config.hidden_size, 1)
