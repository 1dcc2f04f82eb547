"""Gradient family on the bundled EfficientNet-Lite0 at 224x224, against the floor and captum.

    python -m bench gradient [--repeats 5]

Floors, measured in this run with the parameters frozen (only input gradients computed):
single-image methods against one forward+backward at batch 1; integrated gradients and
SmoothGrad against their image count divided by the best forward+backward throughput over
batch sizes 1 to 64.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import warnings

import torch

import convlens as cl

from .common import best_of, forward_backward, frozen_parameters, table, throughput, timed

STEPS = 50


def captum_runs(module: torch.nn.Module, x: torch.Tensor, target: int) -> dict:
    import captum.attr as ca

    return {
        "saliency": lambda: ca.Saliency(module).attribute(x, target=target),
        "input_x_gradient": lambda: ca.InputXGradient(module).attribute(x, target=target),
        "deconvnet": lambda: ca.Deconvolution(module).attribute(x, target=target),
        "guided_backprop": lambda: ca.GuidedBackprop(module).attribute(x, target=target),
        "integrated_gradients": lambda: ca.IntegratedGradients(module).attribute(
            x, target=target, n_steps=STEPS
        ),
        "smoothgrad": lambda: ca.NoiseTunnel(ca.Saliency(module)).attribute(
            x, target=target, nt_type="smoothgrad", nt_samples=STEPS, stdevs=0.15 * 2.0
        ),
    }


def cold_peak_mb(library: str, method: str) -> float:
    """Extra peak memory of one cold call, measured in a fresh process (bench/memory.py)."""
    command = [sys.executable, "-W", "ignore", "-m", "bench.memory", library, method]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gradient")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", module="captum")
    torch.manual_seed(0)
    model = cl.load_model()
    x = model.preprocess(cl.sample_images()["chelsea"])
    target = int(model.predict(x).argmax())
    bare = copy.deepcopy(model.module).eval()
    frozen_parameters(bare)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY=PASSIVE")
    before = throughput(forward_backward, bare, x)

    settings = {"integrated_gradients": {"steps": STEPS}, "smoothgrad": {"n_samples": STEPS}}
    oracle = captum_runs(model.module, x, target)
    measured = []
    for name in cl.list_methods("gradient"):
        params = settings.get(name, {})

        def ours(name=name, params=params):
            return cl.explain(model, x, name, target=target, progress=False, **params)

        seconds, _, explanation = timed(ours, args.repeats)
        captum_seconds, _, _ = timed(oracle[name], args.repeats)
        memory, captum_memory = cold_peak_mb("convlens", name), cold_peak_mb("captum", name)
        measured.append((name, seconds, memory, explanation, captum_seconds, captum_memory))

    rates = best_of(before, throughput(forward_backward, bare, x))
    best = max(rates, key=rates.get)
    print(
        "forward+backward images/s by batch size (best of a measurement before and after): "
        + ", ".join(f"{b}: {r:.1f}" for b, r in rates.items())
    )
    print(f"best batch size {best} ({rates[best]:.1f} images/s)\n")
    rows = []
    for name, seconds, memory, explanation, captum_seconds, captum_memory in measured:
        if explanation.forwards == 1:
            floor, basis = 1 / rates[1], "1 fwd+bwd at batch 1"
        else:
            floor, basis = explanation.forwards / rates[best], f"at batch {best}"
        rows.append(
            {
                "method": name,
                "seconds": seconds,
                "forwards": explanation.forwards,
                "batch": explanation.params["batch_size"],
                "peak_MB": memory,
                "floor_s": floor,
                "ratio": seconds / floor,
                "floor basis": basis,
                "captum_s": captum_seconds,
                "captum_ratio": captum_seconds / floor,
                "captum_MB": captum_memory,
                "vs_captum": captum_seconds / seconds,
            }
        )
    print(table(rows, list(rows[0])))
    print(
        "\nratio = median seconds / floor; vs_captum = captum seconds / convlens seconds;"
        " peak_MB = extra resident memory at the peak of one call"
    )
    return 0
