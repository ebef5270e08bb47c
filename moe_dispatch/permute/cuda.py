"""CUDA backend: the C++/CUDA kernels of ``csrc/permute.cu`` (the optional ``moe_dispatch._C``
extension), for the eager path where host time decides.

One call from Python allocates the outputs and queues every kernel of the op from C++ (a
counting sort in two launches, one with a single sort chunk, then the row copy), so a permute
costs a few launches of host time instead of the tens of microseconds of Python around Triton
launches. Same ``row_id_map`` format and the same rows, bit for bit, as
:mod:`moe_dispatch.permute.reference`; ``unpermute`` accumulates in fp32 like every backend.

Build: ``MOE_DISPATCH_BUILD_CUDA=1 pip install --no-build-isolation -e .`` on a machine with a
CUDA torch and nvcc. Inputs the kernels do not take (fp64 rows, more than 8192 experts, top-k
above 4096) go through the torch reference. ``torch.compile`` cannot trace into the extension and breaks the
graph at its calls (no decorator here: one would cost host time on every eager call); the
``triton`` backend is the one to compile.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._optional import import_cuda_extension
from . import reference
from ._eager import EagerOps

__all__ = ["is_available", "why_unavailable", "permute", "permute_counted", "unpermute", "permute_by_map"]

_MAX_EXPERTS, _MAX_TOPK = 8192, 4096


def _ext():
    return import_cuda_extension()


def why_unavailable(device: torch.device) -> str:
    """Why the backend cannot run on ``device``, or "" when it can."""
    if torch.device(device).type != "cuda":
        return "the cuda backend runs on CUDA devices only"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        _ext()
    except ImportError as exc:
        return str(exc)
    return ""


def is_available(device: torch.device) -> bool:
    """True on CUDA when the extension is built."""
    return not why_unavailable(device)


class _Kernels:
    """The extension's ops in the kernel-set shape of :mod:`._eager`."""

    def __init__(self, ext) -> None:
        self._permute, self._unpermute, self._scatter = ext.permute, ext.unpermute, ext.scatter_rows

    def permute_counted(self, tokens, selected_experts, num_experts, probs, align_size, num_out_rows):
        return self._permute(tokens, selected_experts, num_experts, probs, align_size,
                             -1 if num_out_rows is None else num_out_rows)

    def permute(self, tokens, selected_experts, num_experts, probs, align_size, num_out_rows):
        return self.permute_counted(tokens, selected_experts, num_experts, probs, align_size, num_out_rows)[:3]

    def unpermute(self, permuted, row_id_map, merging_probs):
        return self._unpermute(permuted, row_id_map, merging_probs)

    def unpermute_backward(self, grad_out, permuted, row_id_map, merging_probs, probs_grad):
        return self._scatter(grad_out, permuted, permuted.shape[0], row_id_map, merging_probs, probs_grad)

    def permute_by_map(self, tokens, row_id_map, num_rows):
        return self._scatter(tokens, None, num_rows, row_id_map, None, False)[0]


_OPS = EagerOps(lambda: _Kernels(_ext()))


def _kernels_take(rows: torch.Tensor, num_experts: int = 1, topk: int = 1) -> bool:
    """What the kernels take: fp32 / fp16 / bf16 rows (fp64 goes through the reference, which
    accumulates in fp64), at most 8192 experts and top-k 4096 (their shared-memory tables)."""
    return rows.dtype != torch.float64 and num_experts <= _MAX_EXPERTS and topk <= _MAX_TOPK


# --- backend interface (see moe_dispatch.permute) ---------------------------------------------
def permute_counted(
    tokens: torch.Tensor,
    selected_experts: torch.Tensor,
    num_experts: int,
    probs: Optional[torch.Tensor],
    align_size: int,
    num_out_rows: Optional[int],
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(permuted [M, H], permuted_probs [M] or None, row_id_map int64 [N, K], tokens_per_expert
    int64 [E])``: see :func:`moe_dispatch.permute.permute`; ``tokens_per_expert`` are the rows of
    each expert's group that fit in the output, from the sort's own counts (no extra kernel). No
    host sync when ``num_out_rows`` is given."""
    if not _kernels_take(tokens, num_experts, selected_experts.shape[1]):
        return reference.permute_counted(tokens, selected_experts, num_experts, probs, align_size, num_out_rows)
    return _OPS.permute_counted(tokens, selected_experts, num_experts, probs, align_size, num_out_rows)


def permute(*args) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """:func:`permute_counted` (same arguments) without ``tokens_per_expert``: the kernels count
    anyway, so one path serves both."""
    return permute_counted(*args)[:3]


def unpermute(permuted: torch.Tensor, row_id_map: torch.Tensor, merging_probs: Optional[torch.Tensor]) -> torch.Tensor:
    """``[N, H]`` in permuted's dtype: ``sum_k merging_probs[n, k] * permuted[row_id_map[n, k]]``
    in fp32; see :func:`moe_dispatch.permute.unpermute`."""
    if not _kernels_take(permuted):
        return reference.unpermute(permuted, row_id_map, merging_probs)
    return _OPS.unpermute(permuted, row_id_map, merging_probs)


def permute_by_map(tokens: torch.Tensor, row_id_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[num_rows, H]``: ``out[row_id_map[n, k]] = tokens[n]``, zero rows elsewhere; each row used
    at most once. Differentiable w.r.t. ``tokens``. No host sync."""
    if not _kernels_take(tokens):
        return reference.permute_by_map(tokens, row_id_map, num_rows)
    return _OPS.permute_by_map(tokens, row_id_map, num_rows)
