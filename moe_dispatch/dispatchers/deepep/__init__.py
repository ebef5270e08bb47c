"""The DeepEP backend: ``FusedTokenRouter`` (alias ``DeepEPTokenDispatcher``).

* ``router.py``: the dispatcher on DeepEP's normal-mode (V1) kernels; ``deep_ep`` is imported
  when a router is constructed (:func:`moe_dispatch._optional.import_deep_ep`).
* ``routing_maps.py``: top-k ids <-> multi-hot routing maps of the received tokens
  (``FusedTokenRouter.routing_map``), a torch reference and a Triton op.
"""
from __future__ import annotations

from .router import (_INSTALL_HINT, DEFAULT_NUM_SMS, SMS_ENV_VAR, DeepEPTokenDispatcher,  # noqa: F401
                     FusedRouterHandle, FusedTokenRouter)

__all__ = ["FusedTokenRouter", "DeepEPTokenDispatcher", "FusedRouterHandle", "SMS_ENV_VAR", "DEFAULT_NUM_SMS"]
