"""Indirect explanations: receptive fields, top patches, synthesis, embeddings, dissection."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny, tiny_input
from torch import nn

import convlens as cl
from convlens import features
from convlens.datasets import shapes
from convlens.metrics.benchmark import model_inputs


def stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.ZeroPad2d((1, 0, 2, 0)),
        nn.Conv2d(4, 4, 3, dilation=2),
    ).eval()


def test_receptive_field_of_a_known_stack_is_exact():
    net = stack()
    field = features.receptive_field(net, "5", input_size=(64, 64))
    # conv3 p1: r 3, j 1, o -1; pool 2: r 4, j 2; conv5 s2 p2: r 12, j 4, o -5;
    # pad (left 1, top 2): o (-13, -9); conv3 dilation 2: r 12 + 2*2*4 = 28
    assert field.size == (28, 28) and field.jump == (4, 4) and field.offset == (-13, -9)
    # the field is exact: pixels outside it do not matter, its border pixels do
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y, xx = 6, 5
    x0, y0, x1, y1 = field.box(y, xx)
    assert (x0, y0, x1, y1) == (-9 + 20, -13 + 24, -9 + 20 + 28, -13 + 24 + 28)

    def unit(image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(image)[0, :, y, xx]

    outside = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    outside[..., y0:y1, x0:x1] = x[..., y0:y1, x0:x1]
    torch.testing.assert_close(unit(outside), unit(x), rtol=0, atol=0)
    for row, col in ((y0, x0), (y1 - 1, x1 - 1)):
        poked = x.clone()
        poked[..., row, col] += 10.0
        assert not torch.equal(unit(poked), unit(x)), (row, col)


class ReusedReLU(nn.Module):
    """One ReLU module called after the first and after the second convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))))


def test_a_reused_module_has_the_receptive_field_of_its_last_call():
    """Hooks read a reused module at its last call, so its field is the last call's: conv1
    then conv2 (3 + 2 = 5 pixels, jump 2), not conv1's 3 pixels (the bundled model reuses its
    ReLU6 `_swish` at the stem and at the head)."""
    field = features.receptive_field(ReusedReLU(), "act", input_size=(16, 16))
    assert field.size == (5, 5) and field.jump == (2, 2) and field.offset == (0, 0)
    found = features.top_patches(ReusedReLU(), torch.rand(2, 3, 16, 16), "act", k=2)
    assert all(tuple(p.shape[-2:]) == (5, 5) for p in found.data["patches"])


@pytest.mark.slow
def test_receptive_field_on_the_bundled_model_is_exact(bundled):
    layer = "_blocks.3"
    field = features.receptive_field(bundled, layer)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    module = bundled.layer(layer)
    y, xx = 14, 20
    x0, y0, x1, y1 = field.box(y, xx)

    def unit(image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), cl.hooks.capture({0: module}) as seen:
            bundled.module(image)
        return seen[0][0, :, y, xx]

    outside = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    outside[..., y0:y1, x0:x1] = x[..., y0:y1, x0:x1]
    torch.testing.assert_close(unit(outside), unit(x), rtol=0, atol=1e-5)
    poked = x.clone()
    poked[..., y0, x0] += 10.0
    assert not torch.allclose(unit(poked), unit(x))


def test_top_patches_report_recomputable_maxima():
    model, x = tiny(), tiny_input(12)
    found = features.top_patches(model, x, layer="conv2", channel=3, k=4)
    values, indices, positions = (found.data[k] for k in ("values", "indices", "positions"))
    assert len(values) == 4 and (values[:-1] >= values[1:]).all()
    with torch.no_grad(), cl.hooks.capture({0: model.conv2}) as seen:
        model(x)
    maps = seen[0][:, 3]
    assert values[0] == maps.max()  # the strongest over the collection comes first
    for value, i, (y, xx), box in zip(values, indices, positions, found.data["boxes"], strict=True):
        assert maps[i, y, xx] == value  # recomputed activation = reported one
        assert maps[i].max() == value
        x0, y0, x1, y1 = box.tolist()
        assert found.data["patches"][0].shape[0] == 3 and x1 > x0 and y1 > y0
    assert found.image.size[0] > 100
    with pytest.raises(IndexError, match="channel 99"):
        features.top_patches(model, x, layer="conv2", channel=99)


def test_channel_contributions_split_the_logit_of_a_gap_linear_network(shapes_model):
    """For GAP + linear (Zhou et al. 2016): the contributions sum to logit - bias, per image."""
    x = shapes(3, seed=4).images
    for target in range(4):
        parts = cl.features.channel_contributions(shapes_model, x, target)
        assert parts.shape == (3, 64)
        with torch.no_grad():
            logits = shapes_model.module(x)[:, target]
        bias = shapes_model.module.classifier.bias[target]
        torch.testing.assert_close(parts.sum(1) + bias, logits, rtol=1e-5, atol=1e-5)


def test_filters_and_activations_pictures():
    model, x = tiny(), tiny_input(1)
    first = features.filters(model)
    assert first.info["layer"] == "conv1" and first.data["weight"].shape == (6, 3, 3, 3)
    deeper = features.filters(model, "conv2")
    assert deeper.data["weight"].shape == (8, 6, 3, 3) and deeper.image.size[0] > 50
    maps = features.activations(model, x, "conv2")
    means = maps.data["activations"].mean(dim=(1, 2))
    assert torch.equal(maps.data["order"], torch.argsort(means, descending=True))
    with pytest.raises(ValueError, match=r"not an nn\.Conv2d"):
        features.filters(model, "fc1")


@pytest.fixture(scope="module")
def shapes_model():
    return cl.load_model("shapes-cnn")


def test_class_model_makes_the_network_sure_of_its_class(shapes_model):
    result = features.class_model(shapes_model, "triangle", steps=96, seed=0)
    probabilities = result.data["probabilities"]
    assert probabilities[0] < 0.5  # noise: near chance for four classes
    assert result.info["probability"] > 0.9
    assert result.data["image"].shape == (1, 3, 64, 64)
    pixel = features.class_model(shapes_model, 1, steps=96, parametrization="pixel", l2=1e-4)
    assert pixel.info["probability"] > 0.9


def test_class_model_of_an_inner_channel(shapes_model):
    target = cl.targets.Channel("features.8", 5)  # the last convolution, before its ReLU
    result = features.class_model(shapes_model, target, steps=32)
    assert result.data["scores"][-1] > result.data["scores"][0] + 5


def test_deep_dream_raises_the_layer_activation(shapes_model):
    image = model_inputs(shapes_model, shapes(1, seed=3))
    result = features.deep_dream(shapes_model, image, "features.6", octaves=2, steps=5)
    before, after = result.data["objective"].tolist()
    assert after > 1.5 * before
    assert result.data["image"].shape == image.shape


def five_nearest_purity(points: torch.Tensor, labels: torch.Tensor) -> float:
    distances = torch.cdist(points, points) + torch.eye(len(points)) * 1e9
    nearest = distances.topk(5, largest=False).indices
    return float((labels[nearest] == labels[:, None]).double().mean())


def test_tsne_separates_the_shapes(shapes_model):
    data = shapes(80, seed=7)
    x = model_inputs(shapes_model, data)
    result = features.tsne(shapes_model, x, labels=data.labels, perplexity=10)
    assert five_nearest_purity(result.data["points"], data.labels) > 0.9
    assert five_nearest_purity(x.flatten(1), data.labels) < 0.5  # pixels do not separate them
    assert result.data["embeddings"].shape == (80, 64)  # the input of the linear head


def test_neighbours_in_feature_space_share_the_class_more_than_in_pixel_space(shapes_model):
    data = shapes(40, seed=8)
    x = model_inputs(shapes_model, data)
    same_features = same_pixels = 0
    for q in range(8):
        result = features.neighbours(shapes_model, x[q : q + 1], x, k=4)
        assert result.data["feature_indices"][0] == q and result.data["pixel_indices"][0] == q
        assert result.data["feature_distances"][0] == pytest.approx(0, abs=1e-3)
        same_features += int(
            (data.labels[result.data["feature_indices"][1:]] == data.labels[q]).sum()
        )
        same_pixels += int((data.labels[result.data["pixel_indices"][1:]] == data.labels[q]).sum())
    assert same_features >= 20 and same_features > 2 * same_pixels, (same_features, same_pixels)


RED = (0.9, 0.1, 0.1)
# Red is the mean of these two: a linear colour unit never prefers red to both of them.
DISTRACTORS = ((0.9, 0.2, 0.0), (0.9, 0.0, 0.2))


class RedDetector(nn.Module):
    """Two 1x1 layers with a ReLU between. Built: hidden = (R, G + B, G - B, B - G), and unit 0
    = R - (G + B) - 3 |G - B|, which peaks at pure red (0.7) and is 0.1 on the distractors.
    ``random=True``: the same architecture with random weights."""

    def __init__(self, random: int | None = None) -> None:
        super().__init__()
        self.hidden = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()
        self.units = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            if random is not None:
                generator = torch.Generator().manual_seed(random)
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator))
                return
            self.hidden.weight.copy_(
                torch.tensor([[1, 0, 0], [0, 1, 1], [0, 1, -1], [0, -1, 1]])
                .float()
                .view(4, 3, 1, 1)
            )
            self.hidden.bias.zero_()
            self.units.weight.copy_(
                torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(0))
            )
            self.units.weight[0, :, 0, 0] = torch.tensor([1.0, -1.0, -3.0, -3.0])
            self.units.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(self.relu(self.hidden(x))).mean(dim=(2, 3))


def red_squares(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey noise images of 40x80, each with a red 4x4 square (0.5% of the pixels, the top
    quantile of Bau et al.) and one 4x4 square of each distractor colour."""
    generator = torch.Generator().manual_seed(0)
    images = 0.4 + 0.1 * torch.rand(n, 3, 40, 80, generator=generator)
    masks = torch.zeros(n, 40, 80, dtype=torch.bool)
    for i in range(n):
        for j, colour in enumerate((RED, *DISTRACTORS)):
            y, x = 4 + 5 * i, 6 + 9 * i + 24 * j
            images[i, :, y : y + 4, x : x + 4] = torch.tensor(colour).view(3, 1, 1)
            masks[i, y : y + 4, x : x + 4] |= j == 0
    return images, masks


def test_dissect_finds_the_planted_detector_and_none_in_random_networks():
    images, masks = red_squares()
    top = torch.zeros_like(masks)
    top[:, :20] = True  # a concept no unit detects
    found = features.dissect(RedDetector(), images, {"red": masks, "top half": top}, "units")
    assert found.info["concepts"] == ["red", "top half"]
    assert found.data["best_concept"][0] == 0 and found.data["iou"][0, 0] >= 0.9
    for seed in range(5):
        random = features.dissect(RedDetector(random=seed), images, {"red": masks}, "units")
        assert random.data["iou"].max() < 0.5, (seed, random.data["iou"])


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("filters", []),
        ("activations", ["--shapes", "1"]),
        ("patches", ["--shapes", "8", "--layer", "features.6", "--channel", "2", "--k", "4"]),
        ("class-model", ["--target", "circle", "--steps", "8"]),
        ("dream", ["--shapes", "1", "--steps", "2"]),
        ("embedding", ["--shapes", "12", "--k", "3"]),
        ("dissect", ["--shapes", "8"]),
    ],
)
def test_features_command_writes_a_picture_and_a_summary(tmp_path, kind, extra):
    import json

    from PIL import Image

    from convlens.cli import main

    out = tmp_path / kind
    assert main(["features", kind, "--model", "shapes-cnn", "--out", str(out), *extra]) == 0
    with Image.open(out / f"{kind}.png") as picture:
        assert picture.size[0] > 50
    summary = json.loads((out / f"{kind}.json").read_text())
    assert summary["kind"] == kind and summary["model"] == "shapes-cnn"


def test_features_command_errors_are_one_line(capsys):
    from convlens.cli import main

    assert main(["features", "class-model", "--model", "shapes-cnn"]) == 2
    assert "--target" in capsys.readouterr().err
    assert main(["features", "dissect", "--model", "shapes-cnn", "--samples"]) == 2


def test_positive_number_refuses_text_signs_and_non_finite_values_in_one_line():
    from convlens.checks import RequestError, positive_number

    assert positive_number("lr", 0.5) == 0.5 and positive_number("l2", 0, zero=True) == 0.0
    assert positive_number("lr", torch.tensor(2.0)) == 2.0
    bad = [("0.1", False), (-1, True), (0, False), (float("inf"), False), (True, False)]
    for value, zero in [*bad, (None, True), (float("nan"), True)]:
        with pytest.raises(RequestError, match=r"^lr must be") as error:
            positive_number("lr", value, zero=zero)
        assert "\n" not in str(error.value)
