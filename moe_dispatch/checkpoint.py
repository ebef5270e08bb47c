"""Checkpoints of expert-parallel models (any model :mod:`moe_dispatch.parallel` handles).

Two kinds:

- **Training checkpoints** (:func:`save_ep_checkpoint` / :func:`load_ep_checkpoint`):
  ``torch.distributed.checkpoint`` (DCP) of the DTensor state dict, every rank writing its own
  experts (and FSDP shards) in parallel; dense, replicated tensors are written once. DCP stores
  global shapes, so a checkpoint loads at another EP size / FSDP layout too (resharding).
  Equivalent by hand: ``dcp.save({"model": model.state_dict()}, checkpoint_id=path)``, and
  ``sd = {"model": model.state_dict()}; dcp.load(sd, checkpoint_id=path);
  model.load_state_dict(sd["model"])``.
- **The final model** (:func:`save_final_model_ep`): all experts gathered, one
  ``model.safetensors`` + ``config.json`` with ``expert_parallel_size=1`` that the model's
  ``from_pretrained`` loads on one process (e.g. ``NVMixtralForCausalLM``, then
  ``convert_mixtral_te_to_hf`` gives an HF ``MixtralForCausalLM``).
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn

from .parallel import full_state_dict

__all__ = ["save_ep_checkpoint", "load_ep_checkpoint", "save_final_model_ep"]


def _state_dict_api():
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    return get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict


def save_ep_checkpoint(model: nn.Module, checkpoint_dir: str | os.PathLike,
                       optimizer: torch.optim.Optimizer | None = None) -> None:
    """DCP-save ``{"model": ..., "optimizer": ...}`` (DTensor state dicts) to ``checkpoint_dir``.

    A collective: call on every rank (EP and FSDP alike), after :meth:`set_ep_groups` (and
    ``fully_shard``, if used). ``checkpoint_dir`` must be the same path on every rank, on a
    filesystem all ranks see.
    """
    import torch.distributed.checkpoint as dcp

    get_model_sd, get_optim_sd, _, _ = _state_dict_api()
    state = {"model": get_model_sd(model)}
    if optimizer is not None:
        state["optimizer"] = get_optim_sd(model, optimizer)
    dcp.save(state, checkpoint_id=os.fspath(checkpoint_dir))


def load_ep_checkpoint(model: nn.Module, checkpoint_dir: str | os.PathLike,
                       optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a :func:`save_ep_checkpoint` checkpoint in place (every rank reads only its shards).

    ``model`` must be set up as for saving (:meth:`set_ep_groups`, ``fully_shard``); its EP size
    and FSDP layout may differ from the saved ones. With ``optimizer``, the checkpoint must hold
    optimizer state.
    """
    import torch.distributed.checkpoint as dcp

    get_model_sd, get_optim_sd, set_model_sd, set_optim_sd = _state_dict_api()
    state = {"model": get_model_sd(model)}
    if optimizer is not None:
        state["optimizer"] = get_optim_sd(model, optimizer)
    dcp.load(state, checkpoint_id=os.fspath(checkpoint_dir))
    set_model_sd(model, state["model"])
    if optimizer is not None:
        set_optim_sd(model, optimizer, state["optimizer"])


def _model_class_name(model: nn.Module) -> str:
    """The model's own class name (``NVMixtralForCausalLM``, ...), also when FSDP2 wrapped the
    class (``fully_shard`` makes a subclass defined in ``torch.distributed``)."""
    for cls in type(model).__mro__:
        if not cls.__module__.startswith("torch."):
            return cls.__name__
    raise TypeError(f"save_final_model_ep needs a model class of its own, got {type(model).__name__}")


def save_final_model_ep(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Gather every expert and write an EP=1 HF-style checkpoint (rank 0 writes, all ranks wait).

    Call on **all** ranks (the gather is a collective over the EP group and any FSDP mesh).
    Global rank 0 writes ``save_directory/model.safetensors`` (one file; tied ``lm_head`` and TE
    ``_extra_state`` entries left out) and ``config.json`` (``expert_parallel_size=1``, the
    model's dtype); the other ranks wait at a barrier of the default group until it is written.
    The result loads with the model's ``from_pretrained(save_directory)`` on one process (EP=1),
    or at EP=P by building the model and :func:`~moe_dispatch.parallel.load_full_state_dict`.
    ``model`` needs a transformers-style ``config`` with an ``expert_parallel_size`` field.

    Rank 0 needs host memory for the whole model.
    """
    from safetensors.torch import save_file

    class_name = _model_class_name(model)
    tensors = full_state_dict(model, rank0_only=True, cpu=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        config = copy.deepcopy(model.config)
        config.expert_parallel_size = 1
        config.architectures = [class_name]
        tensors = {k: v.contiguous() for k, v in tensors.items()
                   if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        if getattr(config, "tie_word_embeddings", False):
            tensors.pop("lm_head.weight", None)  # tied to the embeddings: saved once
        embed = next((v for k, v in tensors.items() if k.endswith("embed_tokens.weight")), None)
        if embed is not None:
            config.dtype = embed.dtype
        os.makedirs(save_directory, exist_ok=True)
        save_file(tensors, os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(save_directory)
    if dist.is_initialized():
        dist.barrier()
