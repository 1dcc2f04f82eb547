"""Shared benchmark machinery: timing medians, peak memory, and the model's floor.

The floor of a method is what the bare model needs for the same work, measured in the same
run: the number of images it passes through the model divided by the model's best throughput
over batch sizes 1 to 64. Ratios to it are what to compare across machines and runs; absolute
seconds on a shared machine are not.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakMemory:
    """Largest resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self) -> PeakMemory:
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def timed(fn: Callable[[], Any], repeats: int = 5) -> tuple[float, float, Any]:
    """Median seconds over ``repeats`` calls (after one warm-up), extra peak MB, last result."""
    result = fn()  # warm-up: allocator, lazy initialisation
    times, peaks = [], []
    for _ in range(repeats):
        with PeakMemory() as memory:
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        peaks.append(memory.extra_mb)
    return statistics.median(times), max(peaks), result


def forward_backward(module: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward and one backward to the input, parameters frozen: the gradient floor."""
    x = x.detach().requires_grad_(True)
    torch.autograd.grad(module(x)[:, 0].sum(), x)


def forward(module: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        module(x)


def throughput(
    step: Callable[[torch.nn.Module, torch.Tensor], None],
    module: torch.nn.Module,
    image: torch.Tensor,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> dict[int, float]:
    """Images per second of ``step`` at each batch size (median of a few calls)."""
    rates = {}
    for batch_size in batch_sizes:
        x = image.expand(batch_size, -1, -1, -1).contiguous()
        repeats = max(3, 32 // batch_size)
        seconds, _, _ = timed(lambda x=x: step(module, x), repeats=repeats)
        rates[batch_size] = batch_size / seconds
    return rates


def best_of(*curves: dict[int, float]) -> dict[int, float]:
    """Per batch size, the best rate over several measurements of the same curve.

    Measuring the floor before and after the methods and keeping the best makes the ratios
    conservative: noise from the shared machine cannot make a method look faster than it is.
    """
    return {b: max(curve[b] for curve in curves) for b in curves[0]}


def frozen_parameters(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        lines.append("  ".join(cell(row.get(c, "")).ljust(widths[c]) for c in columns))
    return "\n".join(lines)
