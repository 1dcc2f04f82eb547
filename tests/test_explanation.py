"""Explanation records: heat-map reductions, overlays, saving, and the progress bar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny, tiny_input
from PIL import Image

import convlens as cl
from convlens.explanation import REDUCTIONS


def test_heatmap_uses_the_methods_reduction(x):
    model = tiny()
    saliency = cl.explain(model, x, "saliency", absolute=False)
    torch.testing.assert_close(saliency.heatmap(), saliency.attribution.abs().amax(dim=1))
    ixg = cl.explain(model, x, "input_x_gradient")
    assert ixg.reduction == "sum"
    torch.testing.assert_close(ixg.heatmap(), ixg.attribution.sum(dim=1))
    assert set(REDUCTIONS) >= {"max_abs", "sum"}


def test_overlay_and_save(tmp_path):
    model = cl.wrap(tiny(), input_size=(8, 8))
    e = cl.explain(model, tiny_input(2), "saliency")
    picture = e.overlay(1)
    assert isinstance(picture, Image.Image) and picture.size == (8, 8)
    with pytest.raises(IndexError):
        e.overlay(2)
    e.save(tmp_path / "map.png")
    with Image.open(tmp_path / "map.png") as saved:
        assert saved.size[0] > 8  # two overlays side by side
    e.save(tmp_path / "map.pt")
    record = torch.load(tmp_path / "map.pt", weights_only=True)
    torch.testing.assert_close(record["attribution"], e.attribution)
    assert json.loads(record["summary"])["method"] == "saliency"
    with pytest.raises(ValueError, match=r"use \.png"):
        e.save(tmp_path / "map.txt")


def test_overlay_shows_the_evidence():
    model = cl.wrap(tiny(), input_size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1))
    x = torch.full((1, 3, 8, 8), 0.5)
    e = cl.explain(model, x, "saliency")
    heat = e.heatmap()[0]
    picture = torch.tensor(list(e.overlay().getdata()), dtype=torch.float32).view(8, 8, 3)
    changed = (picture - 127.5).abs().sum(-1)  # distance from the grey input
    strongest, weakest = heat.argmax(), heat.argmin()
    assert changed.flatten()[strongest] > changed.flatten()[weakest]


def test_display_scaling_of_unsigned_and_signed_maps():
    from convlens.viz import normalize

    ramp = np.linspace(0, 1, 200).reshape(10, 20)
    scaled, signed = normalize(0.8 + 0.2 * ramp)  # a RISE-like map: all of it far above zero
    assert not signed and scaled.min() == 0 and scaled.max() == 1  # the full colour range
    np.testing.assert_allclose(normalize(0.8 + 0.2 * ramp)[0], normalize(ramp)[0])
    zero_floor, _ = normalize(ramp)  # a map starting at zero keeps its scale: heat / p99.5
    np.testing.assert_allclose(zero_floor, np.clip(ramp / np.percentile(ramp, 99.5), 0, 1))
    scaled, signed = normalize(ramp - 0.25)  # signed: symmetric around zero
    assert signed and scaled.min() < 0 and scaled[0, 0] == pytest.approx(-0.25 / 0.75, rel=1e-2)
    assert normalize(np.zeros((3, 3)))[0].max() == 0


def test_explanation_is_immutable_and_readable(x):
    e = cl.explain(tiny(), x, "saliency")
    with pytest.raises(AttributeError):
        e.method = "other"
    assert "saliency" in repr(e) and "forwards=5" in repr(e)  # 3 + the layout probe
    assert e.summary()["params"] == {"absolute": True, "batch_size": 8}


def test_progress_bar_shows_when_asked(capsys):
    cl.explain(tiny(), tiny_input(1), "integrated_gradients", steps=8, progress=True)
    assert "integrated_gradients" in capsys.readouterr().err
    cl.explain(tiny(), tiny_input(1), "integrated_gradients", steps=8, progress=False)
    assert capsys.readouterr().err == ""
