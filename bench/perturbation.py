"""Perturbation methods on the bundled EfficientNet-Lite0 at 224x224.

    python -m bench perturbation [--repeats 3] [--incremental-only]

Floor: each method's forward count divided by the bare model's best forward throughput over
batch sizes 1 to 64, measured in this run. Oracles on the same work: captum's Occlusion (same
window, stride and baseline) and the lime package's ``explain_instance`` at its defaults
(1000 samples, batch 10, top 5 labels) on the same image and quickshift segmentation.

Then incremental occlusion (``convlens.incremental``, Nakandala et al. 2019) against plain
occlusion (every occluded copy through the whole model, ``Occlusion._incremental = False``), timed
in turn in one run: the bundled model at 224 px with window 32 / stride 16 and 16 / 8, and
narrow 224-px versions of other architectures (random weights: the speed-up depends on the
layers, not on the weights). ``--incremental-only`` runs only this part. Then the approximate
mode (``approximate=tau``, the paper's projective-field thresholding) on the bundled model at
a few thresholds, timed in turn with plain occlusion, with the map's error against plain's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import convlens as cl
from convlens.images import to_pictures
from convlens.methods.perturbation import Occlusion, superpixels
from convlens.zoo import LITE_MEAN, LITE_STD

from .common import setup, suite_main

SETTINGS = {
    # the logit, as captum's Occlusion (the oracle) scores: the same work
    "occlusion": {"window": 32, "stride": 16, "score": "logit"},
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


def vgg11() -> nn.Module:
    """VGG-11's layout (Simonyan & Zisserman 2015) at a quarter of its widths."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, int(width), 3, padding=1), nn.ReLU(inplace=True)]
            channels = int(width)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 1000))


class Basic(nn.Module):
    """ResNet's basic block (He et al. 2016)."""

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, width, 3, stride, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = (
            nn.Sequential(nn.Conv2d(inputs, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            if stride != 1 or inputs != width
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.down(x))


def resnet18() -> nn.Module:
    """ResNet-18's layout at a quarter of its widths."""
    stem = [nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1)]  # fmt: skip
    blocks, inputs = [], 16
    for width, stride in ((16, 1), (32, 2), (64, 2), (128, 2)):
        blocks += [Basic(inputs, width, stride), Basic(width, width, 1)]
        inputs = width
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 1000)]
    return nn.Sequential(*stem, *blocks, *head)


def in_turn(fns: list[Callable[[], Any]], repeats: int) -> tuple[list[float], list[float], Any]:
    """Median wall-clock and process CPU seconds of each function, timed in turn after a
    warm-up of each, and the first one's last result. On a machine shared with other
    processes the CPU seconds of this single-threaded process are the steadier figure."""
    result = next(fn() for fn in fns)
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start, start_cpu = time.perf_counter(), time.process_time()
            value = fn()
            wall[k].append(time.perf_counter() - start)
            cpu[k].append(time.process_time() - start_cpu)
            result = value if k == 0 else result
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu], result


def incremental(repeats: int) -> None:
    """Plain against incremental occlusion, timed in turn; the maps must agree."""
    model, x, target = setup()
    lite = "EfficientNet-Lite0 (bundled)"
    cases = [(lite, model, 32, 16), (lite, model, 16, 8)]
    for name, make in (("VGG-11, 1/4 width", vgg11), ("ResNet-18, 1/4 width", resnet18)):
        torch.manual_seed(0)
        cases.append((name, make().eval(), 32, 16))
    print(f"\nincremental against plain occlusion (probability score), one image, median of "
          f"{repeats} timed in turn; wall-clock seconds (CPU seconds of this process)")  # fmt: skip
    print("| model | window / stride | positions | plain s | incremental s | speed-up | "
          "max rel. difference | localised up to |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, net, window, stride in cases:

        def run(fast: bool, net: Any = net, window: int = window, stride: int = stride) -> Any:
            Occlusion._incremental = fast
            try:
                return cl.explain(net, x, "occlusion", target=target, window=window,
                                  stride=stride, progress=False)  # fmt: skip
            finally:
                Occlusion._incremental = True

        (fast, plain), (fast_cpu, plain_cpu), result = in_turn(
            [lambda: run(True), lambda: run(False)], repeats
        )
        reference = run(False).attribution
        difference = (result.attribution - reference).abs().max() / reference.abs().max()
        record = result.resolved["incremental"]
        where = record["localised up to"] if isinstance(record, dict) else record
        print(f"| {name} | {window} / {stride} | {result.forwards - 1} | {plain:.2f} "
              f"({plain_cpu:.2f}) | {fast:.2f} ({fast_cpu:.2f}) | {plain / fast:.2f}x "
              f"({plain_cpu / fast_cpu:.2f}x) | {difference:.1e} | {where} |",
              flush=True)  # fmt: skip


TAUS = (0.4, 0.5, 0.6, 0.7, 0.75)


def cells(attribution: torch.Tensor, stride: int) -> torch.Tensor:
    """The map averaged over stride x stride cells, flattened (the positions' grid)."""
    return torch.nn.functional.avg_pool2d(attribution[:1], stride).flatten()


def approximate(repeats: int) -> None:
    """Approximate incremental occlusion (``approximate=tau``) against plain occlusion on the
    bundled model, timed in turn, and its error: Pearson's r of the maps, the largest
    difference over the largest plain value, the top-5 stride cells shared."""
    model, x, target = setup()
    print(f"\napproximate against plain occlusion (probability score), EfficientNet-Lite0 "
          f"(bundled), 224 px, one image, median of {repeats} timed in turn; wall-clock "
          f"seconds (CPU seconds of this process)")  # fmt: skip
    print("| window / stride | tau | seconds | speed-up | Pearson r | max diff / max | "
          "top-5 cells shared | localised up to |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for window, stride in ((32, 16), (16, 8)):

        def run(tau: float | None, fast: bool = True, window: int = window,
                stride: int = stride) -> Any:  # fmt: skip
            Occlusion._incremental = fast
            try:
                return cl.explain(model, x, "occlusion", target=target, window=window,
                                  stride=stride, approximate=tau, progress=False)  # fmt: skip
            finally:
                Occlusion._incremental = True

        taus, results = (None, *TAUS), {}

        def keep(tau: float | None, results: dict = results) -> Any:
            results[tau] = run(tau)
            return results[tau]

        fns = [lambda: run(None, False)] + [lambda tau=tau: keep(tau) for tau in taus]
        wall, cpu, plain = in_turn(fns, repeats)
        print(f"| {window} / {stride} | plain | {wall[0]:.2f} ({cpu[0]:.2f}) | 1 | 1 | 0 | 5/5 | "
              "- |", flush=True)  # fmt: skip
        reference = plain.attribution
        top = set(cells(reference, stride).topk(5).indices.tolist())
        for k, tau in enumerate(taus, start=1):
            result = results[tau]
            a, b = result.attribution.flatten(), reference.flatten()
            r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
            worst = float((a - b).abs().max() / b.abs().max())
            shared = len(top & set(cells(result.attribution, stride).topk(5).indices.tolist()))
            record = result.resolved["incremental"]
            where = record["localised up to"] if isinstance(record, dict) else record
            print(f"| {window} / {stride} | {'exact' if tau is None else tau} | {wall[k]:.2f} "
                  f"({cpu[k]:.2f}) | {wall[0] / wall[k]:.2f}x ({cpu[0] / cpu[k]:.2f}x) | "
                  f"{r:.4f} | {worst:.3f} | {shared}/5 | {where} |", flush=True)  # fmt: skip


def main(argv: list[str]) -> int:
    repeats = 2
    if "--incremental-only" in argv:
        argv = [a for a in argv if a != "--incremental-only"]
        if "--repeats" in argv:
            repeats = int(argv[argv.index("--repeats") + 1])
        incremental(repeats)
        approximate(repeats)
        return 0
    code = suite_main(argv, "perturbation", FLOORS, SETTINGS, oracles, repeats=3)
    incremental(repeats)
    approximate(repeats)
    return code
