"""The husky-and-wolf lesson (Ribeiro, Singh & Guestrin 2016, "Why should I trust you?", section
6.4): ``cl.datasets.snow`` plants a background cue, and the bundled ``snow-cnn``, trained where
95% of the wolves stand in snow, answers from the snow: right when the background agrees with
the class, wrong when it is swapped, and Grad-CAM's evidence for "wolf" lies on the snow, not on
the animal. A control model trained without the cue (``scripts/train_snow.py --cue-share 0.5
--epochs 16``) fails the evidence test: 47% of its Grad-CAM evidence lies inside the wolves,
which cover 4% of the image (measured once; the bundled model: 0.5%)."""

from __future__ import annotations

import pytest
import torch

import convlens as cl
from convlens.checks import RequestError
from convlens.datasets import SNOW_CLASSES, snow
from convlens.metrics.benchmark import model_accuracy, model_inputs


def test_snow_plants_the_background_cue_at_the_asked_share():
    data = snow(400, seed=4, cue_share=0.8)
    again = snow(400, seed=4, cue_share=0.8)
    assert torch.equal(data.images, again.images) and data.classes == SNOW_CLASSES
    assert data.labels[:4].tolist() == [0, 1, 0, 1]
    wolf = data.labels == SNOW_CLASSES.index("wolf")
    agrees = data.snowy == wolf  # wolves in snow, huskies on grass
    assert 0.74 < float(agrees.double().mean()) < 0.86  # 0.8, within 3 standard errors
    background = (~data.masks)[:, None].double()
    brightness = (data.images * background).sum(dim=(1, 2, 3)) / (3 * background.sum(dim=(1, 2, 3)))
    assert bool((brightness[data.snowy] > 0.8).all())
    assert bool((brightness[~data.snowy] < 0.3).all())
    assert bool(snow(50, cue_share=1.0).snowy.eq(snow(50, cue_share=1.0).labels == 1).all())
    with pytest.raises(RequestError, match="cue_share"):
        snow(4, cue_share=1.5)


def test_swap_changes_the_background_only():
    data, swapped = snow(40, seed=6), snow(40, seed=6, swap=True)
    assert torch.equal(swapped.snowy, ~data.snowy) and torch.equal(swapped.labels, data.labels)
    inside = data.masks[:, None].expand_as(data.images)
    assert torch.equal(data.images[inside], swapped.images[inside])  # the same animals
    assert not torch.equal(data.images[~inside], swapped.images[~inside])


@pytest.fixture(scope="module")
def model() -> cl.Model:
    return cl.load_model("snow-cnn")


def test_snow_cnn_answers_from_the_background(model):
    assert model.labels == list(SNOW_CLASSES) and model.name == "snow-cnn"
    consistent = snow(200, seed=5, cue_share=1.0)
    swapped = snow(200, seed=5, cue_share=1.0, swap=True)
    assert model_accuracy(model, consistent) >= 0.95
    assert model_accuracy(model, swapped) <= 0.2  # the same animals, mostly wrong


def test_gradcam_puts_the_wolf_evidence_on_the_snow(model):
    """For the cued class, the animal holds less of the evidence than of the image: the
    background holds more than its share (a model looking at the animal puts far more inside)."""
    data = snow(100, seed=5, cue_share=1.0)
    wolves = data.labels == SNOW_CLASSES.index("wolf")
    x = model_inputs(model, data)[wolves]
    heat = cl.explain(model, x, "gradcam", target="wolf", progress=False).heatmap().abs()
    masks = data.masks[wolves]
    inside = (heat * masks).sum(dim=(1, 2)) / heat.sum(dim=(1, 2))
    area = masks.double().mean(dim=(1, 2))
    assert float(inside.mean()) < float(area.mean())
    assert float((inside < area).double().mean()) >= 0.9  # image by image, almost always
