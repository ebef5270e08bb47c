"""Launch the torchrun equivalence scripts on 2 GPUs (skipped without them)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run_torchrun(script: str, nproc: int = 2, timeout: int = 600) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), script]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **SAFE_ENV}, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.mark.multi_gpu
def test_all_to_all_nccl_equivalence():
    out = run_torchrun("tests/distributed/all_to_all_equivalence.py")
    assert "all_to_all_equivalence: PASS" in out


@pytest.mark.multi_gpu
def test_nvlink_equivalence():
    assert "NVLINK EQUIVALENCE: PASS" in run_torchrun("tests/distributed/nvlink_equivalence.py")


@pytest.mark.multi_gpu
def test_model_with_every_dispatcher():
    assert "model_dispatchers_equivalence: PASS" in run_torchrun("tests/distributed/model_dispatchers_equivalence.py")
