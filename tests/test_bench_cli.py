"""The benchmark CLI runs on CPU (gloo) and prints its table; JSON comes out."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moe_dispatch.bench.backends import BACKENDS, why_skipped
from moe_dispatch.bench.plot import plot
from moe_dispatch.bench.runner import add_rates, format_table


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4])
def test_bench_cli_cpu_table_and_json(tmp_path, nproc):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moe_dispatch.bench", "--cpu", "--backends", "all_to_all+torch", "--nproc", str(nproc), "--tokens", "0", "64",
         "--hidden", "32", "--experts", "8", "4", "--topk", "2", "4", "--iters", "2", "--warmup", "1",
         "--out", str(out_json)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "limit = CPU memcpy" in proc.stdout and "all_to_all+torch" in proc.stdout
    assert "FutureWarning" not in proc.stderr, proc.stderr
    result = json.loads(out_json.read_text())
    assert len(result["rows"]) == 4
    assert all(r["us_dispatch"] > 0 and r["nproc"] == nproc for r in result["rows"])


def test_bench_cli_rejects_unknown_backend():
    proc = subprocess.run([sys.executable, "-m", "moe_dispatch.bench", "--backends", "magic"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown backends" in proc.stderr


def _bench(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "moe_dispatch.bench", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("argv, message", [
    (["--topk", "10", "--experts", "8"], "--topk 10 is larger than its paired --experts 8"),
    (["--experts", "6", "--topk", "2", "--nproc", "4"], "--experts 6 is not divisible by --nproc 4"),
    (["--experts", "8", "4", "--topk", "2"], "--experts and --topk pair up"),
    (["--tokens", "-1"], "argument --tokens: must be >= 0, got -1"),
    (["--hidden", "0"], "argument --hidden: must be >= 1, got 0"),
    (["--nproc", "0"], "argument --nproc: must be >= 1, got 0"),
    (["--iters", "x"], "argument --iters: must be an integer, got 'x'"),
    (["--out", "/no/such/folder/r.json"], "--out /no/such/folder/r.json: folder /no/such/folder does not exist"),
])
def test_bench_cli_rejects_bad_arguments_by_name(argv, message):
    proc = _bench(*argv)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bench_cli_plot_without_matplotlib_fails_before_running(tmp_path):
    # A matplotlib that cannot be found, whether or not it is installed here.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nclass _NoMpl:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib':\n            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _NoMpl())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = _bench("--plot", str(tmp_path / "p.png"), env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert 'pip install -e ".[plot]"' in proc.stderr and "limit" not in proc.stdout


@pytest.mark.distributed
def test_bench_cli_default_lists_every_backend_in_full_sentences():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = _bench("--cpu", "--tokens", "16", "--hidden", "16", "--iters", "1", "--warmup", "0", env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FutureWarning" not in proc.stderr and "deprecated" not in proc.stderr, proc.stderr
    out = proc.stdout
    assert "2 ranks on CPU" in out and "over gloo" in out and "x?" not in out
    assert "limit = CPU memcpy" in out
    measured = {line.split()[0] for line in out.splitlines() if line.startswith("all_to_all")}
    skipped = {}
    for block in out.split("skipped ")[1:]:
        name, why = block.split(": ", 1)
        skipped[name] = " ".join(why.split())
    assert measured == {"all_to_all+torch", "all_to_all+capacity"}  # capacity mode runs on gloo too
    assert set(skipped) == set(BACKENDS) - measured
    for name, why in skipped.items():
        assert why.endswith(".") and why[0].isupper(), f"{name}: {why!r} is not a full sentence"
    assert "set TRITON_INTERPRET=1 in the environment" in skipped["all_to_all+triton"]


def test_why_skipped_names_every_unusable_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    skipped = why_skipped(list(BACKENDS), torch.device("cpu"))
    assert set(skipped) == set(BACKENDS) - {"all_to_all+torch", "all_to_all+capacity"}
    # 'auto' is a row of its own when the backend it picks is not asked for
    assert why_skipped(["all_to_all"], torch.device("cpu")) == {}


def _result(rows, limit=20.0):
    return dict(limit_name="CPU memcpy", limit_gbps=limit, rows=rows, skipped={"nvlink": "No GPU here."},
                device="cpu", nproc=2, comm="gloo", torch=torch.__version__, dtype="float32")


def _row(backend, tokens, us, E=8, K=2, H=32):
    return dict(backend=backend, tokens=tokens, hidden=H, experts=E, topk=K, nproc=2,
                us_dispatch=us, us_combine=2 * us, remote_bytes=tokens * H * 4)


def test_format_table_header_and_rates():
    result = _result([_row("all_to_all+torch", 64, 1000.0), _row("all_to_all+torch", 0, 10.0)])
    add_rates(result)
    assert result["rows"][0]["gbps_dispatch"] == pytest.approx(64 * 32 * 4 / 1000.0 / 1e3)
    assert result["rows"][0]["gbps_combine"] == pytest.approx(result["rows"][0]["gbps_dispatch"] / 2)
    text = format_table(result)
    assert text.startswith("# moe_dispatch bench: 2 ranks on CPU") and "skipped nvlink: No GPU here." in text
    assert "no backend could run" in format_table(_result([]))


def test_plot_log_scale_every_line_visible(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(b, t, us * t) for b, us in (("all_to_all+torch", 1.0), ("all_to_all+triton", 1e4))
            for t in (0, 16, 256)]
    result = _result(rows)
    add_rates(result)
    plot(result, str(tmp_path / "p.png"))
    import matplotlib.pyplot as plt
    assert (tmp_path / "p.png").stat().st_size > 0
    plt.close("all")


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
