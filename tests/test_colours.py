"""One colour language: red = for the explained class, blue = against, everywhere; unsigned maps
read like the positive half of signed ones; no outline where a map crosses zero; colour bars
whose ends say what they stand for; raw gradient pictures; speckle detection."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

import convlens as cl
from convlens import viz
from convlens.explanation import Explanation, sign_changes

LUMA = np.array([0.299, 0.587, 0.114])


def pixels(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture.convert("RGB")).astype(np.float64)


def grey_photo(h: int, w: int, level: int = 128) -> np.ndarray:
    return np.full((h, w, 3), level, dtype=np.uint8)


def test_signed_maps_are_red_for_and_blue_against_with_neutral_zero():
    heat = np.linspace(-1, 1, 201).reshape(1, -1)
    colours = viz.colorize(heat).astype(int)[0]
    assert (colours[-20:, 0] > colours[-20:, 2] + 30).all()  # strong positive: red
    assert (colours[:20, 2] > colours[:20, 0] + 30).all()  # strong negative: blue
    r, g, b = colours[100]
    assert min(r, g, b) > 235 and max(r, g, b) - min(r, g, b) < 5  # zero: near white, no hue
    shown = pixels(viz.overlay(grey_photo(1, 201), heat))[0]
    assert (shown[-20:, 0] > shown[-20:, 2] + 20).all() and (
        shown[:20, 2] > shown[:20, 0] + 20
    ).all()


def test_unsigned_map_is_the_positive_half_of_the_signed_one():
    u = np.linspace(0, 1, 101)
    half = colormaps[viz.SIGNED_CMAP](0.5 + u / 2)
    np.testing.assert_allclose(colormaps[viz.UNSIGNED_CMAP](u), half, atol=2 / 255)
    # a signed CAM-like map and its ReLU (Grad-CAM of a GAP network) look the same where > 0
    yy, xx = np.mgrid[:64, :64] / 63.0
    cam = np.exp(-((xx - 0.3) ** 2 + (yy - 0.4) ** 2) / 0.02) - 0.4 * np.exp(
        -((xx - 0.75) ** 2 + (yy - 0.7) ** 2) / 0.02
    )
    photo = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    signed, relu = pixels(viz.overlay(photo, cam)), pixels(viz.overlay(photo, np.maximum(cam, 0)))
    positive = cam > 0.01
    assert np.abs(signed - relu)[positive].max() <= 2
    assert (signed[cam < -0.1][:, 2] > signed[cam < -0.1][:, 0]).all()  # the ReLU drops the blue


def test_cam_and_gradcam_of_the_bundled_model_look_alike(bundled, photos):
    cam = cl.explain(bundled, photos["chelsea"], "cam")
    gradcam = cl.explain(bundled, photos["chelsea"], "gradcam")
    a, b = pixels(cam.overlay()), pixels(gradcam.overlay())
    assert np.abs(a - b).mean() < 3
    strongest = np.unravel_index(int(gradcam.heatmap()[0].argmax()), a.shape[:2])
    for shown in (a[strongest], b[strongest]):  # dark red (the map's end times the photo)
        assert shown[0] > 1.5 * shown[2] and shown[0] > 1.5 * shown[1]


def ring_contrast(photo: np.ndarray, heat: np.ndarray, band: int = 3) -> float:
    """How much darker the overlay is along zero crossings than ``band`` pixels beside them,
    both relative to the overlay of a zero map (the photo as drawn where there is no evidence):
    mean ratio beside minus mean ratio on the crossing. A dark outline makes it positive."""
    plain = pixels(viz.overlay(photo, np.zeros(heat.shape))) @ LUMA
    ratio = (pixels(viz.overlay(photo, heat)) @ LUMA) / np.maximum(plain, 1)
    sign = np.sign(heat)
    crossing = np.zeros(heat.shape, bool)
    crossing[:, 1:] |= sign[:, 1:] != sign[:, :-1]
    crossing[1:] |= sign[1:] != sign[:-1]
    near = np.zeros_like(crossing)
    for shift in range(-band, band + 1):
        near |= np.roll(np.roll(crossing, shift, 0), shift, 1)
        near |= np.roll(np.roll(crossing, shift, 0), -shift, 1)
    beside = near & ~crossing & (np.abs(heat) < 0.5 * np.abs(heat).max())
    return float(ratio[beside].mean() - ratio[crossing].mean())


def test_no_dark_outline_where_a_signed_map_crosses_zero(photos):
    """The old blend (photo dimmed, colour weight sqrt|v|, bwr) drew the zero line darker than
    both sides: on a grey photo a ramp's crossing column was a brightness minimum."""
    ramp = np.tile(np.linspace(-1, 1, 81), (8, 1))
    row = pixels(viz.overlay(grey_photo(8, 81), ramp))[4] @ LUMA
    centre = row[40]
    assert centre >= row[30:51].max() - 0.5  # the crossing is not darker than its neighbours
    assert (np.diff(row[40:]) <= 0.5).all() and (np.diff(row[:41]) >= -0.5).all()  # monotone
    photo = np.asarray(photos["chelsea"].convert("RGB").resize((128, 128)))
    yy, xx = np.mgrid[:128, :128]
    waves = np.sin(xx / 9.0) * np.cos(yy / 13.0)
    assert ring_contrast(photo, waves) < 0  # beside the crossing darker, not the crossing


def test_superpixel_picture_uses_the_same_red_and_blue(bundled, photos):
    e = cl.explain(bundled, photos["coffee"], "lime", n_samples=48)
    info = e.extras["superpixels"][0]
    weights, segments = np.asarray(info["weights"]), np.asarray(info["segments"])
    scale = np.abs(weights).max()
    overlay, picture = pixels(e.overlay()), pixels(e.superpixels(k=3))
    order = np.argsort(weights)
    positive = [j for j in order[::-1][:3] if weights[j] > 0.2 * scale]
    negative = [j for j in order[:3] if weights[j] < -0.2 * scale]
    assert positive and negative
    red, blue = np.array(viz.POSITIVE), np.array(viz.NEGATIVE)
    assert red[0] > red[2] + 100 and blue[2] > blue[0] + 100
    for j in positive:
        region = segments == j
        assert overlay[region][:, 0].mean() > overlay[region][:, 2].mean()  # red in the map
        assert (picture[region] == red).all(axis=1).any()  # red outline in the picture
        assert not (picture[region] == blue).all(axis=1).any()
    for j in negative:
        region = segments == j
        assert overlay[region][:, 2].mean() > overlay[region][:, 0].mean()  # blue in the map
        assert (picture[region] == blue).all(axis=1).any()  # blue outline in the picture
        assert not (picture[region] == red).all(axis=1).any()


@pytest.mark.parametrize(
    "heat",
    [
        np.linspace(-0.3, 2.0, 400).reshape(20, 20),  # signed
        0.8 + 0.2 * np.linspace(0, 1, 400).reshape(20, 20) ** 2,  # unsigned, RISE-like
        -np.linspace(0.1, 1.0, 400).reshape(20, 20),  # all negative: drawn from its maximum
    ],
)
def test_map_range_ends_are_where_normalize_saturates(heat):
    low, high, signed = viz.map_range(heat)
    scaled, signed_too = viz.normalize(heat)
    assert signed == signed_too
    if signed:
        assert low == -high
        np.testing.assert_allclose(scaled, np.clip(heat / high, -1, 1))
    else:
        np.testing.assert_allclose(scaled, np.clip((heat - low) / (high - low), 0, 1))
    ends = viz.normalize(np.concatenate([heat.ravel(), [low, high]]))[0][-2:]
    assert ends[0] == pytest.approx(-1.0 if signed else 0.0, abs=0.02)
    assert ends[1] == pytest.approx(1.0, abs=0.02)


def test_colour_bar_css_is_the_map_as_drawn():
    for signed in (True, False):
        css = viz.colour_bar_css(signed)
        assert css.startswith("linear-gradient(to right,")
        stops = [tuple(map(int, s)) for s in re.findall(r"rgb\((\d+), (\d+), (\d+)\)", css)]
        assert len(stops) >= 9
        drawn = viz.colorize(np.linspace(-1 if signed else 0, 1, len(stops)).reshape(1, -1))[0]
        np.testing.assert_allclose(np.array(stops), drawn, atol=1)
        assert stops[-1][0] > stops[-1][2] + 50  # red at the right end
        left = stops[0]
        assert left[2] > left[0] + 50 if signed else min(left) > 235  # blue, or neutral


def test_views_abs_and_smooth():
    rng = np.random.default_rng(0)
    speckle = rng.normal(size=(100, 100)) + np.where(np.arange(100) < 50, 0.5, -0.5)
    photo = grey_photo(100, 100)
    magnitude = pixels(viz.overlay(photo, speckle, view="abs"))
    assert (magnitude[..., 0] >= magnitude[..., 2]).all()  # |map|: no blue anywhere
    smooth = viz.view_map(speckle, "smooth")
    assert sign_changes(speckle) > 0.3 and sign_changes(smooth) < 0.05
    assert smooth[:, :40].mean() > 0 > smooth[:, 60:].mean()  # the sign of regions survives
    np.testing.assert_array_equal(
        np.asarray(viz.overlay(photo, speckle, 0.5, viz.SIGNED_CMAP)),  # old positional form
        np.asarray(viz.overlay(photo, speckle, alpha=0.5, cmap=viz.SIGNED_CMAP, view="signed")),
    )
    with pytest.raises(ValueError, match="unknown view"):
        viz.overlay(photo, speckle, view="blurred")


def test_raw_picture_centres_at_grey_and_shares_one_scale():
    a = np.zeros((3, 2, 2))
    a[0, 0, 0], a[1, 0, 1], a[2, 1, 0], a[0, 1, 1] = 2.0, -2.0, 1.0, -0.5
    out = np.asarray(viz.raw_picture(a, percentile=100)).astype(int)
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [255, 128, 128]  # +max -> 1, zero -> mid grey (127.5)
    assert out[0, 1].tolist() == [128, 0, 128]  # -max -> 0
    assert out[1, 0].tolist() == [128, 128, 191]  # half the max: 0.75, the same scale
    assert out[1, 1].tolist() == [96, 128, 128]  # 0.5 - 0.125
    outlier = np.full((3, 20, 20), 0.1)
    outlier[0, 0, 0] = 100.0
    clipped = np.asarray(viz.raw_picture(outlier)).astype(int)  # scale: the 99.5th percentile
    assert clipped[0, 0, 0] == 255 and clipped[5, 5].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        viz.raw_picture(np.zeros((1, 4, 4)))


def test_explanation_raw_picture_needs_input_channels(bundled, photos):
    e = cl.explain(bundled, photos["rocket"], "guided_backprop")
    raw = e.raw_picture()
    assert raw.size == (224, 224) and raw.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(viz.raw_picture(e.attribution[0])))
    with pytest.raises(ValueError, match="input-channel attribution"):
        cl.explain(bundled, photos["rocket"], "gradcam").raw_picture()
    with pytest.raises(IndexError):
        e.raw_picture(1)


def test_speckled_separates_pixel_level_signed_maps_from_region_maps(bundled, photos):
    photo = photos["chelsea"]
    speckle = {"integrated_gradients": {"steps": 8}, "input_x_gradient": {}, "deeplift": {}}
    regions = {"gradcam": {}, "rise": {"n_masks": 32}, "occlusion": {"window": 56, "stride": 56}}
    for method, params in {**speckle, **regions}.items():
        e = cl.explain(bundled, photo, method, **params)
        assert e.speckled() == (method in speckle), (method, sign_changes(e.heatmap()[0].numpy()))


def test_explanation_overlay_views():
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    heat = torch.sin(xx / 2) * torch.cos(yy / 3)
    e = Explanation(
        attribution=heat[None, None],
        method="made_up",
        targets=[0],
        layer=None,
        params={},
        seconds=0.0,
        forwards=0,
        inputs=torch.zeros(1, 3, 16, 16),
        display=grey_photo(16, 16)[None],
    )
    for view in viz.VIEWS:
        expected = viz.overlay(grey_photo(16, 16), heat.numpy(), alpha=0.6, view=view)
        np.testing.assert_array_equal(np.asarray(e.overlay(0, 0.6, view)), np.asarray(expected))
