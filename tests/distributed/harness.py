"""Run a function on several processes joined in a process group, from inside pytest.

``run_ranks(fn, world_size)`` spawns ``world_size`` processes, initialises a ``gloo`` group
(``nccl`` with ``backend="nccl"``, one GPU per rank), calls ``fn(rank, world_size, *args)`` on
each and returns the per-rank results. A rank that raises makes the call raise with that rank's
traceback; ranks that do not finish within ``timeout`` seconds are killed and the call raises,
so a hang is a test failure, never a stuck CI.
"""
from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, queue):
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 120.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, object]] = {}
    import queue as _q
    try:
        while len(results) < world_size:
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except _q.Empty:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout}s (hang?); got {results}")
            results[rank] = (status, payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = {r: v for r, (s, v) in results.items() if s == "error"}
    if errors:
        raise RankError(errors)
    return [results[r][1] for r in range(world_size)]


class RankError(RuntimeError):
    """One or more ranks raised; ``errors`` maps rank -> formatted traceback."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        super().__init__("\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items())))


# --- named checks, all of a world size in one set of processes ----------------------------------
def _run_module_checks(rank, world_size, module: str, names: list[str], workdir: str) -> dict:
    """On each rank: ``{name: ("ok", metrics) | ("error", traceback)}`` for ``module.CHECKS[name]``."""
    import importlib

    checks = importlib.import_module(module).CHECKS
    results = {}
    for name in names:
        try:
            results[name] = ("ok", checks[name](rank, world_size, workdir))
        except Exception:  # noqa: BLE001 - reported by the test that owns the check
            results[name] = ("error", traceback.format_exc())
    return results


class RankChecks:
    """Run a test module's ``CHECKS`` (``{name: fn(rank, world, workdir) -> metrics dict}``) on
    gloo ranks: every check of a world size in one set of processes, once per pytest session
    (starting ranks costs seconds), each test then asserting on its check's per-rank metrics.

    Args:
        module: the test module's import name (the spawned ranks import it to find ``CHECKS``).
        world_checks: ``{world_size: [check names]}``.
    """

    def __init__(self, module: str, world_checks: dict[int, list[str]], timeout: float = 150.0) -> None:
        self.module, self.world_checks, self.timeout = module, world_checks, timeout
        self._results: dict[int, list] = {}

    def metrics(self, world: int, check: str, tmp_path_factory) -> list[dict]:
        """Per-rank metrics of ``check`` at ``world`` ranks; fails the test with a rank's traceback."""
        import pytest

        if world not in self._results:
            workdir = str(tmp_path_factory.mktemp(f"{self.module.rsplit('.', 1)[-1]}_{world}"))
            self._results[world] = run_ranks(_run_module_checks, world, self.module, self.world_checks[world], workdir,
                                             timeout=self.timeout)
        per_rank = [r[check] for r in self._results[world]]
        errors = [f"rank {r}:\n{payload}" for r, (status, payload) in enumerate(per_rank) if status == "error"]
        if errors:
            pytest.fail("\n".join(errors), pytrace=False)
        return [payload for _, payload in per_rank]


def worst(per_rank: list[dict], key: str) -> float:
    """The largest value of metric ``key`` over the ranks."""
    return max(m[key] for m in per_rank)
