"""Perturbation methods on the bundled EfficientNet-Lite0 at 224x224.

    python -m bench perturbation [--repeats 3]

Floor: each method's forward count divided by the bare model's best forward throughput over
batch sizes 1 to 64, measured in this run. Oracles on the same work: captum's Occlusion (same
window, stride and baseline) and the lime package's ``explain_instance`` at its defaults
(1000 samples, batch 10, top 5 labels) on the same image and quickshift segmentation.
"""

from __future__ import annotations

import numpy as np
import torch

import convlens as cl
from convlens.images import to_pictures
from convlens.methods.perturbation import superpixels
from convlens.zoo import LITE_MEAN, LITE_STD

from .common import suite_main

SETTINGS = {
    "occlusion": {"window": 32, "stride": 16},
    "rise": {"n_masks": 8000},
    "lime": {"n_samples": 1000, "segmentation": "quickshift"},
    "kernel_shap": {"n_samples": 1000, "segmentation": "quickshift"},
    "meaningful_perturbation": {"steps": 300},
    # anchors' search stops at its threshold or n_samples; the demo's settings keep it short
    "anchors": {"n_segments": 12, "n_samples": 2000},
}
# meaningful perturbation optimises one image: one forward+backward at batch 1 per step
FLOORS = {name: "fwd_best" for name in cl.list_methods("perturbation")} | {
    "meaningful_perturbation": "fwdbwd_b1"
}


def oracles(module: torch.nn.Module, x: torch.Tensor, target: int) -> dict:
    import captum.attr as ca
    from lime import lime_image

    picture = to_pictures(x, LITE_MEAN, LITE_STD)[0]
    segments = superpixels(picture, "quickshift", 50).numpy()
    mean = torch.tensor(LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(LITE_STD).view(1, 3, 1, 1)

    def classifier(images: np.ndarray) -> np.ndarray:
        batch = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255
        with torch.no_grad():
            return module((batch - mean) / std).softmax(-1).numpy()

    def lime_package() -> object:
        explainer = lime_image.LimeImageExplainer(random_state=0)
        return explainer.explain_instance(
            picture, classifier, hide_color=None, segmentation_fn=lambda _: segments
        )

    return {
        "occlusion": lambda: ca.Occlusion(module).attribute(
            x, sliding_window_shapes=(3, 32, 32), strides=(3, 16, 16), baselines=0, target=target
        ),
        "lime": lime_package,
    }


def main(argv: list[str]) -> int:
    return suite_main(argv, "perturbation", FLOORS, SETTINGS, oracles, repeats=3)
