"""Hardware limits measured in the same run as the dispatchers: the ratio, not the absolute
figure, is what a benchmark reports (these machines are shared and noisy)."""
from __future__ import annotations

import statistics
import time

import torch


def time_cuda(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of ``fn()`` on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu(fn, warmup: int = 2, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def p2p_copy_gbps(src_device: int, dst_device: int, nbytes: int = 512 << 20) -> float:
    """One-direction GPU->peer GPU copy bandwidth, GB/s (bytes copied / time)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src_device}").random_()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_device}")
    with torch.cuda.device(src_device):
        ms = time_cuda(lambda: dst.copy_(src))
    return nbytes / ms / 1e6


def hbm_copy_gbps(device: int, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, GB/s counting bytes read + written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=f"cuda:{device}").normal_()
    dst = torch.empty_like(src)
    with torch.cuda.device(device):
        ms = time_cuda(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def cpu_copy_gbps(nbytes: int = 256 << 20) -> float:
    """Memory copy bandwidth of this CPU (read + written), the reference line on CPU runs."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_cpu(lambda: dst.copy_(src), 1, 5) / 1e6
