"""Evaluation metrics against hand-computed values on analytic models and hand-made maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import probe, tiny, tiny_input
from torch import nn

import convlens as cl
from convlens import metrics


class PixelSum(nn.Module):
    """Logit 0 = sum of all pixels (all channels); logit 1 = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.sum(dim=(1, 2, 3))
        return torch.stack([total, torch.zeros_like(total)], dim=1)


def trapezoid(values: list[float], fractions: list[float]) -> float:
    return sum(
        (fractions[k + 1] - fractions[k]) * (values[k] + values[k + 1]) / 2
        for k in range(len(values) - 1)
    )


# a 1-channel 2x2 image and a map ranking its pixels: 4 > 1 > 3 > 2 (raster order 0..3)
IMAGE = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
MAP = torch.tensor([[[4.0, 1.0], [3.0, 2.0]]])  # order of removal: pixel 0, 2, 3, 1


def test_deletion_and_insertion_on_a_pixel_sum_are_exact():
    # deletion to zero, one pixel per step: sums 10, 9 (-1), 6 (-3), 2 (-4), 0 (-2)
    model = PixelSum()
    probed = probe(model, IMAGE)
    d = metrics.deletion(model, IMAGE, MAP, target=0, steps=4, score="logit")
    assert d.fractions.tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert d.scores[0].tolist() == [10, 9, 6, 2, 0]
    assert d.auc[0].item() == pytest.approx(trapezoid([10, 9, 6, 2, 0], [0, 0.25, 0.5, 0.75, 1]))
    assert d.auc[0].item() == pytest.approx(0.25 * (9.5 + 7.5 + 4 + 1))
    assert d.forwards == probed + 5
    # insertion on a constant canvas of 0.5: 2, 2.5 (+1-.5), 5 (+3-.5), 8.5 (+4-.5), 10
    i = metrics.insertion(PixelSum(), IMAGE, MAP, target=0, steps=4, baseline=0.5, score="logit")
    assert i.scores[0].tolist() == [2, 2.5, 5, 8.5, 10]
    assert i.auc[0].item() == pytest.approx(trapezoid([2, 2.5, 5, 8.5, 10], i.fractions.tolist()))


def test_deletion_steps_remove_rounded_shares_of_pixels():
    # 2 steps on 4 pixels: 0, 2, 4 pixels removed
    d = metrics.deletion(PixelSum(), IMAGE, MAP, target=0, steps=2, score="logit")
    assert d.scores[0].tolist() == [10, 6, 0]
    with pytest.raises(ValueError, match="cannot exceed"):
        metrics.deletion(PixelSum(), IMAGE, MAP, target=0, steps=5)


def test_curves_do_not_depend_on_batch_size():
    model, x = tiny(), tiny_input(3)
    heat = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    for curve in (metrics.deletion, metrics.insertion):
        probed = probe(model, x)
        one = curve(model, x, heat, steps=16, batch_size=1)
        many = curve(model, x, heat, steps=16, batch_size=64)
        # the same numbers up to float rounding of batched matrix products
        torch.testing.assert_close(one.scores, many.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one.auc, many.auc, rtol=1e-5, atol=1e-6)
        # + the clean pass for the targets
        assert one.forwards - probed == many.forwards == 3 * 17 + 3
    one = metrics.region_perturbation(model, x, heat, patch=2, batch_size=1)
    many = metrics.region_perturbation(model, x, heat, patch=2, batch_size=64)
    torch.testing.assert_close(one.abpc, many.abpc, rtol=1e-5, atol=1e-6)


def test_a_map_that_finds_the_evidence_beats_its_reverse():
    model, x = PixelSum(), torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    good = x.sum(dim=1)  # the exact contribution of each pixel to the score
    for curve, better in ((metrics.deletion, torch.lt), (metrics.insertion, torch.gt)):
        ours = curve(model, x, good, target=0, steps=8, score="logit")
        reverse = curve(model, x, -good, target=0, steps=8, score="logit")
        assert better(ours.auc, reverse.auc).all()
    r = metrics.region_perturbation(model, x, good, target=0, patch=2, score="logit")
    assert (r.abpc > 0).all() and (r.aopc_morf > r.aopc_lerf).all()
    flipped = metrics.region_perturbation(model, x, -good, target=0, patch=2, score="logit")
    assert (flipped.abpc < 0).all()


def test_region_perturbation_follows_samek_on_a_pixel_sum():
    """Patches of 1x2 on a 1x4 image, replaced by zeros: MoRF removes 4+3 first."""
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]])
    heat = x[:, 0]
    r = metrics.region_perturbation(PixelSum(), x, heat, target=0, patch=2, baseline="zero",
                                    score="logit")  # fmt: skip
    assert r.morf.scores[0].tolist() == [10, 3, 0] and r.lerf.scores[0].tolist() == [10, 7, 0]
    assert r.aopc_morf[0].item() == pytest.approx((0 + 7 + 10) / 3)
    assert r.aopc_lerf[0].item() == pytest.approx((0 + 3 + 10) / 3)
    assert r.abpc[0].item() == pytest.approx((0 + 4 + 0) / 3)


def test_metrics_take_explanations_and_their_targets():
    model, x = tiny(), tiny_input(2)
    e = cl.explain(model, x, "gradcam", target=[1, 2])
    d = metrics.deletion(model, x, e, steps=4)
    assert d.targets == [1, 2] and d.forwards == 2 * 5  # targets known: no clean pass
    assert d.plot().size[0] > 100
    with pytest.raises(ValueError, match="do not match"):
        metrics.deletion(model, x[:1], e)
    with pytest.raises(ValueError, match="NaN"):
        metrics.deletion(model, x, torch.full((2, 8, 8), float("nan")))


# -- localization -----------------------------------------------------------------------------


def peak_at(y: int, x: int, size: int = 64) -> torch.Tensor:
    heat = torch.zeros(1, size, size)
    heat[0, y, x] = 1.0
    return heat


def test_pointing_game_counts_hits_within_15_pixels():
    box = [[20, 20, 30, 30]]  # pixels 20..29
    assert metrics.pointing_game(peak_at(25, 25), box).tolist() == [True]
    assert metrics.pointing_game(peak_at(25, 44), box).tolist() == [True]  # 15 px right of 29
    assert metrics.pointing_game(peak_at(25, 45), box).tolist() == [False]  # 16 px
    assert metrics.pointing_game(peak_at(29 + 11, 29 + 11), box).tolist() == [False]  # 15.6
    assert metrics.pointing_game(peak_at(29 + 10, 29 + 11), box).tolist() == [True]  # 14.9
    assert metrics.pointing_game(peak_at(25, 45), box, tolerance=0).tolist() == [False]
    several = [[[0, 0, 5, 5], [40, 20, 50, 30]]]  # any instance counts
    assert metrics.pointing_game(peak_at(25, 45), several, tolerance=0).tolist() == [True]


def test_energy_pointing_game_is_the_share_inside_the_box():
    heat = torch.zeros(1, 10, 10)
    heat[0, 2:4, 2:4] = 1.0  # 4 inside
    heat[0, 8, 8] = 4.0  # 4 outside
    heat[0, 0, 9] = -5.0  # negative values do not count
    share = metrics.energy_pointing_game(heat, torch.tensor([[2, 2, 4, 4]]))
    assert share.tolist() == [0.5]


def test_box_iou_and_localization_on_hand_made_maps():
    assert metrics.box_iou([0, 0, 10, 10], [5, 0, 15, 10]).item() == pytest.approx(50 / 150)
    assert metrics.box_iou([0, 0, 10, 10], [10, 10, 20, 20]).item() == 0
    heat = torch.zeros(2, 40, 40)
    heat[0, 10:20, 5:25] = 1.0  # the object
    heat[0, 30:32, 30:32] = 1.0  # a smaller blob: not the largest component
    heat[1, 0:8, 0:8] = 0.1  # below 15% of the maximum
    heat[1, 30:40, 30:40] = 1.0
    truth = torch.tensor([[5, 10, 25, 20], [0, 0, 20, 20]])
    result = metrics.localization(heat, truth)
    assert result.boxes.tolist() == [[5, 10, 25, 20], [30, 30, 40, 40]]
    assert result.iou.tolist() == [1.0, 0.0] and result.hit.tolist() == [True, False]
    assert result.hit_rate == 0.5 and result.threshold == 0.15
    lower = metrics.localization(heat[1:], truth[1:], threshold=0.05)
    assert lower.boxes.tolist() == [[30, 30, 40, 40]]  # the two blobs are not connected


def test_localization_threshold_follows_the_method():
    model, x = tiny(head="gap"), tiny_input(1)
    assert (
        metrics.localization(cl.explain(model, x, "cam", layer="act2"), [[0, 0, 8, 8]]).threshold
        == 0.20
    )
    assert metrics.localization(cl.explain(model, x, "gradcam"), [[0, 0, 8, 8]]).threshold == 0.15


def test_bad_boxes_are_refused():
    with pytest.raises(ValueError, match="x1 > x0"):
        metrics.pointing_game(peak_at(1, 1), [[5, 5, 5, 9]])
    with pytest.raises(ValueError, match="boxes for 2 images"):
        metrics.pointing_game(peak_at(1, 1), [[0, 0, 1, 1], [0, 0, 1, 1]])


def test_saliency_segmentation_grows_the_object_from_its_seeds():
    """Seeds: the 16 strongest pixels (the square's centre) and the weakest 30% (all outside).
    The rest of the square and of the ground is labelled by colour."""
    picture = np.full((1, 32, 32, 3), 30, dtype=np.uint8)
    picture[0, 8:24, 8:24] = (220, 200, 40)  # a yellow square on a dark ground
    heat = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.3
    heat[0, 8:24, 8:24] = 0.5
    heat[0, 14:18, 14:18] = 1.0
    mask = metrics.saliency_segmentation(heat, picture, foreground=1 - 16 / 1024)
    truth = torch.zeros(1, 32, 32, dtype=torch.bool)
    truth[0, 8:24, 8:24] = True
    assert (mask == truth).double().mean() > 0.98
    assert mask[0, 8:24, 8:24].sum() > 16 * 10  # grown far beyond its 16 seeds


# -- sanity ---------------------------------------------------------------------------------


def edges(model: cl.Model, x: torch.Tensor) -> torch.Tensor:
    """An edge detector: ignores the model entirely."""
    gray = x.mean(dim=1)
    dx = torch.zeros_like(gray)
    dy = torch.zeros_like(gray)
    dx[:, :, 1:] = gray[:, :, 1:] - gray[:, :, :-1]
    dy[:, 1:] = gray[:, 1:] - gray[:, :-1]
    return torch.hypot(dx, dy)


def test_sanity_flags_a_map_that_ignores_the_model():
    model, x = tiny(), tiny_input(3)
    check = metrics.sanity(model, x, edges)
    assert check.model_independent.all()
    assert torch.allclose(check.spearman, torch.ones_like(check.spearman))
    assert check.layers == ["fc2", "fc1", "conv2", "conv1"]  # from the output down


def test_sanity_sees_gradient_maps_change_when_the_model_is_randomised():
    model, x = tiny(), tiny_input(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check = metrics.sanity(model, x, "saliency")
    assert not check.model_independent.any()
    assert check.spearman[-1].abs().max() < 0.5
    assert check.maps.shape == (len(check.layers) + 1, 3, 8, 8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert check.plot().size[0] > 100 and check.grid(0).size[0] > 100
