"""Checkpoints of expert-parallel NVMixtral models: the model-independent
:mod:`moe_dispatch.checkpoint`, re-exported under the names this module always had."""
from moe_dispatch.checkpoint import load_ep_checkpoint, save_ep_checkpoint, save_final_model_ep

__all__ = ["save_ep_checkpoint", "load_ep_checkpoint", "save_final_model_ep"]
