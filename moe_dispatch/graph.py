"""Capture a whole MoE layer -- route, dispatch, experts, combine (and backward) -- in CUDA graphs.

Needs a dispatcher in capacity mode (``dropless=False``: no host sync anywhere, so every launch
of a step can be recorded) and experts without host syncs (``grouped_mm``). A replay costs one
graph launch instead of the layer's hundreds of kernel launches. Recipe::

    dispatcher = AllToAllTokenDispatcher(E, L, H, max_tokens_per_rank=N, dropless=False)
    layer = MoELayer(TopKRouter(H, E, K), SwiGLUExperts(L, H, I, backend="grouped_mm"), dispatcher).cuda()
    graphed = capture_moe_layer(layer, x_sample)     # x_sample: [N, H], same shape every step
    out = graphed(x)                                 # MoEOutput, replayed
    out.hidden_states.sum().backward()               # backward replayed too (training)

With gradients (the layer has trainable parameters and grad mode is on) the capture is
``torch.cuda.make_graphed_callables``: forward and backward are two graphs behind one autograd
node. Without gradients (``torch.no_grad()`` or frozen parameters) one forward graph; its
outputs are static tensors, overwritten by the next replay (clone them to keep them).
Limits: fixed input shape; ``layer.last_tokens_per_expert`` is the captured tensor (updated in
place by each replay); the layer's parameters must not be replaced (in-place updates such as
optimizer steps are fine).
"""
from __future__ import annotations

from typing import Callable

import torch

from .moe import MoELayer, MoEOutput

__all__ = ["capture_moe_layer", "capture"]


def capture(fn: Callable[[], object], *, warmup_iters: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm ``fn()`` up on a side stream (kernels compile, caches fill; as ``torch.cuda.graph``
    advises), then record one call in a CUDA graph on the current device.

    Returns:
        ``(graph, static_output)``: ``graph.replay()`` reruns the recorded work, writing into
        ``static_output`` (and into whatever else ``fn`` wrote, e.g. gradients).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_iters):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def capture_moe_layer(layer: MoELayer, sample_input: torch.Tensor, *, warmup_iters: int = 3) -> Callable[[torch.Tensor], MoEOutput]:
    """Record ``layer``'s forward (and backward when it trains) in CUDA graphs.

    Args:
        layer: a :class:`~moe_dispatch.MoELayer` on CUDA whose dispatcher runs in capacity mode.
        sample_input: ``[..., H]`` CUDA tensor with the shape (and dtype) of every later input.
        warmup_iters: eager iterations before the capture (compiles kernels, fills caches).

    Returns:
        ``fn(hidden_states) -> MoEOutput`` replaying the graph(s).

    Raises:
        TypeError: ``layer`` is not a MoELayer. ValueError: not on CUDA, or a dispatcher that
        syncs with the host (``dropless`` not False).
    """
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a moe_dispatch.MoELayer, got {type(layer).__name__}")
    if not isinstance(sample_input, torch.Tensor) or not sample_input.is_cuda:
        raise ValueError("sample_input must be a CUDA tensor: CUDA graphs record GPU work")
    if getattr(layer.dispatcher, "dropless", True) is not False:
        raise ValueError(f"capture_moe_layer needs a dispatcher in capacity mode (dropless=False, "
                         f"max_tokens_per_rank=...), got {layer.dispatcher!r}")
    trains = torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters())
    if trains:
        # (unused-input tolerant: e.g. a router whose gradient does not reach some parameter)
        graphed = torch.cuda.make_graphed_callables(_TensorOutputs(layer), (sample_input,), num_warmup_iters=warmup_iters,
                                                    allow_unused_input=True)
        return lambda x: MoEOutput(*graphed(x))
    return _capture_forward(layer, sample_input, warmup_iters)


class _TensorOutputs(torch.nn.Module):
    """The layer with a plain tuple ``(hidden_states, aux_loss)`` as output: what
    ``make_graphed_callables`` can flatten, whatever class ``MoEOutput`` is."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.layer(x)
        return out.hidden_states, out.aux_loss


def _capture_forward(layer: MoELayer, sample_input: torch.Tensor, warmup_iters: int) -> Callable[[torch.Tensor], MoEOutput]:
    static_in = sample_input.detach().clone()
    with torch.cuda.device(static_in.device):
        graph, static_out = capture(lambda: layer(static_in), warmup_iters=warmup_iters)

    def replay(x: torch.Tensor) -> MoEOutput:
        if x.shape != static_in.shape or x.dtype != static_in.dtype:
            raise ValueError(f"hidden_states must be {tuple(static_in.shape)} {static_in.dtype} as captured, "
                             f"got {tuple(x.shape)} {x.dtype}")
        static_in.copy_(x)
        graph.replay()
        return static_out

    return replay
