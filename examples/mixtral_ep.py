# torchrun --nproc-per-node 2 examples/mixtral_ep.py   (gloo on CPU; NCCL and one GPU per rank on CUDA)
import os
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from moe_dispatch.models.mixtral import (NVMixtralConfig, NVMixtralForCausalLM, load_full_state_dict,
    finalize_ep_gradients, ep_parameter_groups, clip_grad_norm_ep_, save_ep_checkpoint, load_ep_checkpoint,
    save_final_model_ep)

cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl" if cuda else "gloo")
device = "cuda" if cuda else "cpu"
ep = dist.get_world_size()
dp = dist.get_world_size() // ep                     # here every rank is in one EP group: dp = 1
mesh = init_device_mesh(device, (dp, ep), mesh_dim_names=("dp", "ep"))

config = NVMixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, num_local_experts=8, num_experts_per_tok=2,
                         expert_backend="loop")
torch.manual_seed(0)                                 # the same full (EP=1) weights on every rank
full_sd = NVMixtralForCausalLM(config).state_dict()  # or a converted HF checkpoint's state dict

config.expert_parallel_size = ep                     # each rank allocates E // ep experts
model = NVMixtralForCausalLM(config).to(device)
model.model.set_ep_groups(ep_mesh=mesh["ep"])        # dispatcher + routers bound; experts -> DTensor Shard(0)
load_full_state_dict(model, full_sd)                 # EP=1 / HF-converted weights: each rank keeps its slice
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh["dp"])              # optional FSDP2 on the dp sub-mesh
fully_shard(model, mesh=mesh["dp"])
opt = torch.optim.AdamW(ep_parameter_groups(model), lr=3e-4)

torch.manual_seed(1 + dist.get_rank())               # EP is carved out of DP: every rank has its own tokens
ids = torch.randint(0, 128, (2, 16), device=device)
model(input_ids=ids, labels=ids).loss.backward()
finalize_ep_gradients(model)                         # expert grads /= ep, dense grads mean over EP
clip_grad_norm_ep_(model, 1.0); opt.step()

tmp = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
dist.broadcast_object_list(tmp)                      # one folder for every rank
save_ep_checkpoint(model, f"{tmp[0]}/ckpt", opt)     # torch.distributed.checkpoint; load_ep_checkpoint reshards
load_ep_checkpoint(model, f"{tmp[0]}/ckpt", opt)
save_final_model_ep(model, f"{tmp[0]}/final")        # all ranks; rank 0 writes one EP=1 safetensors + config
if dist.get_rank() == 0:
    print("EP example OK:", sorted(os.listdir(f"{tmp[0]}/final")))
dist.destroy_process_group()
