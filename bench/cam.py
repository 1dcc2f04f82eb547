"""CAM family on the bundled EfficientNet-Lite0 at 224x224 (layer: the 7x7x1280 head).

    python -m bench cam [--repeats 3] [--methods NAME,...]
    python -m bench cam --ablation [--model lite0,resnet50] [--size 224] [--today 1]

Floors, measured in this run: gradient CAMs against one forward+backward at batch 1 per pass;
CAM and Eigen-CAM against one forward at batch 1; Score-CAM (1281 forwards) against its image
count divided by the bare model's best forward throughput over batch sizes 1 to 64. captum's
LayerGradCam and GuidedGradCam run on the same work.

Ablation-CAM has its own table (``--ablation``; run after the suite when the suite runs it):
its floor stays what one full forward per channel costs (1 + K images at the best of batch
sizes 8, 16, 32), while it now runs the network from the layer on, so the engine's count of
forwards no longer measures its work. Per model (the bundled model's head, or a ResNet-50-like
network with random weights at its ``layer4``, 7x7x2048 at 224 px): seconds from the layer on
(median of ``--repeats``), seconds with today's full passes forced (``--today`` runs), their
ratio, both against the floor, and pytorch-grad-cam's AblationCAM where it imports.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any

import torch
import torch.nn.functional as F

import convlens as cl
from convlens.methods.cam import AblationCAM

from .common import (
    best_of,
    device,
    forward,
    frozen_parameters,
    kept,
    setup,
    suite_main,
    table,
    throughput,
    timed,
)
from .resnet import resnet50

SETTINGS: dict = {}
FLOORS = {name: "fwdbwd_b1" for name in cl.list_methods("cam")} | {
    "cam": "fwd_b1",
    "eigencam": "fwd_b1",
    "scorecam": "fwd_best",
    "ablationcam": "fwd_best",
}
FLOOR_BATCHES = (8, 16, 32)


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


def ablation_model(name: str, size: int) -> tuple[Any, torch.Tensor, int, str]:
    """The model, the chelsea photo at ``size`` px, its predicted class, the layer's name."""
    model, x, _ = setup()
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    layer = "_swish"
    if name == "resnet50":
        model, layer = resnet50().to(device()), "layer4"
    module = getattr(model, "module", model)
    with torch.no_grad():
        target = int(module(x).argmax())
    return model, x, target, layer


def grad_cam_oracle(module: torch.nn.Module, layer: str, x: torch.Tensor, target: int) -> Any:
    """pytorch-grad-cam's AblationCAM on the same work, or why it does not import here."""
    try:
        from pytorch_grad_cam import AblationCAM as TheirAblationCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except Exception as error:  # not installed, or its imports (torchvision, cv2, ttach) fail
        return f"{type(error).__name__}: {error}"
    cam = TheirAblationCAM(model=module, target_layers=[module.get_submodule(layer)])
    return lambda: cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])


def channels(module: torch.nn.Module, layer: str, x: torch.Tensor) -> int:
    """Channels of the layer's output (at its last call)."""
    seen: list[int] = []
    handle = module.get_submodule(layer).register_forward_hook(
        lambda m, i, o: seen.append(o.shape[1])
    )
    try:
        forward(module, x)
    finally:
        handle.remove()
    return seen[-1]


def ablation_table(models: list[str], size: int, repeats: int, today: int) -> list[dict]:
    rows = []
    for name in models:
        model, x, target, layer = ablation_model(name, size)
        bare = copy.deepcopy(getattr(model, "module", model)).eval()
        frozen_parameters(bare)

        def ours(full: bool = False, model: Any = model, x: Any = x, target: int = target) -> Any:
            AblationCAM._full_passes = full
            try:
                return cl.explain(model, x, "ablationcam", target=target, progress=False)
            finally:
                AblationCAM._full_passes = False

        curve = kept(lambda bare=bare, x=x: throughput(forward, bare, x, FLOOR_BATCHES))()
        explanation = ours()  # warm-up; the first call on a model also probes it
        fast, explanation = timed(ours, repeats, warm=False)
        slow, forced = timed(lambda: ours(full=True), today, warm=False)
        oracle, theirs = grad_cam_oracle(bare, layer, x, target), None
        if callable(oracle):
            try:
                theirs = timed(oracle, today, warm=False)[0]
            except Exception as error:  # it runs, but not on this model
                oracle = f"{type(error).__name__}: {error}"
        after = kept(lambda bare=bare, x=x: throughput(forward, bare, x, FLOOR_BATCHES))()
        curve = best_of(curve, after)
        k = channels(bare, layer, x)
        floor = (1 + k) / max(curve.values())
        relative = (explanation.attribution - forced.attribution).abs().max()
        rows.append(
            {
                "model": f"{name} {layer} ({k} ch) {size}px",
                "new_s": fast,
                "today_s": slow,
                "speedup": slow / fast,
                "floor_s": floor,
                "new_ratio": fast / floor,
                "today_ratio": slow / floor,
                "forwards": f"{explanation.forwards} vs {forced.forwards}",
                "max_rel_diff": f"{float(relative / forced.attribution.abs().max()):.1e}",
                "grad_cam_s": theirs if theirs is not None else "-",
                "ablation": explanation.resolved["ablation"],
            }
        )
        if not callable(oracle):
            print(f"pytorch-grad-cam not run: {oracle}")
        print(
            f"{name}: fwd images/s by batch size (best of before and after): "
            + ", ".join(f"{b}: {r:.1f}" for b, r in curve.items())
        )
    print()
    print(table(rows, list(rows[0])))
    print(
        "\nnew = Ablation-CAM from the layer on (median of --repeats); today = one full forward "
        "per channel, forced (median of --today runs); floor = (1 + channels) images at the "
        f"best of batch sizes {FLOOR_BATCHES}, bare model, forward only; forwards = images that "
        "entered the model (the probe included); max_rel_diff = largest |new - today| over the "
        "largest |today|"
    )
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cam", add_help=False)
    parser.add_argument("--ablation", action="store_true", help="only the Ablation-CAM table")
    parser.add_argument("--model", default="lite0,resnet50", help="lite0 and/or resnet50")
    parser.add_argument("--size", type=int, default=224, help="input side for --ablation")
    parser.add_argument("--today", type=int, default=1, help="runs of today's full passes")
    args, rest = parser.parse_known_args(argv)
    repeats = 3
    if "--repeats" in rest:
        repeats = int(rest[rest.index("--repeats") + 1])
    if "--device" in rest:
        os.environ["CONVLENS_BENCH_DEVICE"] = rest[rest.index("--device") + 1]
    asked = rest[rest.index("--methods") + 1].split(",") if "--methods" in rest else None
    ablation = args.ablation or asked is None or "ablationcam" in asked
    if not args.ablation:
        others = [m for m in (asked or cl.list_methods("cam")) if m != "ablationcam"]
        if others:
            if "--methods" in rest:
                rest[rest.index("--methods") + 1] = ",".join(others)
            else:
                rest += ["--methods", ",".join(others)]
            suite_main(rest, "cam", FLOORS, SETTINGS, oracles, repeats=3)
    if ablation:
        print("\nAblation-CAM")
        ablation_table(args.model.split(","), args.size, repeats, args.today)
    return 0
