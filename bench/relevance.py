"""Relevance methods on the bundled EfficientNet-Lite0 at 224x224.

    python -m bench relevance [--repeats 5]

LRP is compared with one forward and backward pass of the bare model at batch 1 (timed
alternately with it): the work of a gradient, which LRP's rules replace. DeepLIFT runs the
inputs and references as one batch of two; GradientSHAP passes ``n_samples`` images. Oracles:
captum's DeepLift and GradientShap on the same work.
"""

from __future__ import annotations

import torch

from .common import suite_main

SETTINGS = {
    "lrp": {"composite": "epsilon_plus"},
    "deeplift": {"baseline": "zero"},
    "gradient_shap": {"n_samples": 16},
}
FLOORS = {"lrp": "fwdbwd_once", "deeplift": "fwdbwd_b1", "gradient_shap": "fwdbwd_best"}


def oracles(module: torch.nn.Module, x: torch.Tensor, target: int) -> dict:
    import captum.attr as ca

    references = torch.zeros(1, *x.shape[1:])
    return {
        "deeplift": lambda: ca.DeepLift(module).attribute(x, baselines=0.0, target=target),
        "gradient_shap": lambda: ca.GradientShap(module).attribute(
            x, baselines=references, target=target, n_samples=16
        ),
    }


def main(argv: list[str]) -> int:
    return suite_main(argv, "relevance", FLOORS, SETTINGS, oracles, repeats=5)
