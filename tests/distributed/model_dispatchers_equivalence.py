"""torchrun script: the EP Mixtral model gives the same logits, loss and gradients with every
dispatcher the library has (AllToAll on NCCL, NVLink, DeepEP's FusedTokenRouter when installed).

    torchrun --standalone --nproc-per-node 2 tests/distributed/model_dispatchers_equivalence.py
    torchrun --standalone --nproc-per-node 2 tests/distributed/model_dispatchers_equivalence.py --backend=gloo  # CPU dry run

Same weights (one EP=1 state dict loaded slice by slice), same per-rank batches, bf16; each
dispatcher is compared with AllToAllTokenDispatcher: relative error ``||a-b|| / ||b|| < 1e-2``
for logits, loss and every gradient (expert gradients gathered with ``full_tensor()``), on a
one-layer model. With more layers the comparison is reported, not asserted: NVLink and DeepEP
send bf16 partial sums (one extra rounding), so a later layer's router input differs by an ulp
and near-tie top-k choices can flip, changing which expert a token sees (the count of tokens
whose routing differs is printed).
Rank 0 prints one PASS/FAIL/SKIP line per dispatcher and a summary; exit code 1 on failure.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from moe_dispatch import AllToAllTokenDispatcher, FusedTokenRouter, NVLinkTokenDispatcher  # noqa: E402
from moe_dispatch.models.mixtral import NVMixtralConfig, NVMixtralForCausalLM, load_full_state_dict  # noqa: E402
from tests.distributed.mixtral_ep_equivalence import (  # noqa: E402
    SAFE_ENV, gpu_fields, make_batch, reference_model, weights,
)

DISPATCHERS = {
    "all_to_all": lambda E, L, H, P: AllToAllTokenDispatcher(E, L, H, P),
    "nvlink": lambda E, L, H, P: NVLinkTokenDispatcher(E, L, H, P),
    "deepep": lambda E, L, H, P: FusedTokenRouter(E, L, H, P),
}


def run(name, fields, full_state, ids, labels, mesh, device):
    world = mesh.size()
    E, H = fields["num_local_experts"], fields["hidden_size"]
    dispatcher = DISPATCHERS[name](E, E // world, H, world)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = NVMixtralForCausalLM(NVMixtralConfig(**fields, expert_parallel_size=world), dispatcher=dispatcher)
    finally:
        torch.set_default_dtype(previous)
    model.set_ep_groups(ep_mesh=mesh)
    load_full_state_dict(model, full_state)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float()
             for n, p in model.named_parameters() if p.grad is not None}
    result = {"logits": out.logits.detach().float(), "loss": out.loss.detach().float().view(1), **grads}
    from moe_dispatch.models.mixtral import gather_tokens_per_expert
    result["_tokens_per_expert"] = gather_tokens_per_expert(model).float()
    close = getattr(dispatcher, "close", None)
    if close:
        close()
    return result


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def main() -> int:
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    on_gpu = "--backend=gloo" not in sys.argv  # gloo: a CPU dry run of the script (NVLink and DeepEP skip)
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl", timeout=timedelta(seconds=300), device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))
    failures = 0
    for layers in (1, 2):
        failures += compare_all(layers, rank, world, mesh, device, on_gpu)
    if rank == 0:
        print(f"model_dispatchers_equivalence: {'FAIL' if failures else 'PASS'}", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


def compare_all(layers, rank, world, mesh, device, on_gpu) -> int:
    fields = gpu_fields(world, num_hidden_layers=layers)
    full_state = weights(reference_model(fields, seed=0, device=device, dtype=torch.bfloat16).state_dict())
    ids, labels = make_batch(world, 2, 64, fields["vocab_size"], seed=1, device=device)
    ids, labels = ids[rank * 2:(rank + 1) * 2], labels[rank * 2:(rank + 1) * 2]

    base = run("all_to_all", fields, full_state, ids, labels, mesh, device)
    failures = 0
    for name in ("all_to_all", "nvlink", "deepep"):  # all_to_all again: the noise floor (expect 0)
        try:
            got = run(name, fields, full_state, ids, labels, mesh, device)
        except (ImportError, ValueError, RuntimeError) as exc:
            if on_gpu and not isinstance(exc, ImportError):
                raise
            if rank == 0:
                print(f"SKIP model ep={world} dispatcher={name}: {str(exc).splitlines()[0]}", flush=True)
            continue
        keys = [k for k in base if not k.startswith("_")]
        errors = torch.tensor([rel(got[k], base[k]) for k in keys], device=device)
        flipped = (got["_tokens_per_expert"] - base["_tokens_per_expert"]).abs().sum().view(1)
        missing = torch.tensor([float(set(got) != set(base))], device=device)
        for t in (errors, flipped, missing):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        ok = errors.max().item() < 1e-2 and missing.item() == 0
        asserted = layers == 1
        failures += asserted and not ok
        if rank == 0:
            top = sorted(zip(errors.tolist(), keys), reverse=True)[:3]
            verdict = ("PASS" if ok else "FAIL") if asserted else "INFO"
            print(f"{verdict} model layers={layers} ep={world} dispatcher={name} vs all_to_all: logits, loss and "
                  f"{len(keys) - 2} gradients, worst relative error {errors.max().item():.2e} "
                  f"({', '.join(f'{k} {e:.1e}' for e, k in top)}); expert-count differences {flipped.item():.0f}",
                  flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
