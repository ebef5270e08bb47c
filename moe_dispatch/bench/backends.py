"""The dispatchers the benchmark knows, by name, each built lazily so a missing optional
dependency only removes its row."""
from __future__ import annotations

from typing import Callable

import torch


def _all_to_all(permute_backend: str) -> Callable:
    def make(E, L, H, P):
        from moe_dispatch import AllToAllTokenDispatcher
        from moe_dispatch.permute import resolve_backend

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        resolve_backend(permute_backend, device)  # ValueError when this permute backend cannot run here
        return AllToAllTokenDispatcher(E, L, H, P, permute_backend=permute_backend)
    return make


def _all_to_all_capacity(permute_backend: str) -> Callable:
    """Capacity mode sized for the benchmark's tokens per rank (no host sync: also timed replayed
    from a CUDA graph on GPU)."""
    def make(E, L, H, P, T):
        from moe_dispatch import AllToAllTokenDispatcher
        from moe_dispatch.permute import resolve_backend

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        resolve_backend(permute_backend, device)
        return AllToAllTokenDispatcher(E, L, H, P, permute_backend=permute_backend, max_tokens_per_rank=max(T, 1),
                                       dropless=False)
    make.needs_tokens = True
    return make


def _nvlink(E, L, H, P):
    from moe_dispatch.dispatchers.nvlink import NVLinkTokenDispatcher

    if not torch.cuda.is_available():
        raise ValueError("needs CUDA GPUs that are NVLink/P2P peers")
    return NVLinkTokenDispatcher(E, L, H, P)


def _deepep(E, L, H, P):
    from moe_dispatch.dispatchers.deepep import FusedTokenRouter

    return FusedTokenRouter(E, L, H, P)


BACKENDS: dict[str, Callable] = {
    "all_to_all": _all_to_all("auto"),
    "all_to_all+torch": _all_to_all("torch"),
    "all_to_all+triton": _all_to_all("triton"),
    "all_to_all+te": _all_to_all("te"),
    "all_to_all+capacity": _all_to_all_capacity("auto"),
    "nvlink": _nvlink,
    "deepep": _deepep,
}

DEFAULT_CPU = ["all_to_all+torch"]
DEFAULT_GPU = ["all_to_all+torch", "all_to_all+te", "all_to_all+triton", "all_to_all+capacity", "nvlink", "deepep"]
