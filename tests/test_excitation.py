"""Excitation backprop (Zhang et al. 2016): MWP and c-MWP against a winner-take-all computed by
hand with loops, the distribution invariants (non-negative, summing to 1 at every layer), the
Layer-CAM identity on a GAP + linear head, refusals, and the model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_lifecycle import assert_same, snapshot
from torch import nn
from zoo import ZOO, zoo_input

import convlens as cl
from convlens.checks import RequestError
from convlens.targets import Channel, Contrast

# conv2 (3 out, 2 in, 2x2) and fc (2 classes, 3 in): numbers written out, of both signs
W2 = np.array(
    [
        [[[0.5, -0.2], [0.3, 0.1]], [[-0.4, 0.6], [0.2, -0.1]]],
        [[[0.3, 0.2], [-0.5, 0.4]], [[0.7, -0.2], [0.1, 0.3]]],
        [[[0.2, 0.2], [-0.1, -0.6]], [[-0.3, -0.2], [0.5, 0.4]]],
    ]
)
B2 = np.array([0.3, -0.05, 0.1])  # biases: excitation backprop ignores them
FC = np.array([[0.8, -0.5, 0.3], [-0.6, 0.4, 0.9]])
FC_BIAS = np.array([0.5, -1.0])


class Tiny(nn.Module):
    """conv1 (3x3, padding 1: act1 keeps the input's 3x3) -> ReLU -> conv2 (2x2) -> ReLU ->
    global average pooling -> fc."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 3, 2)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv1.bias.copy_(torch.tensor([0.2, 0.1]))
            self.conv2.weight.copy_(torch.from_numpy(W2))
            self.conv2.bias.copy_(torch.from_numpy(B2))
            self.fc.weight.copy_(torch.from_numpy(FC))
            self.fc.bias.copy_(torch.from_numpy(FC_BIAS))
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a2 = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(a2.mean(dim=(2, 3)))


def _input() -> torch.Tensor:
    return torch.tensor([[[[2.7, -0.9, 1.2], [0.6, 3.3, -2.1], [1.5, 2.4, 0.9]]]]).double()


def _hand_mwp(a1: np.ndarray, fc_row: np.ndarray) -> np.ndarray:
    """The winning probabilities of act1's units (2, 3, 3) for an output unit with weights
    ``fc_row``: one-hot prior, P(child) = a_child w+ / sum(a w+) P(parent), layer by layer,
    with loops (Zhang et al. 2016, Eq. 1-3; biases ignored)."""
    a2 = np.zeros((3, 2, 2))
    for k in range(3):
        for y in range(2):
            for x in range(2):
                z = B2[k]
                for c in range(2):
                    for dy in range(2):
                        for dx in range(2):
                            z += W2[k, c, dy, dx] * a1[c, y + dy, x + dx]
                a2[k, y, x] = max(z, 0.0)
    pooled = a2.mean(axis=(1, 2))
    # fc: the output unit chooses among the pooled units through its positive weights
    excitation = [pooled[k] * max(fc_row[k], 0.0) for k in range(3)]
    p_pooled = [e / sum(excitation) for e in excitation]
    # average pooling: weights 1/4, all positive
    p_a2 = np.zeros((3, 2, 2))
    for k in range(3):
        if p_pooled[k] == 0:  # a silent unit wins nothing and passes nothing on
            continue
        for y in range(2):
            for x in range(2):
                p_a2[k, y, x] = p_pooled[k] * (a2[k, y, x] / 4) / (a2[k].sum() / 4)
    # the rectifier passes the signal; conv2: each unit shares among its 2x2x2 children
    p_a1 = np.zeros((2, 3, 3))
    for k in range(3):
        for y in range(2):
            for x in range(2):
                if p_a2[k, y, x] == 0:
                    continue
                total = sum(
                    a1[c, y + dy, x + dx] * max(W2[k, c, dy, dx], 0.0)
                    for c in range(2)
                    for dy in range(2)
                    for dx in range(2)
                )
                for c in range(2):
                    for dy in range(2):
                        for dx in range(2):
                            share = a1[c, y + dy, x + dx] * max(W2[k, c, dy, dx], 0.0) / total
                            p_a1[c, y + dy, x + dx] += share * p_a2[k, y, x]
    return p_a1


def _act1(model: Tiny, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.act1(model.conv1(x))[0].numpy()


@pytest.mark.parametrize("target", [0, 1])
def test_mwp_is_the_hand_computed_winner_take_all(target):
    model, x = Tiny(), _input()
    a1 = _act1(model, x)
    assert (a1 == 0).any() and (a1 > 0).any()  # some units are silent, some fire
    e = cl.explain(model, x, "excitation_backprop", target=target, layer="act1", progress=False)
    expected = _hand_mwp(a1, FC[target]).sum(axis=0)  # summed over channels
    # act1 keeps the input's 3x3, so the map is not resampled; the tolerance is float32's and
    # the average pooling's stabiliser's (+1e-6)
    np.testing.assert_allclose(e.attribution[0, 0].numpy(), expected, rtol=5e-5, atol=1e-6)
    assert e.layer == "act1"
    assert e.extras["mass"] == pytest.approx([1.0], abs=1e-4)


@pytest.mark.parametrize("target", [0, 1])
def test_contrastive_mwp_subtracts_the_dual_units_mwp_and_keeps_the_positive_part(target):
    model, x = Tiny(), _input()
    a1 = _act1(model, x)
    mwp = _hand_mwp(a1, FC[target]).sum(axis=0)
    dual = _hand_mwp(a1, -FC[target]).sum(axis=0)  # the dual unit: the weights negated
    expected = np.maximum(mwp - dual, 0.0)
    assert (mwp - dual < 0).any() and (mwp - dual > 0).any()  # the clipping matters here
    e = cl.explain(
        model, x, "excitation_backprop", target=target, layer="act1", contrastive=True,
        progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(e.attribution[0, 0].numpy(), expected, rtol=5e-5, atol=1e-6)
    assert e.resolved["dual"] == "fc"
    assert e.extras["dual_mass"] == pytest.approx([1.0], abs=1e-4)
    # the probe's one (a one-channel input needs no layout test), a pass for o, one for o-bar
    assert e.forwards == 1 + 2


def test_the_winning_probabilities_are_a_distribution_at_every_layer():
    """A rectifier network (VGG: convolutions, ReLU, max pooling, a dense head): at each layer
    the MWP is non-negative and sums to 1 (the one-hot prior, conserved)."""
    model, x = ZOO["vgg"](), zoo_input()
    layers = [f"features.{i}" for i in range(len(model.features))]
    for layer in layers:
        e = cl.explain(model, x, "excitation_backprop", layer=layer, progress=False)
        assert e.extras["mass"] == pytest.approx([1.0, 1.0], abs=1e-4), layer
        assert float(e.attribution.min()) >= 0, layer


def test_mwp_at_the_gap_layer_is_layercam():
    """On a GAP + linear head the MWP of the pooled layer is sum_k w+_k A_k / (h w sum_k w+_k
    a_k): Layer-CAM's sum_k relu(w_k / (h w)) A_k up to a factor per image."""
    model, x = ZOO["resnet_basic"](), zoo_input()
    mwp = cl.explain(model, x, "excitation_backprop", target=3, progress=False).attribution
    layercam = cl.explain(model, x, "layercam", target=3, progress=False).attribution
    for m, lc in zip(mwp, layercam, strict=True):
        torch.testing.assert_close(m / m.sum(), lc / lc.sum(), rtol=1e-4, atol=1e-7)


def test_batch_size_does_not_change_c_mwp():
    model, x = ZOO["densenet"](), zoo_input(3)
    one = cl.explain(model, x, "excitation_backprop", contrastive=True, batch_size=1)
    many = cl.explain(model, x, "excitation_backprop", contrastive=True, batch_size=3)
    torch.testing.assert_close(one.attribution, many.attribution)
    assert one.targets == many.targets


def test_explaining_leaves_the_model_as_it_was():
    model, x = Tiny(), _input()
    before = snapshot(model)
    cl.explain(model, x, "excitation_backprop", layer="act1", contrastive=True, progress=False)
    assert_same(before, snapshot(model))
    with pytest.raises(RequestError):
        cl.explain(model, x, "excitation_backprop", layer="conv1", target=Contrast(0, 1))
    assert_same(before, snapshot(model))


def test_a_layer_reading_negative_activations_is_refused_by_name():
    """conv2 reads conv1's output directly (no rectifier): the shares are no probabilities."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    ).eval()
    x = zoo_input(1)[:, :, :6, :6]
    model(x)  # the lazy layer takes its shape
    before = snapshot(model)
    with pytest.raises(RequestError, match="layer '1' reads negative values") as err:
        cl.explain(model, x, "excitation_backprop", layer="0", progress=False)
    assert "\n" not in str(err.value)
    assert_same(before, snapshot(model))
    # above it the signal passes rectified activations only
    e = cl.explain(model, x, "excitation_backprop", layer="2", progress=False)
    assert e.extras["mass"] == pytest.approx([1.0], abs=1e-4)


def test_targets_that_are_no_distribution_or_no_class_are_refused():
    model, x = Tiny(), _input()
    with pytest.raises(RequestError, match="Contrast"):
        cl.explain(model, x, "excitation_backprop", target=Contrast(0, 1))
    with pytest.raises(RequestError, match="contrastive=True explains classes"):
        cl.explain(
            model, x, "excitation_backprop", target=Channel("conv2", 0), layer="act1",
            contrastive=True,
        )  # fmt: skip
    with pytest.raises(RequestError, match="contrastive must be True or False"):
        cl.explain(model, x, "excitation_backprop", contrastive="yes")


def test_an_inner_channel_spreads_a_uniform_prior():
    """A Channel target's score is the channel's mean: its prior is uniform over the channel's
    positions, and the MWP below it still sums to 1."""
    model, x = Tiny(), _input()
    e = cl.explain(
        model, x, "excitation_backprop", target=Channel("act2", 1), layer="act1", progress=False
    )
    assert e.extras["mass"] == pytest.approx([1.0], abs=1e-4)
    assert float(e.attribution.min()) >= 0


def test_a_signal_that_leaves_the_simplex_is_reported():
    """A ResNet block's sum before its rectifier has terms of both signs: split in proportion
    to them (as the authors do), the dual unit's signal turns partly negative, and the method
    says so rather than returning the map silently."""
    model, x = ZOO["resnet_basic"](), zoo_input()
    with pytest.warns(RuntimeWarning, match="no distribution for input 0"):
        e = cl.explain(model, x, "excitation_backprop", layer="layer3", contrastive=True)
    assert bool(torch.isfinite(e.attribution).all())
