"""Every ```python block of README.md runs as pasted: each in a fresh CPU process, and the
expert-parallel example (a block whose first line is a ``# torchrun ...`` command) under torchrun
with 2 gloo ranks. A block whose first line is ``# needs CUDA ...`` runs only where CUDA is (a
``gpu`` test, with the GPU visible). A failure names the block by its README line and first line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TORCHRUN = re.compile(r"#\s*torchrun --nproc-per-node (\d+) (\S+\.py)")
NEEDS_CUDA = re.compile(r"#\s*needs CUDA")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line of the opening fence, code)`` for every ```python block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start, "\n".join(body) + "\n"))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def _name(block: tuple[int, str]) -> str:
    line, code = block
    return f"README.md:{line}: {code.splitlines()[0][:60]}"


def _env(cuda: bool = False) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU snippets must run on a machine without a GPU
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _check(proc: subprocess.CompletedProcess, name: str) -> None:
    if proc.returncode == 0:
        return
    pytest.fail(f"the README snippet at {name} fails (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def test_readme_has_the_snippets():
    assert len(BLOCKS) >= 4, [_name(b) for b in BLOCKS]
    assert any(TORCHRUN.match(code) for _, code in BLOCKS), "no torchrun (expert-parallel) snippet in README.md"


def _run_snippet(block, tmp_path, cuda: bool) -> None:
    name = _name(block)
    script = tmp_path / "snippet.py"
    script.write_text(block[1])
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(cuda),
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the README snippet at {name} ran past 120 s")
    _check(proc, name)


@pytest.mark.parametrize("block", [b for b in BLOCKS if not TORCHRUN.match(b[1]) and not NEEDS_CUDA.match(b[1])],
                         ids=_name)
def test_readme_snippet_runs(block, tmp_path):
    _run_snippet(block, tmp_path, cuda=False)


@pytest.mark.gpu
@pytest.mark.parametrize("block", [b for b in BLOCKS if NEEDS_CUDA.match(b[1])], ids=_name)
def test_readme_cuda_snippet_runs(block, tmp_path):
    _run_snippet(block, tmp_path, cuda=True)


@pytest.mark.distributed
@pytest.mark.parametrize("block", [b for b in BLOCKS if TORCHRUN.match(b[1])], ids=_name)
def test_readme_torchrun_example_runs(block, tmp_path):
    name = _name(block)
    nproc, path = TORCHRUN.match(block[1]).groups()
    assert (ROOT / path).read_text() == block[1], f"{name}: the README block differs from {path}"
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", nproc,
                               "--standalone", str(ROOT / path)], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the README example at {name} ({path}, {nproc} ranks) ran past 180 s")
    _check(proc, f"{name} ({path} under torchrun, {nproc} gloo ranks)")


def test_a_broken_snippet_is_named():
    block = (12, "import torch\nraise SystemExit(3)\n")
    proc = subprocess.CompletedProcess([], 3, "", "Traceback ... NameError: x")
    with pytest.raises(pytest.fail.Exception, match=r"README snippet at README.md:12: import torch fails \(exit 3\)"):
        _check(proc, _name(block))
    assert python_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n") == [(2, "x = 1\n")]
