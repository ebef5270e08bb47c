import os

import torch

# Triton kernels run on CPU-only machines through Triton's interpreter. This must be set before
# triton is first imported, hence here, at collection time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "multi_gpu: needs 2+ CUDA devices; skipped otherwise")
    config.addinivalue_line("markers", "distributed: spawns several processes (gloo on CPU)")


def pytest_collection_modifyitems(config, items):
    n_gpu = torch.cuda.device_count()
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_multi = pytest.mark.skip(reason="needs 2+ CUDA devices")
    for item in items:
        if "gpu" in item.keywords and n_gpu == 0:
            item.add_marker(skip_gpu)
        if "multi_gpu" in item.keywords and n_gpu < 2:
            item.add_marker(skip_multi)
