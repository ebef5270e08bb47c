"""The optional dependencies, each imported lazily in one place with how to install it.

Importing ``moe_dispatch`` needs only torch (and numpy); TransformerEngine, DeepEP and Triton are
accelerators. Every module that needs one asks here, when it first needs it, and gets either the
module or an ``ImportError`` whose message says how to install it. Nothing here caches modules or
sets flags: Python's own ``sys.modules`` is the cache.

``triton_interpreting()`` is the one reading of ``TRITON_INTERPRET`` in the package (Triton runs
kernels on CPU through its interpreter when it is set, read when triton is first imported).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = [
    "import_transformer_engine", "import_deep_ep", "import_triton", "import_triton_kernels",
    "import_cuda_extension", "triton_interpreting", "TE_INSTALL_HINT", "DEEP_EP_INSTALL_HINT",
    "TRITON_INSTALL_HINT", "CUDA_EXTENSION_INSTALL_HINT",
]

TE_INSTALL_HINT = 'pip install "moe_dispatch[te]" (or transformer-engine[pytorch])'
DEEP_EP_INSTALL_HINT = ("run `bash install_hybridep.sh` from the moe_dispatch repository root "
                        "(`--help` lists its options)")
TRITON_INSTALL_HINT = "pip install triton (it ships with CUDA builds of torch)"
CUDA_EXTENSION_INSTALL_HINT = ("build it from the moe_dispatch repository root on a machine with a CUDA torch and nvcc: "
                               "MOE_DISPATCH_BUILD_CUDA=1 pip install --no-build-isolation -e .")

# The values Triton itself reads as "on" (triton.knobs env_bool); one meaning everywhere.
_TRUE = ("1", "true", "yes", "on")


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on CPU (its interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def _import(name: str, message: str) -> ModuleType:
    """``name`` imported, or ``ImportError(message with the failure)``."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(message.format(exc=exc)) from exc


def import_transformer_engine() -> ModuleType:
    """``transformer_engine.pytorch``. Raises ``ImportError`` with how to install it."""
    return _import("transformer_engine.pytorch",
                   f"this feature needs TransformerEngine: {TE_INSTALL_HINT}; import failed: {{exc}}")


def import_deep_ep() -> ModuleType:
    """``deep_ep``. Raises ``ImportError`` saying to run ``install_hybridep.sh``."""
    return _import("deep_ep", "FusedTokenRouter needs DeepEP (the `deep_ep` package), which failed to import: {exc}. "
                              f"To build and install it for this machine, {DEEP_EP_INSTALL_HINT}.")


def import_triton() -> ModuleType:
    """``triton``. Raises ``ImportError`` with how to install it."""
    return _import("triton", f"triton is not importable: {TRITON_INSTALL_HINT} ({{exc}})")


def import_triton_kernels(name: str) -> ModuleType:
    """``moe_dispatch.kernels.<name>`` (a module of Triton kernels), imported lazily.

    Raises:
        ImportError: triton is not importable (with how to install it).
    """
    import_triton()
    return importlib.import_module(f"moe_dispatch.kernels.{name}")


def import_cuda_extension() -> ModuleType:
    """``moe_dispatch._C``, the optional C++/CUDA extension built from ``csrc/``. Raises
    ``ImportError`` saying how to build it."""
    return _import("moe_dispatch._C", f"the moe_dispatch CUDA extension is not built: {CUDA_EXTENSION_INSTALL_HINT} "
                                      "(import failed: {exc})")
