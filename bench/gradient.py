"""Gradient family on the bundled EfficientNet-Lite0 at 224x224, against the floor and captum.

    python -m bench gradient [--repeats 5]

Floors, measured in this run with the parameters frozen (only input gradients computed):
single-image methods against one forward+backward at batch 1; integrated gradients and
SmoothGrad against their image count divided by the best forward+backward throughput over
batch sizes 1 to 64.
"""

from __future__ import annotations

import torch

import convlens as cl

from .common import suite_main

STEPS = 50
SETTINGS = {"integrated_gradients": {"steps": STEPS}, "smoothgrad": {"n_samples": STEPS}}
FLOORS = {name: "fwdbwd_b1" for name in cl.list_methods("gradient")} | {
    "integrated_gradients": "fwdbwd_best",
    "smoothgrad": "fwdbwd_best",
}


def oracles(module: torch.nn.Module, x: torch.Tensor, target: int) -> dict:
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


def main(argv: list[str]) -> int:
    return suite_main(argv, "gradient", FLOORS, SETTINGS, oracles, repeats=5)
