"""The synthetic shapes data set, the bundled shapes CNN and the `convlens evaluate` benchmark."""

from __future__ import annotations

import json

import pytest
import torch

import convlens as cl
from convlens.cli import main
from convlens.datasets import SHAPES, shapes
from convlens.metrics.benchmark import model_accuracy


def test_shapes_are_reproducible_and_boxes_fit_the_masks():
    data = shapes(12, seed=5)
    again = shapes(12, seed=5)
    assert torch.equal(data.images, again.images) and torch.equal(data.boxes, again.boxes)
    assert not torch.equal(shapes(12, seed=6).images, data.images)
    assert data.images.shape == (12, 3, 64, 64) and data.masks.shape == (12, 64, 64)
    assert data.images.min() >= 0 and data.images.max() <= 1
    assert data.labels.tolist() == [i % 4 for i in range(12)] and data.classes == SHAPES
    for mask, (x0, y0, x1, y1) in zip(data.masks, data.boxes.tolist(), strict=True):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert 12 <= max(x1 - x0, y1 - y0) <= 26  # shapes nearly fill their square


def test_shapes_refuse_impossible_settings():
    with pytest.raises(ValueError):
        shapes(4, size=20)


def test_the_bundled_shapes_cnn_knows_its_shapes():
    model = cl.load_model("shapes-cnn")
    assert model.labels == list(SHAPES) and model.input_size == (64, 64)
    assert model_accuracy(model, shapes(200, seed=1000)) >= 0.95


def test_evaluate_writes_a_table_with_known_answers(tmp_path, capsys):
    out = tmp_path / "evaluation"
    args = ["evaluate", "--methods", "gradcam,saliency", "--images", "8", "--out", str(out)]
    assert main([*args, "--sanity-images", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| gradcam |" in printed and "pointing game" in printed
    document = json.loads((out / "evaluation.json").read_text())
    rows = {row["method"]: row for row in document["rows"]}
    assert set(rows) == {"gradcam", "saliency"} and document["accuracy"] >= 0.9
    # Grad-CAM points at the object, which is all the class depends on.
    assert rows["gradcam"]["pointing"] >= 0.75 and rows["gradcam"]["energy"] > 0.3
    for row in rows.values():
        assert 0 <= row["deletion"] <= 1 and 0 <= row["insertion"] <= 1
        assert -1 <= row["sanity"] <= 1 and row["seconds"] > 0
    assert (out / "evaluation.md").read_text().startswith("| method |")


def test_evaluate_refuses_a_model_of_other_classes(capsys):
    assert main(["evaluate", "--model", "efficientnet-lite0", "--methods", "saliency"]) == 2
    assert "shapes classes" in capsys.readouterr().err
