"""Expert parallelism (EP) for any model built of :class:`~moe_dispatch.MoELayer` s: DTensor expert
weights, the gradient convention, loading full state dicts, token-load monitoring.

What a model needs (NVMixtral and NVQwen3Moe do exactly this)::

    # in __init__, with P = expert_parallel_size and E global experts; each MoELayer holds a
    # SwiGLUExperts of E // P experts and a TopKRouter over all E
    attach_ep_state(self, num_experts=E, ep_size=P)
    # and a method binding it, called on every rank after .to(device)
    def set_ep_groups(self, ep_group=None, ep_mesh=None, *, router_group=None):
        set_ep_groups(self, ep_group, ep_mesh, router_group=router_group)

Everything below finds the model's MoE pieces by type (``MoELayer``, ``SwiGLUExperts``,
``TopKRouter``) and its :class:`EPState` by the ``ep_state`` attribute, so it works on any
module tree: dense layers among MoE layers, wrappers, FSDP2-wrapped classes.

Shape legend (as in :mod:`moe_dispatch.protocol`)::

    E  experts, global     P  EP size (ranks of the EP group)     L = E // P  experts per EP rank
    I  expert FFN size     H  hidden size                         NL  decoder layers

Layout. Rank ``r`` of the EP group owns global experts ``[r * L, (r + 1) * L)``. After
:func:`set_ep_groups` each layer's stacked expert weights are DTensor parameters on the 1-D EP
mesh with placement ``Shard(0)``: global shapes ``[E, 2I, H]`` / ``[E, H, I]``, local shards
``[L, 2I, H]`` / ``[L, H, I]``. The experts compute on the local shard (``to_local()``), so the
grouped GEMMs see plain tensors and the gradients come back as ``Shard(0)`` DTensors. Everything
else (embeddings, attention, norms, router gates, ``lm_head``) stays a plain, replicated tensor.

Gradient convention (EP is carved out of data parallelism)
----------------------------------------------------------
Every rank processes *different* tokens. The reference is one unsharded model run on the
concatenation of all data-parallel ranks' batches, with the per-rank losses averaged
(``loss = mean_r loss_r``: the usual DP convention). After ``loss_r.backward()`` on every rank:

- an expert weight receives contributions from the tokens of *every* rank of its EP group (the
  dispatcher's backward sends them to the owner), so its grad is ``sum_{r in EP group} dloss_r/dW``;
- a dense weight sees only local tokens: ``dloss_r/dW``;
- with an aux loss, the router statistics are summed over ``router_group`` (default: the EP
  group) by an all-reduce whose backward *sums* gradients over that group; averaging the router
  gradient over the same ranks then gives exactly the gradient of the loss of the union batch.

:func:`finalize_ep_gradients` (call it once after the last backward of a step, before clipping and
``optimizer.step()``) turns both into the reference: expert grads ``/= P``, dense grads
all-reduce-mean over the EP group. With FSDP2 on the ``"dp"`` dimension of a ``(dp, ep)`` mesh,
FSDP's reduce-scatter already averages every gradient over ``dp``; the EP step then completes the
mean over all ``dp * P`` data-parallel ranks (each EP rank holds the same FSDP shard index of a
dense weight, so all-reducing the local shards over the EP group is exact).

The alternative FSDP2 layout (torchtitan's): ``fully_shard(layer.mlp.experts, mesh=mesh["dp"])``
and every other module on the flattened ``(dp, ep)`` mesh, so dense weights are not replicated
per EP rank and FSDP averages dense grads over all ``dp * P`` ranks itself; then call
``finalize_ep_gradients(model, reduce_dense=False)``. Both layouts are tested.

"Mean of per-rank losses" equals the loss of the concatenated batch when every rank has the same
number of label tokens; otherwise weight by tokens as in plain data parallelism (each rank's loss
= its summed token loss * number of DP ranks / global token count, e.g. ``num_items_in_batch``).

Why an explicit call rather than gradient hooks: under gradient accumulation hooks would
all-reduce once per micro-batch instead of once per step; under FSDP2 parameter hooks fire on the
*unsharded* gradients before FSDP's reduce-scatter, so the EP all-reduce would move ``dp`` times
more data than on the sharded gradients after it; and one explicit step is what Megatron does too
(``finalize_model_grads``). Its cost: one all-reduce of the dense gradients over the EP group per
step (bucketed), plus a local scale of the expert gradients. Then clip with
:func:`clip_grad_norm_ep_` (``torch.nn.utils.clip_grad_norm_`` rejects the mix of plain and
DTensor gradients on different meshes).

Monitoring: each MoE block's ``last_tokens_per_expert`` (int64 ``[L]``) is the load of its local
experts in the last forward, summed over the EP group's tokens; :func:`gather_tokens_per_expert`
assembles ``[NL, E]`` for the whole model.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .experts import SwiGLUExperts
from .moe import MoELayer

__all__ = ["EPState", "EXPERT_WEIGHTS", "ep_state", "attach_ep_state", "set_ep_groups", "finalize_ep_gradients", "clip_grad_norm_ep_",
           "load_full_state_dict", "full_state_dict", "gather_tokens_per_expert", "expert_parameters",
           "ep_parameter_groups", "slice_full_expert_weights", "update_expert_biases"]

EXPERT_WEIGHTS = ("experts_gate_up_weight", "experts_down_weight")

# Dense gradients are all-reduced in flat buckets of at most this many elements.
_BUCKET_NUMEL = 1 << 25


@dataclass
class EPState:
    """How a model is split over its EP group (kept on the model's ``ep_state`` attribute,
    see :func:`attach_ep_state`).

    Attributes:
        num_experts: E, global.
        ep_size: P (``config.expert_parallel_size``).
        group: the EP ``ProcessGroup`` (None until :func:`set_ep_groups`, and always for P == 1).
        mesh: the 1-D EP ``DeviceMesh`` of the DTensor expert weights (None likewise).
        rank: this rank's index in the EP group (None until :func:`set_ep_groups`; 0 for P == 1).
    """

    num_experts: int
    ep_size: int
    group: Any = None
    mesh: Any = None
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.ep_size == 1:
            self.rank = 0

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def __deepcopy__(self, memo) -> "EPState":
        return copy.copy(self)  # process groups and meshes are shared, never copied


def _dtensor_api():
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    return DTensor, Shard, distribute_tensor


def _is_dtensor(t) -> bool:
    if not dist.is_available():
        return False
    return isinstance(t, _dtensor_api()[0])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def ep_state(model: nn.Module) -> EPState:
    """The :class:`EPState` of ``model`` (a module with an ``ep_state``, or any module containing one)."""
    for module in model.modules():
        state = getattr(module, "ep_state", None)
        if isinstance(state, EPState):
            return state
    raise TypeError(f"{type(model).__name__} holds no EP model (no module has an ep_state attribute: "
                    f"call moe_dispatch.parallel.attach_ep_state in the model's __init__)")


def attach_ep_state(model: nn.Module, num_experts: int, ep_size: int) -> EPState:
    """Make ``model`` an EP model: ``model.ep_state = EPState(num_experts, ep_size)`` and, for
    ``ep_size > 1``, the ``load_state_dict`` pre-hook :func:`slice_full_expert_weights` (a full
    EP=1 state dict then loads as this rank's experts). Call it in the model's ``__init__``.

    Raises:
        ValueError: ``num_experts`` not divisible by ``ep_size``.
    """
    if not isinstance(ep_size, int) or ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size must be a positive int dividing num_experts={num_experts}, got {ep_size!r}")
    model.ep_state = EPState(num_experts, ep_size)
    if ep_size > 1:
        model.register_load_state_dict_pre_hook(slice_full_expert_weights)
    return model.ep_state


def _experts_modules(model: nn.Module) -> Iterator[SwiGLUExperts]:
    return (m for m in model.modules() if isinstance(m, SwiGLUExperts))


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The stacked expert weights of every layer (DTensors after :func:`set_ep_groups`)."""
    return [getattr(m, name) for m in _experts_modules(model) for name in EXPERT_WEIGHTS]


def ep_parameter_groups(model: nn.Module) -> list[dict]:
    """``[{"params": dense}, {"params": experts}]``: parameter groups for a ``torch.optim`` optimizer.

    Without FSDP an EP model mixes plain parameters and DTensor expert weights, and torch's foreach
    and fused optimizer kernels (foreach is the default on CUDA) reject a group that mixes them
    ("got mixed torch.Tensor and DTensor"). Two homogeneous groups avoid that; add per-group
    options (weight decay, ...) to the dicts as needed. Under FSDP2 every parameter is a DTensor
    and any grouping works.
    """
    experts = expert_parameters(model)
    expert_ids = {id(p) for p in experts}
    return [{"params": [p for p in model.parameters() if id(p) not in expert_ids]}, {"params": experts}]


# --- binding ---------------------------------------------------------------------------------------
def _resolve_group_and_mesh(state: EPState, ep_group, ep_mesh, device_type: str):
    if ep_mesh is not None:
        if ep_mesh.ndim != 1:
            raise ValueError(f"ep_mesh must be 1-D (e.g. mesh['ep'] of a (dp, ep) mesh), "
                             f"got {ep_mesh.ndim}-D {ep_mesh}")
        if ep_group is None:
            ep_group = ep_mesh.get_group()
    size = 1 if ep_group is None else dist.get_world_size(ep_group)
    if size != state.ep_size:
        raise ValueError(f"the EP group has {size} rank(s) but config.expert_parallel_size={state.ep_size}: "
                         f"build the model with expert_parallel_size={size} or pass a group of {state.ep_size} ranks")
    if size == 1:
        return None, None
    if ep_mesh is None:
        from torch.distributed.device_mesh import DeviceMesh

        if device_type == "meta":  # built on the meta device: the mesh follows the backend
            device_type = "cuda" if dist.get_backend(ep_group) == "nccl" else "cpu"
        ep_mesh = DeviceMesh.from_group(ep_group, device_type)
    group_ranks = dist.get_process_group_ranks(ep_group)
    mesh_ranks = ep_mesh.mesh.tolist()
    if group_ranks != mesh_ranks or ep_mesh.get_local_rank() != dist.get_rank(ep_group):
        raise ValueError(f"ep_group (ranks {group_ranks}) and ep_mesh (ranks {mesh_ranks}) must be the same ranks in "
                         f"the same order: pass ep_mesh=mesh['ep'] and ep_group=mesh['ep'].get_group() (or omit it)")
    if device_type != "meta" and ep_mesh.device_type != device_type:
        raise ValueError(f"the model's parameters are on {device_type!r} but ep_mesh is a {ep_mesh.device_type!r} "
                         f"mesh: move the model to the mesh's device before set_ep_groups")
    return ep_group, ep_mesh


def _model_device_type(model: nn.Module) -> str:
    """Device type of the expert weights (``"meta"`` for a model built on the meta device)."""
    for p in expert_parameters(model):
        return p.device.type if not _is_dtensor(p) else p.device_mesh.device_type
    return "cpu"


def _wrap_expert_weights(model: nn.Module, state: EPState, ep_mesh) -> None:
    DTensor, Shard, _ = _dtensor_api()
    mesh_name = (ep_mesh.mesh_dim_names or (None,))[0]
    for experts in _experts_modules(model):
        for name in EXPERT_WEIGHTS:
            param = getattr(experts, name)
            if isinstance(param, DTensor):
                if param.device_mesh == ep_mesh and tuple(param.placements) == (Shard(0),):
                    continue  # set_ep_groups called again with the same mesh
                names = param.device_mesh.mesh_dim_names or ()
                if mesh_name is not None and mesh_name in names and param.device_mesh.ndim > 1:
                    continue  # FSDP2 already sharded it further on a mesh that contains ours
                raise ValueError(f"{name} is already a DTensor on {param.device_mesh} {param.placements}; "
                                 f"call set_ep_groups with that mesh, once, before fully_shard")
            if param.shape[0] != state.num_local_experts:
                raise ValueError(f"{name} holds {param.shape[0]} experts but this EP rank should hold "
                                 f"E // P = {state.num_experts} // {state.ep_size} = {state.num_local_experts}")
            local = DTensor.from_local(param.detach(), ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, nn.Parameter(local, requires_grad=param.requires_grad))


def set_ep_groups(model: nn.Module, ep_group=None, ep_mesh=None, *, router_group=None) -> None:
    """Bind ``model`` to its EP group: dispatcher, routers, DTensor expert weights.

    Call it on every rank after moving the model to its device and before building the optimizer
    or applying ``fully_shard`` (it replaces the expert ``Parameter`` objects). Calling it again
    with the same group is harmless. Without FSDP, build the optimizer on
    :func:`ep_parameter_groups` (foreach / fused kernels reject groups mixing plain and DTensor
    parameters).

    Args:
        model: a module holding an :class:`EPState` for P ranks (:func:`attach_ep_state`),
            e.g. ``NVMixtralForCausalLM`` built with ``expert_parallel_size == P``.
        ep_group: the EP ``ProcessGroup`` (P ranks); default ``ep_mesh.get_group()``.
        ep_mesh: the 1-D EP ``DeviceMesh`` (e.g. ``init_device_mesh(dev, (dp, ep),
            mesh_dim_names=("dp", "ep"))["ep"]``); default ``DeviceMesh.from_group(ep_group)``.
            Group and mesh must hold the same ranks in the same order.
        router_group: the ranks the routers' load-balancing statistics are summed over; default
            the EP group (the loss of each EP group's union batch). Pass the whole data-parallel
            group (e.g. ``mesh["dp", "ep"]._flatten().get_group()`` or the world) to balance
            over the global batch; the gradient convention holds either way.

    With P == 1 both groups may be None (nothing is sharded; the routers get ``router_group``).

    Raises:
        ValueError: group size != ``config.expert_parallel_size``, group and mesh disagree, the
            mesh is on another device type than the model, or the expert weights already are
            DTensors on another mesh.
    """
    state = ep_state(model)
    ep_group, ep_mesh = _resolve_group_and_mesh(state, ep_group, ep_mesh, _model_device_type(model))
    dispatchers = {id(m.dispatcher): m.dispatcher for m in model.modules() if isinstance(m, MoELayer)}
    for dispatcher in dispatchers.values():
        dispatcher.set_ep_group(ep_group)
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        if hasattr(layer.router, "set_ep_group"):  # TopKRouter; a router without one keeps local statistics
            layer.router.set_ep_group(router_group if router_group is not None else ep_group)
    if ep_group is not None:
        _wrap_expert_weights(model, state, ep_mesh)
        state.rank = dist.get_rank(ep_group)
    state.group, state.mesh = ep_group, ep_mesh


# --- gradients -------------------------------------------------------------------------------------
def _all_reduce_mean_(tensors: list[torch.Tensor], group) -> None:
    """In-place mean of ``tensors`` over ``group``; one flat all-reduce per bucket of same-dtype tensors."""
    size = dist.get_world_size(group)
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    filled: dict[tuple, int] = {}
    for t in tensors:
        key = (t.dtype, t.device)
        runs = buckets.setdefault(key, [[]])
        if runs[-1] and filled[key] + t.numel() > _BUCKET_NUMEL:
            runs.append([])
            filled[key] = 0
        runs[-1].append(t)
        filled[key] = filled.get(key, 0) + t.numel()
    for runs in buckets.values():
        for run in runs:
            flat = torch.cat([t.reshape(-1) for t in run])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)  # gloo has no AVG
            flat.div_(size)
            for t, chunk in zip(run, flat.split([t.numel() for t in run])):
                t.copy_(chunk.view_as(t))


@torch.no_grad()
def finalize_ep_gradients(model: nn.Module, *, reduce_dense: bool = True) -> None:
    """Make EP gradients equal the data-parallel-mean reference (see the module docstring).

    Call once per optimizer step on every rank, after the last ``backward`` (and after FSDP's
    reduce-scatter, i.e. simply after ``loss.backward()`` returns), before gradient clipping and
    ``optimizer.step()``. Expert grads are divided by P; dense grads are averaged over the EP
    group (skipped with ``reduce_dense=False``: when the dense modules are sharded by FSDP over
    the flattened ``(dp, ep)`` mesh, FSDP already averages them over every data-parallel rank).
    A no-op for P == 1. Works on plain and DTensor (FSDP2-sharded) gradients.

    Raises:
        RuntimeError: P > 1 and :func:`set_ep_groups` was not called.
    """
    state = ep_state(model)
    if state.ep_size == 1:
        return
    if state.group is None:
        raise RuntimeError(f"expert_parallel_size={state.ep_size}: call set_ep_groups before finalize_ep_gradients")
    expert_ids = {id(p) for p in expert_parameters(model)}
    dense = []
    for param in model.parameters():
        if param.grad is None:
            continue
        grad = _local(param.grad)
        if id(param) in expert_ids:
            grad.div_(state.ep_size)
        elif reduce_dense:
            dense.append(grad)
    if dense:
        _all_reduce_mean_(dense, state.group)


@torch.no_grad()
def clip_grad_norm_ep_(model: nn.Module, max_norm: float, norm_type: float = 2.0,
                       error_if_nonfinite: bool = False) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for EP / FSDP2 models, whose gradients mix plain tensors
    and DTensors on different meshes (torch's version raises "got mixed torch.Tensor and DTensor").

    Call after :func:`finalize_ep_gradients`, on every rank. Each gradient's local ``|g|^p`` is
    summed, then all-reduced over the mesh dimensions where it is sharded (one all-reduce per
    distinct (mesh, sharded dims)); replicated dimensions are not summed.

    Returns:
        The total norm of the full gradients (fp32 scalar, the same on every rank), before clipping.
    """
    norm_type = float(norm_type)
    partial: dict[object, torch.Tensor] = {}
    grads = []
    for param in model.parameters():
        if param.grad is None:
            continue
        grad = param.grad
        grads.append(grad)
        key = None
        if _is_dtensor(grad):
            if any(p.is_partial() for p in grad.placements):
                raise ValueError(f"gradient with a Partial placement {grad.placements}: reduce it first")
            # sharded dims: Shard and FSDP's _StridedShard (not a Shard subclass in every torch version)
            key = (grad.device_mesh, tuple(d for d, p in enumerate(grad.placements) if not p.is_replicate()))
        local = torch.linalg.vector_norm(_local(grad), norm_type, dtype=torch.float32)
        value = local if norm_type == float("inf") else local.pow(norm_type)
        if key in partial:
            value = torch.maximum(partial[key], value) if norm_type == float("inf") else partial[key] + value
        partial[key] = value
    if not grads:
        return torch.zeros(())
    op = dist.ReduceOp.MAX if norm_type == float("inf") else dist.ReduceOp.SUM
    values = []
    for key, value in partial.items():
        if key is not None:
            mesh, dims = key
            for dim in dims:
                dist.all_reduce(value, op=op, group=mesh.get_group(dim))
        values.append(value)
    stacked = torch.stack(values)
    total = stacked.max() if norm_type == float("inf") else stacked.sum().pow(1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):  # host sync
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite: {total.item()}")
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        local = _local(grad)
        local.mul_(coef.to(local.device, local.dtype))
    return total


# --- full (EP=1) state dicts -----------------------------------------------------------------------
def _shard_full_expert_weight(full: torch.Tensor, param: torch.Tensor, state: EPState, key: str) -> torch.Tensor:
    """This rank's part of a full ``[E, ...]`` expert weight, in the form ``param`` has."""
    L = state.num_local_experts
    if _is_dtensor(param):
        DTensor, Shard, distribute_tensor = _dtensor_api()
        device = param.to_local().device
        if param.device_mesh == state.mesh and tuple(param.placements) == (Shard(0),):  # the EP mesh itself
            rank = param.device_mesh.get_local_rank()
            return DTensor.from_local(full[rank * L:(rank + 1) * L].to(device), param.device_mesh, [Shard(0)],
                                      run_check=False)
        # Sharded further (FSDP2 on top): scatter from rank 0 into whatever layout the parameter has.
        return distribute_tensor(full.to(device), param.device_mesh, param.placements)
    if state.rank is None:
        raise RuntimeError(f"{key}: the state dict holds all {state.num_experts} experts but this model holds the "
                           f"{L} of one EP rank and does not know which yet: call model.set_ep_groups(...) first, "
                           f"or load_full_state_dict(model, state_dict, ep_rank=r)")
    return full[state.rank * L:(state.rank + 1) * L]


def slice_full_expert_weights(model: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook of an EP model (installed by :func:`attach_ep_state` when
    P > 1): replaces every full ``[E, ...]`` expert weight in ``state_dict`` by this rank's slice,
    so an EP=1 / HF-converted state dict loads into an EP model with a plain ``load_state_dict``."""
    state = model.ep_state
    if state.ep_size == 1:
        return
    for module_name, experts in model.named_modules():
        if not isinstance(experts, SwiGLUExperts):
            continue
        for name in EXPERT_WEIGHTS:
            key = f"{prefix}{module_name}.{name}" if module_name else f"{prefix}{name}"
            value = state_dict.get(key)
            if not isinstance(value, torch.Tensor) or _is_dtensor(value) or value.dim() == 0:
                continue
            if value.shape[0] == state.num_experts:
                state_dict[key] = _shard_full_expert_weight(value, getattr(experts, name), state, key)


def load_full_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, ep_rank: int | None = None,
                         strict: bool = True):
    """Load a full (EP=1, e.g. HF-converted) state dict into an EP model: each rank keeps its experts.

    Every rank passes the same full state dict (plain tensors). Works

    - after :func:`set_ep_groups` (also plain ``model.load_state_dict(state_dict)`` works then:
      a pre-hook slices the experts, no communication);
    - after ``fully_shard`` too: every tensor whose parameter is a DTensor is first distributed to
      that parameter's layout (``distribute_tensor``, which scatters rank 0's copy);
    - before :func:`set_ep_groups` only with ``ep_rank`` (this rank's index in its EP group):
      the model does not know yet which experts it holds.

    Returns:
        ``load_state_dict``'s ``(missing_keys, unexpected_keys)``.

    Raises:
        RuntimeError: full expert weights, P > 1, neither ``set_ep_groups`` nor ``ep_rank``.
        ValueError: ``ep_rank`` out of range or different from the bound EP rank.
    """
    state = ep_state(model)
    state_dict = dict(state_dict)
    if ep_rank is not None:
        if not 0 <= ep_rank < state.ep_size:
            raise ValueError(f"ep_rank must be in [0, {state.ep_size}), got {ep_rank}")
        if state.rank is not None and state.rank != ep_rank:
            raise ValueError(f"ep_rank={ep_rank} but set_ep_groups bound this model to EP rank {state.rank}")
        L = state.num_local_experts
        for key, value in state_dict.items():
            if (key.rsplit(".", 1)[-1] in EXPERT_WEIGHTS and not _is_dtensor(value)
                    and value.shape[0] == state.num_experts and state.ep_size > 1):
                state_dict[key] = value[ep_rank * L:(ep_rank + 1) * L]
    targets = model.state_dict()  # sharded views, no communication
    for key, value in state_dict.items():
        target = targets.get(key)
        if target is None or not _is_dtensor(target) or _is_dtensor(value) or not isinstance(value, torch.Tensor):
            continue
        if key.rsplit(".", 1)[-1] in EXPERT_WEIGHTS and value.shape[0] == state.num_experts:
            state_dict[key] = _shard_full_expert_weight(value, target, state, key)
        else:  # a dense weight sharded by FSDP
            _, _, distribute_tensor = _dtensor_api()
            state_dict[key] = distribute_tensor(value.to(target.to_local().device), target.device_mesh,
                                                target.placements)
    return model.load_state_dict(state_dict, strict=strict)


def full_state_dict(model: nn.Module, *, rank0_only: bool = False, cpu: bool = True) -> dict[str, torch.Tensor]:
    """The EP=1 state dict of ``model``: every DTensor (EP experts, FSDP shards) gathered with
    ``full_tensor()``. A collective: call on every rank of the model's meshes.

    Args:
        rank0_only: ranks other than global rank 0 return ``{}`` (they still take part).
        cpu: move each gathered tensor to the CPU at once (bounds device memory to one tensor).
    """
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for key, value in model.state_dict().items():
        if _is_dtensor(value):
            value = value.full_tensor()
        if keep:
            out[key] = value.cpu() if cpu and isinstance(value, torch.Tensor) else value
    return out


# --- monitoring ------------------------------------------------------------------------------------
@torch.no_grad()
def gather_tokens_per_expert(model: nn.Module) -> torch.Tensor:
    """int64 ``[NL, E]``: rows each global expert received in the last forward, per layer.

    Each MoE block keeps ``last_tokens_per_expert`` (int64 ``[L]``, its local experts' load summed
    over the EP group's tokens); this all-gathers them over the EP group (a collective: call on
    every EP rank). The counts are of one EP group's batch; all-reduce over ``dp`` for the global
    batch. Returned on the device of the EP group's collectives (CPU without EP).

    Raises:
        RuntimeError: no forward has run yet.
    """
    state = ep_state(model)
    blocks = [m for m in model.modules() if isinstance(m, MoELayer)]
    if any(b.last_tokens_per_expert is None for b in blocks):
        raise RuntimeError("no MoE forward has run yet: last_tokens_per_expert is None")
    local_NL = torch.stack([b.last_tokens_per_expert for b in blocks])  # [NL, L]
    if state.group is None:
        return local_NL.cpu()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(state.group) == "nccl" else "cpu"
    parts = [torch.empty_like(local_NL, device=device) for _ in range(state.ep_size)]
    dist.all_gather(parts, local_NL.to(device), group=state.group)
    return torch.cat(parts, dim=1)  # [NL, P * L]: rank r's local experts are global r * L ... (r + 1) * L - 1


@torch.no_grad()
def update_expert_biases(model: nn.Module, update_rate: float = 1e-3) -> torch.Tensor:
    """Aux-loss-free balancing for a whole model: every MoE layer whose router has an
    ``expert_bias`` (``TopKRouter(expert_bias=True)``) takes one
    :meth:`~moe_dispatch.routing.TopKRouter.update_expert_bias` step from the load of its last
    forward (:func:`gather_tokens_per_expert`, so every EP rank applies the same update).

    A collective with EP: call on every EP rank, once per training step, after the forward.

    Returns:
        int64 ``[NL, E]``: the loads the updates used.
    """
    counts_NE = gather_tokens_per_expert(model)
    blocks = [m for m in model.modules() if isinstance(m, MoELayer)]
    for block, counts_E in zip(blocks, counts_NE):
        if getattr(block.router, "expert_bias", None) is not None:
            block.router.update_expert_bias(counts_E, update_rate)
    return counts_NE
