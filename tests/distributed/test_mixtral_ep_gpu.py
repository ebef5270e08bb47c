"""Launch the expert-parallel NVMixtral torchrun script on NCCL (skipped without 2+ GPUs).

With 4+ GPUs it runs on 4 ranks, which adds the FSDP2 (dp=2 x ep=2) checks.
"""
from __future__ import annotations

import pytest
import torch

from .test_gpu_scripts import run_torchrun


@pytest.mark.multi_gpu
def test_mixtral_ep_nccl_equivalence():
    nproc = 4 if torch.cuda.device_count() >= 4 else 2
    out = run_torchrun("tests/distributed/mixtral_ep_equivalence.py", nproc=nproc)
    assert "mixtral_ep_equivalence: PASS" in out, out[-6000:]
