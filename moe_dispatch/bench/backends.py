"""The dispatchers the benchmark knows, by name, each built lazily so a missing optional
dependency only removes its row, and each able to say in a full sentence why it cannot run here."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from .._optional import triton_interpreting

__all__ = ["Backend", "BACKENDS", "DEFAULT", "why_skipped"]


@dataclass(frozen=True)
class Backend:
    """One benchmark row family.

    Attributes:
        make: ``(E, L, H, P, T) -> TokenDispatcher``, built inside each rank (``T``: tokens per
            rank of the row, which sizes a capacity-mode dispatcher).
        why_unavailable: ``device -> None`` when the backend can run on ``device``, else the reason
            as one or more full sentences (printed as is under the table).
        permute: for the all-to-all rows, the permute backend asked for (``"auto"`` included).
        dropless: False for capacity mode (fixed-size buffers, no host sync, CUDA-graph capturable).
    """

    make: Callable
    why_unavailable: Callable[[torch.device], str | None]
    permute: str | None = None
    dropless: bool = True


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def _all_to_all(permute_backend: str, *, dropless: bool = True) -> Backend:
    """Dropless, or capacity mode sized for the row's tokens per rank (no host sync: also timed
    replayed from a CUDA graph on GPU)."""
    def make(E, L, H, P, T):
        from moe_dispatch import AllToAllTokenDispatcher

        if dropless:
            return AllToAllTokenDispatcher(E, L, H, P, permute_backend=permute_backend)
        return AllToAllTokenDispatcher(E, L, H, P, permute_backend=permute_backend, max_tokens_per_rank=max(T, 1),
                                       dropless=False)

    def why_unavailable(device: torch.device) -> str | None:
        if permute_backend == "auto":
            return None
        if permute_backend == "triton" and device.type == "cpu" and not triton_interpreting():
            return ("The Triton permute kernels run on CUDA GPUs; on CPU they run only under Triton's "
                    "interpreter, so set TRITON_INTERPRET=1 in the environment to include this row "
                    "(the interpreter checks the kernels, it is far too slow to time them).")
        if permute_backend == "te" and device.type != "cuda":
            return "TransformerEngine's moe_permute runs on CUDA GPUs only, and this run has none."
        if permute_backend == "cuda" and device.type != "cuda":
            return ("The cuda permute backend is our C++/CUDA extension (csrc/), which runs on CUDA GPUs "
                    "only, and this run has none.")
        from moe_dispatch.permute import resolve_backend

        try:
            resolve_backend(permute_backend, device)
        except (ImportError, ValueError) as exc:
            return _sentence(str(exc))
        return None

    return Backend(make, why_unavailable, permute_backend, dropless)


def _nvlink_make(E, L, H, P, T):
    from moe_dispatch.dispatchers.nvlink import NVLinkTokenDispatcher

    return NVLinkTokenDispatcher(E, L, H, P)


def _nvlink_why(device: torch.device) -> str | None:
    if device.type != "cuda":
        return ("NVLinkTokenDispatcher moves tokens between CUDA GPUs that are NVLink (P2P) peers, "
                "through PyTorch symmetric memory; this run has no CUDA GPU.")
    return None


def _deepep_make(E, L, H, P, T):
    from moe_dispatch.dispatchers.deepep import FusedTokenRouter

    return FusedTokenRouter(E, L, H, P)


def _deepep_why(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "FusedTokenRouter runs DeepEP's CUDA kernels; this run has no CUDA GPU."
    if importlib.util.find_spec("deep_ep") is None:
        return ("FusedTokenRouter needs DeepEP (the deep_ep package), which is not installed: "
                "run `bash install_hybridep.sh` from the moe_dispatch repository root to build it.")
    return None


BACKENDS: dict[str, Backend] = {
    "all_to_all": _all_to_all("auto"),
    "all_to_all+torch": _all_to_all("torch"),
    "all_to_all+triton": _all_to_all("triton"),
    "all_to_all+cuda": _all_to_all("cuda"),
    "all_to_all+te": _all_to_all("te"),
    "all_to_all+capacity": _all_to_all("auto", dropless=False),
    "nvlink": Backend(_nvlink_make, _nvlink_why),
    "deepep": Backend(_deepep_make, _deepep_why),
}

# Every backend, on CPU and GPU alike: the ones that cannot run here are listed with why.
DEFAULT = list(BACKENDS)


def why_skipped(names: list[str], device: torch.device) -> dict[str, str]:
    """``{name: reason}`` for the backends of ``names`` that will not run on ``device``.

    ``all_to_all`` (permute ``"auto"``) is skipped as a duplicate when the concrete row it resolves
    to is in ``names`` too.
    """
    skipped = {}
    for name in names:
        why = BACKENDS[name].why_unavailable(device)
        if why is None and BACKENDS[name].permute == "auto" and BACKENDS[name].dropless:
            from moe_dispatch.permute import resolve_backend

            picked = resolve_backend("auto", device)
            if f"all_to_all+{picked}" in names:
                why = (f"On this machine permute_backend='auto' picks the {picked} permute backend, "
                       f"so this row would repeat the all_to_all+{picked} row.")
        if why is not None:
            skipped[name] = why
    return skipped
