"""Shared benchmark machinery: timing medians, peak memory, and the model's floor.

The floor of a method is what the bare model needs for the same work, measured in the same
run: its images passed through the bare model at the best batch size of the throughput curve
over batch sizes 1 to 64 (or, for single-image methods, passes at batch 1). The floor pass, the
method and its oracle are timed in turn, so that the drifting load of a shared machine affects
them alike. Ratios to the floor are what to compare across machines and runs; absolute seconds
on a shared machine are not.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import convlens as cl
from convlens.engine import freed_memory_kept

PAGE = os.sysconf("SC_PAGE_SIZE")
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
# the device of a run (``--device``), read by the suite's helper processes too
DEVICE_VARIABLE = "CONVLENS_BENCH_DEVICE"


def device() -> torch.device:
    """The device this run measures on: ``--device``, ``cpu`` by default."""
    return torch.device(os.environ.get(DEVICE_VARIABLE, "cpu"))


def synchronise() -> None:
    """Wait for the device's queued work, so that a clock stopped next measures it."""
    if device().type == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakMemory:
    """Largest resident memory above the level at entry, sampled every 5 ms; on a GPU, the
    largest memory allocated by torch on it above the level at entry."""

    def __enter__(self) -> PeakMemory:
        if device().type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = self.peak = torch.cuda.memory_allocated()
            return self
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
        if device().type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def timed(fn: Callable[[], Any], repeats: int = 5, warm: bool = True) -> tuple[float, Any]:
    """Median seconds over ``repeats`` calls (after one warm-up, unless ``warm`` is False) and
    the last result.

    No memory sampling here: a sampling thread would compete for the two cores. Peak memory is
    measured separately, in a fresh process (:func:`cold_peak_mb`).
    """
    result = fn() if warm else None  # warm-up: allocator, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        synchronise()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def timed_alternately(fns: list[Callable[[], Any]], repeats: int) -> tuple[list[float], Any]:
    """Median seconds of each function, timed in turn (after a warm-up of each), and the
    first one's last result.

    On a shared, noisy machine conditions drift within minutes (measured: the same bare model
    at 77 and at 116 images/s in one hour); timing a method, its floor and its oracle in turn
    exposes all of them to the same conditions, so their ratios hold.
    """
    result = fns[0]()
    for fn in fns[1:]:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            value = fn()
            synchronise()
            times[k].append(time.perf_counter() - start)
            if k == 0:
                result = value
    return [statistics.median(t) for t in times], result


class FreshProcess:
    """An oracle in its own fresh process (``bench/fresh.py``), with the allocator settings a
    user's script has; each call runs it once there and waits for it."""

    def __init__(self, suite: str, name: str) -> None:
        command = [sys.executable, "-W", "ignore", "-m", "bench.fresh", suite, name]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._expect("ready")

    def _expect(self, word: str) -> None:
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != word:
            raise RuntimeError(f"the oracle process said {line!r}, not {word!r}")

    def __call__(self) -> None:
        self.process.stdin.write("run\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        self._expect("done")

    def close(self) -> None:
        self.process.stdin.close()  # type: ignore[union-attr]
        self.process.wait(timeout=60)


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
        seconds, _ = timed(lambda x=x: step(module, x), repeats=repeats)
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


# How a method's floor is computed from the bare model's rates measured in the same run:
# one pass at batch 1 (forward, or forward+backward) per model pass the method makes, or its
# image count divided by the best rate over batch sizes 1 to 64.
FLOORS = {
    "fwdbwd_b1": "fwd+bwd at batch 1, per pass (timed alternately)",
    "fwdbwd_best": "images at the best fwd+bwd batch size 8-64 (timed in turn)",
    "fwd_b1": "fwd at batch 1, per pass (timed alternately)",
    "fwd_best": "images at the best fwd batch size 8-64 (timed in turn)",
    "fwdbwd_once": "one fwd+bwd at batch 1 (timed alternately)",
}


def setup() -> tuple[Any, torch.Tensor, int]:
    """The bundled model, the chelsea photo preprocessed, and its predicted class.

    The process keeps glibc's default allocator settings. ``convlens.explain`` keeps freed
    memory for reuse during each call (``freed_memory_kept``); the floors are measured under
    the same setting, and the oracles both ways (as their users run them, and the same way).
    """
    warnings.filterwarnings("ignore", module="captum")
    torch.manual_seed(0)
    model = cl.load_model()
    model.module.to(device())
    x = model.preprocess(cl.sample_images()["chelsea"]).to(device())
    with torch.no_grad():
        target = int(model.module(x).argmax())
    return model, x, target


def kept(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with freed memory kept for reuse, as ``convlens.explain`` runs its work."""

    def run() -> Any:
        with freed_memory_kept():
            return fn()

    return run


def cold_peak_mb(suite: str, library: str, method: str) -> float:
    """Extra peak memory of one cold call, measured in a fresh process (bench/memory.py)."""
    command = [sys.executable, "-W", "ignore", "-m", "bench.memory", suite, library, method]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def run_suite(
    suite: str,
    methods: list[str],
    floors: dict[str, str],
    settings: dict[str, dict[str, Any]],
    oracles: Callable[[torch.nn.Module, torch.Tensor, int], dict[str, Callable[[], Any]]],
    repeats: int,
) -> list[dict[str, Any]]:
    """Time each method and its oracle, measure the floors before and after, print a table."""
    model, x, target = setup()
    bare = copy.deepcopy(model.module).eval()
    frozen_parameters(bare)
    where = device()
    machine = torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu"
    print(
        f"device {machine}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; floors measured with freed "
        "memory kept for reuse, as convlens.explain runs"
    )
    kinds = {"fwdbwd": forward_backward, "fwd": forward}
    needed = {floor.split("_")[0] for floor in floors.values()}
    before = {kind: kept(lambda k=kind: throughput(kinds[k], bare, x))() for kind in needed}
    oracle = oracles(model.module, x, target)
    measured = []
    for name in methods:

        def ours(name: str = name) -> Any:
            return cl.explain(
                model, x, name, target=target, progress=False, **settings.get(name, {})
            )

        kind, basis = floors[name].split("_")
        step = kinds[kind]
        ours()  # the first call on a model also probes it (two counted forwards): not the floor
        forwards = ours().forwards
        if basis in ("b1", "once"):  # passes at batch 1
            sample, scale = 1, (forwards if basis == "b1" else 1)
            floor_pass = kept(lambda step=step: step(bare, x))
        else:  # the same images at the best of batch sizes 8-64, under the same conditions
            sample = min(forwards, 256)
            scale = forwards / sample
            floor_passes = []
            for size in (8, 16, 32, 64):
                batches = [
                    x.expand(len(chunk), -1, -1, -1).contiguous()
                    for chunk in torch.arange(sample).split(size)
                ]

                def floor_pass(step: Callable = step, batches: list = batches) -> None:
                    with freed_memory_kept():
                        for batch in batches:
                            step(bare, batch)

                floor_passes.append(floor_pass)

        passes = [floor_pass] if basis in ("b1", "once") else floor_passes
        fns = [ours, *passes]
        fresh = FreshProcess(suite, name) if name in oracle else None
        if fresh is not None:
            fns += [fresh, kept(oracle[name])]
        try:
            medians, explanation = timed_alternately(
                fns, max(repeats, 9 if basis != "best" else repeats)
            )
        finally:
            if fresh is not None:
                fresh.close()
        seconds, floor = medians[0], min(medians[1 : 1 + len(passes)]) * scale
        theirs, their_kept = medians[-2:] if fresh is not None else (None, None)
        memory = cold_peak_mb(suite, "convlens", name)
        their_memory = cold_peak_mb(suite, "oracle", name) if name in oracle else None
        measured.append(
            (name, seconds, memory, explanation, theirs, their_kept, their_memory, floor)
        )

    rates = {
        kind: best_of(before[kind], kept(lambda k=kind: throughput(kinds[k], bare, x))())
        for kind in needed
    }
    for kind, curve in rates.items():
        best = max(curve, key=curve.get)
        print(
            f"{kind} images/s by batch size (best of before and after): "
            + ", ".join(f"{b}: {r:.1f}" for b, r in curve.items())
            + f"; best batch {best}"
        )
    rows = []
    for name, seconds, memory, explanation, theirs, their_kept, their_memory, floor in measured:
        row = {
            "method": name,
            "seconds": seconds,
            "forwards": explanation.forwards,
            "batch": explanation.params["batch_size"],
            "peak_MB": memory,
            "floor_s": floor,
            "ratio": seconds / floor,
            "floor": FLOORS[floors[name]],
        }
        if theirs is not None:
            row |= {
                "oracle_s": theirs,
                "oracle_ratio": theirs / floor,
                "oracle_MB": their_memory,
                "vs_oracle": theirs / seconds,
                "vs_oracle_kept": their_kept / seconds,
            }
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print()
    print(table(rows, columns))
    print(
        "\nratio = median seconds / floor. oracle = captum, or the lime package for lime. "
        "vs_oracle = oracle seconds / convlens seconds, the oracle run as its users run it "
        "(its own fresh process, default allocator); vs_oracle_kept = the same in this "
        "process with freed memory kept for reuse, as convlens.explain runs. peak_MB = extra "
        "resident memory (on a GPU: memory torch allocated there) at the peak of one cold call "
        "in a fresh process"
    )
    return rows


def suite_main(
    argv: list[str],
    suite: str,
    floors: dict[str, str],
    settings: dict[str, dict[str, Any]],
    oracles: Callable[[torch.nn.Module, torch.Tensor, int], dict[str, Callable[[], Any]]],
    repeats: int,
) -> int:
    """The command line of one suite: ``python -m bench SUITE [--repeats N]``."""
    parser = argparse.ArgumentParser(prog=f"python -m bench {suite}")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--methods", help="NAME[,NAME...] of this suite (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    os.environ[DEVICE_VARIABLE] = args.device  # the oracle and memory processes read it
    methods = cl.list_methods(suite)
    if args.methods:
        methods = [m for m in args.methods.split(",") if m in methods]
    run_suite(suite, methods, floors, settings, oracles, args.repeats)
    return 0
