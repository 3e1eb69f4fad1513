"""Shared measurement helpers: median time of a callable (CUDA events through Triton's ``do_bench`` on a
GPU, a host clock on CPU), the device's measured copy bandwidth, and a plain-text table."""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable, Sequence

import torch


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of ``fn()`` in milliseconds, after warm-up (compiles and caches stay out of it)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of ``fn()`` in ms replayed from a captured CUDA graph (launch gaps out of the figure, as a
    compiled model with CUDA graphs runs it); the host-clock median on CPU."""
    if device.type == "cuda":
        import triton.testing

        fn()  # compile and tune outside the capture
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    return median_ms(fn, device)


def rotating(fn: Callable[..., object], inputs: Sequence[tuple]) -> Callable[[], object]:
    """``fn`` over a cycle of input tuples: several weight copies whose total exceeds the L2 cache, so a
    repeated call reads device memory as a real model's pass over its layers does, not the cache."""
    it = itertools.cycle(inputs)
    return lambda: fn(*next(it))


def device_sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, reps: int = 10) -> float:
    """Median host time of ``fn()`` in ms with a device sync after each call: for work whose launches depend
    on data (eager halting loops) or that runs a host loop (a train step)."""
    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        device_sync(device)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        timed()
    return statistics.median(timed() for _ in range(reps))


def back_to_back_ms(fn: Callable[[], object], device: torch.device, reps: int = 10) -> float:
    """Mean time of ``fn()`` in ms over ``reps`` calls with one device sync at the end, as a train loop that
    reads its metrics every few steps runs them: host work of one call may overlap the device work of the last."""
    fn()
    device_sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    device_sync(device)
    return (time.perf_counter() - t0) * 1e3 / reps


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def describe(device: torch.device) -> str:
    """The device as a results row names it."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A left-aligned first column, right-aligned others; floats with 3 significant decimals."""
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(list(map(str, headers))), "-" * sum(widths) + "-" * 2 * (len(widths) - 1), *map(line, body)])
