"""The benchmark CLI runs on CPU (gloo) and prints its table; JSON comes out."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4])
def test_bench_cli_cpu_table_and_json(tmp_path, nproc):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moe_dispatch.bench", "--cpu", "--nproc", str(nproc), "--tokens", "0", "64",
         "--hidden", "32", "--experts", "8", "4", "--topk", "2", "4", "--iters", "2", "--warmup", "1",
         "--out", str(out_json)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "limit = CPU memcpy" in proc.stdout and "all_to_all+torch" in proc.stdout
    result = json.loads(out_json.read_text())
    assert len(result["rows"]) == 4
    assert all(r["us_dispatch"] > 0 and r["nproc"] == nproc for r in result["rows"])


def test_bench_cli_rejects_unknown_backend():
    proc = subprocess.run([sys.executable, "-m", "moe_dispatch.bench", "--backends", "magic"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown backends" in proc.stderr


@pytest.mark.distributed
def test_bench_cli_capacity_backend_cpu(tmp_path):
    """The capacity-mode all-to-all row runs on gloo (no graph column on CPU)."""
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moe_dispatch.bench", "--cpu", "--nproc", "2", "--tokens", "0", "16", "--hidden", "8",
         "--experts", "4", "--topk", "2", "--iters", "1", "--warmup", "1", "--backends", "all_to_all+capacity",
         "--out", str(out_json)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["all_to_all+capacity"] * 2 and all(r["us_graph"] is None for r in rows)
