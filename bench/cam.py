"""CAM family on the bundled EfficientNet-Lite0 at 224x224 (layer: the 7x7x1280 head).

    python -m bench cam [--repeats 3]

Floors, measured in this run: gradient CAMs against one forward+backward at batch 1 per pass;
CAM and Eigen-CAM against one forward at batch 1; Score-CAM and Ablation-CAM (1281 forwards
each) against their image count divided by the bare model's best forward throughput over
batch sizes 1 to 64. captum's LayerGradCam and GuidedGradCam run on the same work.
"""

from __future__ import annotations

import torch

import convlens as cl

from .common import suite_main

SETTINGS: dict = {}
FLOORS = {name: "fwdbwd_b1" for name in cl.list_methods("cam")} | {
    "cam": "fwd_b1",
    "eigencam": "fwd_b1",
    "scorecam": "fwd_best",
    "ablationcam": "fwd_best",
}


def oracles(module: torch.nn.Module, x: torch.Tensor, target: int) -> dict:
    import captum.attr as ca

    layer = module._swish  # the bundled model's head activation (its last call)

    def gradcam() -> torch.Tensor:
        maps = ca.LayerGradCam(module, layer).attribute(x, target=target, relu_attributions=True)
        return ca.LayerAttribution.interpolate(maps, x.shape[-2:], interpolate_mode="bilinear")

    return {
        "gradcam": gradcam,
        "guided_gradcam": lambda: ca.GuidedGradCam(module, layer).attribute(
            x, target=target, interpolate_mode="bilinear"
        ),
    }


def main(argv: list[str]) -> int:
    return suite_main(argv, "cam", FLOORS, SETTINGS, oracles, repeats=3)
