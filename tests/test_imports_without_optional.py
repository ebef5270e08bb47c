"""The package imports on a CPU-only machine without triton, TransformerEngine or DeepEP.

A subprocess installs a ``sys.meta_path`` finder that refuses ``triton``, ``transformer_engine``
and ``deep_ep`` (as if not installed, even where they are), then imports every module of
``moe_dispatch`` (except ``__main__`` entry points, which run a command). Only the Triton kernel modules themselves (``moe_dispatch.kernels.*`` other than
the pure-Python NVLink wire format) may fail, and only with an ``ImportError`` naming triton.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = r'''
import importlib, importlib.abc, pkgutil, sys

BLOCKED = ("triton", "transformer_engine", "deep_ep")

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocker())
import moe_dispatch
needs_triton, failed = [], []
for info in pkgutil.walk_packages(moe_dispatch.__path__, "moe_dispatch."):
    name = info.name
    if name.endswith(".__main__"):
        continue  # a command (python -m ...), not a module to import
    triton_kernels = name.startswith("moe_dispatch.kernels.") and name != "moe_dispatch.kernels.nvlink.wire" \
        and name != "moe_dispatch.kernels.nvlink"
    try:
        importlib.import_module(name)
    except ImportError as exc:
        (needs_triton if triton_kernels and "triton" in str(exc) else failed).append(f"{name}: {exc!r}")
    except Exception as exc:
        failed.append(f"{name}: {exc!r}")
assert not failed, "\n".join(failed)
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "an optional dependency was imported"
print("ok", len(needs_triton))
'''


def test_every_module_imports_without_triton_te_deep_ep():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    # the Triton kernel modules (permute, indices converter, the NVLink kernels) are the only ones left out
    assert res.stdout.startswith("ok "), res.stdout
    assert int(res.stdout.split()[1]) >= 3, res.stdout
