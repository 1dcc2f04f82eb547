"""The audit's engines: images per second of ``convlens.audit.run``, local and on Ray.

    python -m bench audit [--images 96] [--methods gradcam,saliency,integrated_gradients]
                          [--model efficientnet-lite0] [--repeats 1]

One run measures, on the same generated shapes folder and the same methods:

* ``local``, with 1 and with 2 torch threads (the local engine: chunk after chunk, here);
* ``ray``, with 1 worker and with 2 workers (Ray gives each actor one CPU, and Ray sets each
  worker's OpenMP and torch threads to its CPU count: 1 thread per worker).

Ray's overhead is compared at the same total thread count: ``ray 1 worker`` against ``local 1
thread``, ``ray 2 workers`` against ``local 2 threads``. The local Ray instance is started once
before the timed runs, as it is already running on a cluster; its start is timed and printed on
its own. Each timed run begins in a fresh output folder, so it does all the work, actors'
model loading included.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import convlens as cl

from .common import table

METHODS = "gradcam,saliency,integrated_gradients"


def _timed_run(
    model: str, data: Path, methods: list[str], out: Path, engine: str, workers: int, steps: int
) -> float:
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    cl.audit.run(
        model,
        data,
        methods,
        out,
        engine=engine,
        workers=workers,
        steps=steps,
        progress=False,
        page=False,  # the engines, not the page (the same for both)
    )
    return time.perf_counter() - start


def _errors(out: Path) -> int:
    import pyarrow.parquet as pq

    table_ = pq.read_table(out / "results.parquet", columns=["error"])
    return sum(1 for e in table_.column("error").to_pylist() if e)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench audit")
    parser.add_argument("--images", type=int, default=96, help="images in the shapes folder")
    parser.add_argument("--methods", default=METHODS, help="NAME[,NAME...]")
    parser.add_argument("--model", default="efficientnet-lite0", help="a load_model spec")
    parser.add_argument("--steps", type=int, default=20, help="deletion/insertion steps")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each setting")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    import ray

    logging.getLogger("ray").setLevel(logging.ERROR)  # Ray Data's per-run INFO lines
    scratch = Path(tempfile.mkdtemp(prefix="convlens-bench-audit-"))
    try:
        per_class = -(-args.images // len(cl.datasets.SHAPES))
        data = cl.datasets.shapes_folder(scratch / "data", per_class, size=96, seed=0)
        images = sum(1 for _ in data.rglob("*.png"))
        start = time.perf_counter()
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
        )
        ray_start = time.perf_counter() - start
        settings: list[tuple[str, str, int, int]] = [
            ("local, 1 thread", "local", 1, 1),
            ("ray, 1 worker", "ray", 1, 1),
            ("local, 2 threads", "local", 2, 2),
            ("ray, 2 workers", "ray", 2, 2),
        ]
        seconds: dict[str, list[float]] = {name: [] for name, *_ in settings}
        errors: dict[str, int] = {}
        threads = torch.get_num_threads()
        for _ in range(args.repeats):  # settings in turn, so drifting load affects all alike
            for name, engine, workers, total in settings:
                torch.set_num_threads(total if engine == "local" else threads)
                out = scratch / name.replace(", ", "-").replace(" ", "")
                seconds[name].append(
                    _timed_run(args.model, data, methods, out, engine, workers, args.steps)
                )
                errors[name] = _errors(out)
        torch.set_num_threads(threads)
        ray.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    rows: list[dict[str, Any]] = []
    for name, engine, _workers, total in settings:
        row: dict[str, Any] = {
            "engine": name,
            "threads": total,
            "seconds": medians[name],
            "images/s": images / medians[name],
            "error rows": errors[name],
        }
        if engine == "ray":
            local = next(n for n, e, _w, t in settings if e == "local" and t == total)
            row["overhead vs local"] = f"{medians[name] / medians[local] - 1:+.1%}"
        rows.append(row)
    print(
        f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"ray {ray.__version__}; {images} shapes images (96 px) x {len(methods)} methods "
        f"({', '.join(methods)}) on {args.model}, curves of {args.steps} steps; "
        f"median of {args.repeats} run(s) each; local Ray instance started in {ray_start:.1f} s "
        "(not in the timings)"
    )
    print()
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    return 0
