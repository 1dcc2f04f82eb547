"""Every method on a model placed on a device, against the same method on the CPU.

    python -m bench devices [--device cuda] [--model efficientnet-lite0] [--size 96]
                            [--methods a,b]

For each method of ``convlens.list_methods()``: the explanation of the chelsea photo with the
model on ``--device``, its seconds, and the largest difference from the CPU's explanation
relative to the CPU map's largest magnitude. A method that raises is reported with the first
line of its error; the run goes on. Seeded methods draw their random numbers on the CPU, so
both devices see the same draws; only floating-point order differs (kernels differ between
devices), hence a tolerance, not equality. Exit status 1 when a method fails or differs by
more than ``--tolerance``.

On a machine without a GPU, ``--device cpu`` runs the same checks (both sides on the CPU: the
differences must be 0); that is how the script itself is tested.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch

import convlens as cl
from convlens.checks import first_line

from .common import table

# parameters that keep each check short where the defaults mean thousands of passes
QUICK: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 16},
    "smoothgrad": {"n_samples": 8},
    "rise": {"n_masks": 64},
    "lime": {"n_samples": 64},
    "kernel_shap": {"n_samples": 64},
    "occlusion": {"window": 16, "stride": 16},
    "gradient_shap": {"n_samples": 8},
    "meaningful_perturbation": {"steps": 10},
    "anchors": {"n_samples": 64},
}


def check(model: cl.Model, where: torch.device, x: torch.Tensor, method: str) -> dict[str, Any]:
    """One method on ``where`` against the CPU."""
    params = QUICK.get(method, {})
    row: dict[str, Any] = {"method": method}
    try:
        placed = copy.deepcopy(model)
        placed.module.to(where)
        reference = cl.explain(model, x, method, progress=False, **params).attribution
        start = time.perf_counter()
        explained = cl.explain(placed, x.to(where), method, progress=False, **params)
        if where.type == "cuda":
            torch.cuda.synchronize()
        row["seconds"] = time.perf_counter() - start
        got = explained.attribution
        scale = float(reference.abs().max()) or 1.0
        row["max_rel_diff"] = float((got.cpu() - reference).abs().max()) / scale
        row["on_cpu"] = got.device.type == "cpu"
    except Exception as error:  # every failure is reported, and the run goes on
        row["error"] = f"{type(error).__name__}: {first_line(str(error))}"
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench devices")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="efficientnet-lite0", help="a load_model spec")
    parser.add_argument("--size", type=int, default=96, help="input side in pixels")
    parser.add_argument("--methods", help="NAME[,NAME...] (default: all)")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args(argv)
    where = torch.device(args.device)
    if where.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    model = cl.load_model(args.model)
    photo = model.preprocess(cl.sample_images()["chelsea"])
    x = torch.nn.functional.interpolate(photo, size=args.size, mode="bilinear", antialias=True)
    methods = args.methods.split(",") if args.methods else cl.list_methods()
    warm = copy.deepcopy(model)
    warm.module.to(where)
    cl.explain(warm, x.to(where), "saliency", progress=False)  # device start-up, not timed
    rows = [check(model, where, x, method) for method in methods]
    name = torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; {args.model} at {args.size} px")
    print(table(rows, ["method", "seconds", "max_rel_diff", "on_cpu", "error"]))
    bad = [
        r["method"]
        for r in rows
        if "error" in r or r["max_rel_diff"] > args.tolerance or not r["on_cpu"]
    ]
    print(
        f"\n{len(rows) - len(bad)} of {len(rows)} methods agree" + (f"; not: {bad}" if bad else "")
    )
    return 1 if bad else 0
