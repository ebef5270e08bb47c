"""moe_dispatch: pluggable Mixture-of-Experts token dispatch for PyTorch.

Public API::

    from moe_dispatch import (TokenDispatcher, DispatchOutput, AllToAllTokenDispatcher,
                              NVLinkTokenDispatcher, FusedTokenRouter, DeepEPTokenDispatcher,
                              TopKRouter,
                              permute, unpermute)

Importing this package needs only torch and numpy; TransformerEngine, DeepEP and Triton are
imported lazily by the backends that use them (:mod:`moe_dispatch._optional`). The layers and
what each may import: ``docs/ARCHITECTURE.md``.
"""
from __future__ import annotations

from .dispatchers.all_to_all import AllToAllTokenDispatcher
from .dispatchers.deepep import DeepEPTokenDispatcher, FusedTokenRouter
from .dispatchers.nvlink import NVLinkTokenDispatcher
from .experts import SwiGLUExperts
from .moe import MoELayer, MoEOutput
from .permute import count_tokens_per_expert, permute, permute_with_probs, unpermute
from .protocol import DispatchOutput, TokenDispatcher
from .routing import TopKRouter

__version__ = "0.1.0"

__all__ = [
    "TokenDispatcher", "DispatchOutput", "AllToAllTokenDispatcher", "NVLinkTokenDispatcher", "FusedTokenRouter",
    "DeepEPTokenDispatcher", "TopKRouter",
    "permute", "unpermute", "permute_with_probs", "count_tokens_per_expert",
    "SwiGLUExperts", "MoELayer", "MoEOutput",
]
