"""Issue 18, the report tells the truth at a glance: the class each card explains, its colour
bar's numbers, the curves as numbers, the bootstrap interval of the ranking, the class- and
model-sensitivity flags, the patch layer of ``--features``, and JSON that holds numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convlens as cl
from convlens import report, viz
from convlens.metrics import deletion, insertion, sanity
from convlens.report import checks, indirect, page


@pytest.fixture(scope="module")
def shapes_model():
    return cl.load_model("shapes-cnn")


# -- the numbers behind the ranking and the flags --------------------------------------------------


def test_bootstrap_interval_of_known_values():
    # two values: a resample is all 0 (p = 1/4), mixed (1/2) or all 1 (1/4), so the 2.5 % and
    # 97.5 % quantiles of 1000 resampled means are exactly 0 and 1
    assert checks.bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    assert checks.bootstrap_interval([2.5, 2.5, 2.5]) == (2.5, 2.5)  # no spread
    assert checks.bootstrap_interval([0.3]) is None  # one image: no interval
    values = [0.1, 0.4, 0.35, 0.8]
    rng = np.random.default_rng(7)  # the percentile method, spelled out
    means = np.asarray(values)[rng.integers(0, 4, size=(1000, 4))].mean(axis=1)
    expected = tuple(np.percentile(means, [2.5, 97.5]))
    assert checks.bootstrap_interval(values, seed=7) == pytest.approx(expected, abs=0)
    low, high = checks.bootstrap_interval(values, seed=7)
    assert min(values) < low < np.mean(values) < high < max(values)
    assert checks.bootstrap_interval(values, seed=8) != (low, high)  # the seed is used


def test_spearman_and_the_class_compared_with():
    a = torch.arange(16.0).reshape(4, 4)
    assert checks.spearman(a, a**3) == pytest.approx(1.0)  # ranks only
    assert checks.spearman(a, -a) == pytest.approx(-1.0)
    assert checks.spearman(a, torch.zeros(4, 4)) is None  # a constant map has no ranks
    p = torch.tensor([0.05, 0.5, 0.3, 0.15])
    # the median of the other classes by probability: for class 1 (the top one) the others
    # are 2 (0.3), 3 (0.15) and 0 (0.05): the middle one is class 3, ranked 3rd of all
    assert checks.other_class(p, 1) == (3, 3)
    assert checks.other_class(p, 0) == (2, 2)  # others 1, 2, 3 -> 2, ranked 2nd
    assert checks.other_class(torch.tensor([0.9, 0.1]), 0) == (1, 2)
    record = checks.class_sensitivity(a, a.clone(), {"class": 3})
    assert record["flag"] is True and record["correlation"] == pytest.approx(1.0)
    record = checks.class_sensitivity(a, torch.zeros(4, 4), {"class": 3})
    assert record["flag"] is False and "the other map is constant" in record["reason"]


def test_plain_keeps_numbers_and_files_large_arrays():
    kept: dict[str, np.ndarray] = {}

    def store(key: str, array: np.ndarray) -> dict:
        kept[key] = array
        return {"npz": "x.npz", "key": key, "shape": list(array.shape)}

    value = {"small": torch.tensor([1.5, 2.0]), "big": [{"segments": torch.ones(30, 30)}]}
    assert checks.plain(value, store, "m") == {
        "small": [1.5, 2.0],
        "big": [{"segments": {"npz": "x.npz", "key": "m/big/0/segments", "shape": [30, 30]}}],
    }
    assert kept["m/big/0/segments"].shape == (30, 30)


def test_ranking_rows_hold_the_spread_and_the_flags():
    def image(name: str, deletion: float, insertion: float, flag: bool) -> dict:
        check = {"correlation": 0.95 if flag else 0.2, "flag": flag}
        entry = {"deletion": deletion, "insertion": insertion, "seconds": 1.0, "forwards": 1}
        return {"image": name, "methods": {"saliency": {**entry, "class_sensitivity": check}}}

    images = [image("a", 0.5, 0.5, True), image("b", 0.0, 1.0, False)]
    (row,) = report.ranking(images, ["saliency"])
    assert row["faithfulness"] == pytest.approx(0.5)
    assert row["interval"] == [0.0, 1.0] and row["n"] == 2
    assert [p["faithfulness"] for p in row["per_image"]] == [0.0, 1.0]
    assert row["flags"] == {
        "class": {"flagged": 1, "checked": 2},
        "model": {"flagged": 0, "checked": 0},
    }
    assert row["favoured"] is None and row["constant"] == 0
    images[0]["methods"]["rise"] = {**images[0]["methods"]["saliency"], "constant": True}
    images[1]["methods"]["rise"] = images[1]["methods"]["saliency"]
    (rise,) = report.ranking(images, ["rise"])  # RISE is favoured; its constant map is left out
    assert rise["favoured"].startswith("built on the same kind of perturbation")
    assert rise["constant"] == 1 and rise["n"] == 1 and rise["interval"] is None


def test_sanity_flags_a_map_that_ignores_the_model(shapes_model):
    x = cl.datasets.shapes(2, seed=5).images

    def brightness(model, inputs):  # an "edge detector": the same whatever the model
        return inputs.mean(dim=1)

    result = checks.sanity_flags(shapes_model, brightness, x, [0, 1], {}, 0, None)
    assert result["flags"] == [True, True] and result["spearman"] == pytest.approx([1.0, 1.0])
    assert result["layers"] == 5 and result["curve"] == pytest.approx([1.0] * 6)

    def flat(model, inputs):  # a constant map has no ranks: no correlation, no flag
        return torch.zeros(len(inputs), *inputs.shape[-2:])

    result = checks.sanity_flags(shapes_model, flat, x, [0, 1], {}, 0, None)
    assert result["flags"] == [False, False] and result["spearman"] == [None, None]


# -- a report on a network built so that the class matters ----------------------------------------


class RedGreen(nn.Module):
    """Class 0 is the mean redness, class 1 the mean greenness (1x1 convolution, ReLU, global
    average pooling): Grad-CAM of class 0 shows the red half, of class 1 the green half."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = self.conv.weight[1, 1] = 1.0
            self.fc.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_class_flag_for_a_class_blind_method_not_for_gradcam(tmp_path):
    model = cl.Model(RedGreen(), input_size=(32, 32), mean=None, std=None,
                     labels=["red", "green"], cam_layer="relu", name="red-green")  # fmt: skip
    x = torch.zeros(1, 3, 32, 32)
    x[:, 0, :, :14] = 1.0  # red on the left, a little more of it: the prediction is red
    x[:, 1, :, 18:] = 0.9
    document = report.explain_images(
        model, [("halves", x)], ["gradcam", "eigencam"], tmp_path / "out", progress=False
    )
    cards = document["images"][0]["methods"]
    assert cards["gradcam"]["label"] == "red" and cards["gradcam"]["probability"] > 0.5
    gradcam = cards["gradcam"]["class_sensitivity"]
    eigencam = cards["eigencam"]["class_sensitivity"]
    green = pytest.approx(1 - cards["gradcam"]["probability"])
    assert gradcam["other"] == {"class": 1, "label": "green", "rank": 2, "probability": green}
    assert gradcam["flag"] is False and gradcam["correlation"] < 0  # the other half lights up
    # EigenCAM is the first principal component of the layer: the same map for every class
    assert eigencam["flag"] is True and eigencam["correlation"] == pytest.approx(1.0)
    rows = {row["method"]: row for row in document["ranking"]}
    assert rows["eigencam"]["flags"]["class"] == {"flagged": 1, "checked": 1}
    assert rows["gradcam"]["flags"]["class"] == {"flagged": 0, "checked": 1}
    html = (tmp_path / "out" / "index.html").read_text()
    assert html.count('class="badge flag" data-check="class"') == 2  # eigencam's card and row


# -- a report on the shapes CNN: views, raw pictures, curves, sanity, features --------------------


@pytest.fixture(scope="module")
def shapes_report(tmp_path_factory, shapes_model):
    out = tmp_path_factory.mktemp("truth") / "out"
    pictures = cl.datasets.shapes(2, seed=5).images
    sources = [("first", pictures[0:1]), ("second", pictures[1:2])]
    document = report.explain_images(
        shapes_model, sources, ["integrated_gradients", "gradcam"], out,
        params={"integrated_gradients": {"steps": 8}}, progress=False, sanity=True,
        features=True, feature_steps=4,
    )  # fmt: skip
    return out, document, pictures


def test_cards_name_their_class_and_their_colour_scale(shapes_report, shapes_model):
    out, _, pictures = shapes_report
    results = json.loads((out / "results.json").read_text())
    html = (out / "index.html").read_text()
    for image, x in zip(results["images"], pictures, strict=True):
        card = image["methods"]["integrated_gradients"]
        assert card["label"] == image["label"] and card["probability"] == image["probability"]
        e = cl.explain(shapes_model, x[None], "integrated_gradients", steps=8, progress=False)
        heat = e.heatmap()[0].numpy()
        assert e.speckled(0)  # integrated gradients: speckle, so three views are written
        assert [v["view"] for v in card["views"]] == ["signed", "abs", "smooth"]
        for view in card["views"]:
            low, high, signed = viz.map_range(viz.view_map(heat, view["view"]))
            assert (view["low"], view["high"], view["signed"]) == pytest.approx((low, high, signed))
            assert (out / view["file"]).is_file() and view["file"] in html
            legend = page.legend(view, card)
            assert legend["low"] in html and legend["high"] in html
        assert f"red: for {image['label']}, blue: against" in html
        raw = np.asarray(e.raw_picture(0))
        with Image.open(out / card["raw"]) as saved:
            assert np.array_equal(np.asarray(saved), raw)
        assert "raw" not in image["methods"]["gradcam"]  # a 1-channel map has no raw picture
    assert "red: more evidence for" in html  # Grad-CAM's map is unsigned
    assert "1 pass<" in html and "1 passes" not in html


def test_curves_are_numbers_that_match_the_metrics(shapes_report, shapes_model):
    out, _, pictures = shapes_report
    results = json.loads((out / "results.json").read_text())
    steps = results["curve_steps"]
    for image, x in zip(results["images"], pictures, strict=True):
        card = image["methods"]["gradcam"]
        heat = cl.explain(shapes_model, x[None], "gradcam", progress=False).heatmap()
        removed = deletion(shapes_model, x[None], heat, steps=steps, progress=False)
        added = insertion(shapes_model, x[None], heat, steps=steps, progress=False)
        assert card["curves"]["fractions"] == pytest.approx(removed.fractions.tolist())
        assert card["curves"]["deletion"] == pytest.approx(removed.scores[0].tolist(), abs=1e-6)
        assert card["curves"]["insertion"] == pytest.approx(added.scores[0].tolist(), abs=1e-6)
        assert card["deletion"] == pytest.approx(float(removed.auc[0]), abs=1e-6)
    assert "tensor(" not in (out / "results.json").read_text()


def test_sanity_records_match_a_fresh_randomisation(shapes_report, shapes_model):
    _, document, pictures = shapes_report
    record = document["sanity"]["gradcam"]
    classes = [image["methods"]["gradcam"]["target"] for image in document["images"]]
    fresh = sanity(shapes_model, pictures, "gradcam", target=classes, threshold=0.5)
    assert record["spearman"] == pytest.approx(fresh.spearman[-1].tolist())
    assert record["flags"] == fresh.model_independent.tolist()
    assert record["layers"] == len(fresh.layers) == 5
    for image, flag in zip(document["images"], record["flags"], strict=True):
        assert image["methods"]["gradcam"]["sanity"]["flag"] is flag
    row = next(r for r in document["ranking"] if r["method"] == "gradcam")
    assert row["flags"]["model"] == {"flagged": sum(record["flags"]), "checked": 2}


def test_features_use_a_layer_whose_patches_are_patches(shapes_report, shapes_model):
    _, document, pictures = shapes_report
    x = shapes_model.inputs(pictures)
    # shapes-cnn on 64x64: convolutions 3x3 and poolings 2x2 give fields 3, 4, 8, 10, 18, 26;
    # the deepest at most 32 (half the side) is the whole feature stack, 26 pixels
    assert indirect.patch_layer(shapes_model, x) == ("features", [26, 26])
    assert indirect.patch_layer(shapes_model, x, share=0.25) == ("features.5", [10, 10])
    out = shapes_report[0]
    for entry in document["features"]:
        assert entry["layer"] == "features" and entry["receptive_field"] == [26, 26]
        assert (out / entry["dream"]).is_file() and (out / entry["patches"]).is_file()


def test_the_class_check_can_be_left_out(tmp_path, shapes_model):
    x = cl.datasets.shapes(1, seed=5).images
    document = report.explain_images(
        shapes_model, [("one", x)], ["gradcam"], tmp_path, progress=False, class_check=False
    )
    card = document["images"][0]["methods"]["gradcam"]
    assert "class_sensitivity" not in card
    assert document["ranking"][0]["flags"]["class"] == {"flagged": 0, "checked": 0}
    assert 'data-check="class"' not in (tmp_path / "index.html").read_text()


def test_patch_layer_of_the_bundled_model():
    """EfficientNet-Lite0 at 224: ``_blocks.5`` sees 83 pixels, ``_blocks.6`` 115 (over half
    the side); the modules inside ``_blocks.6`` before its strided convolution see no more
    than ``_blocks.5``, so the block itself is taken."""
    model = cl.load_model()
    x = torch.zeros(1, 3, 224, 224)
    assert indirect.patch_layer(model, x) == ("_blocks.5", [83, 83])


def test_each_explanation_may_show_its_own_progress_bar(tmp_path, shapes_model, monkeypatch):
    """With ``progress=None`` every explanation gets ``progress=None`` (the engine's bar, with
    its rate and time left, for work over a second); ``progress=False`` silences them all."""
    import convlens.api

    seen: list = []
    explain = convlens.api.explain

    def spy(*args, **kwargs):
        seen.append(kwargs["progress"])
        return explain(*args, **kwargs)

    monkeypatch.setattr(convlens.api, "explain", spy)
    x = cl.datasets.shapes(1, seed=5).images
    for progress in (None, False):
        seen.clear()
        report.explain_images(shapes_model, [("one", x)], ["gradcam"], tmp_path / str(progress),
                              progress=progress)  # fmt: skip
        assert seen == [progress, progress]  # the map and its class check


def test_anchors_skip_the_class_check(tmp_path, shapes_model):
    """An anchor keeps the prediction: for a class the model does not predict there is none,
    and the search would spend its whole sample budget (10 minutes on the demo)."""
    x = cl.datasets.shapes(1, seed=5).images
    params = {"anchors": {"n_samples": 100}}
    document = report.explain_images(
        shapes_model, [("one", x)], ["anchors"], tmp_path, params=params, progress=False
    )
    check = document["images"][0]["methods"]["anchors"]["class_sensitivity"]
    assert check["applies"] is False and check["reason"] == checks.NO_CLASS_CHECK["anchors"]
    assert "class check: does not apply" in (tmp_path / "index.html").read_text()


def test_top_k_rank_one_card_carries_both_checks(tmp_path, shapes_model):
    x = cl.datasets.shapes(1, seed=5).images
    document = report.explain_images(shapes_model, [("one", x)], ["gradcam"], tmp_path,
                                     target=report.Top(2), sanity=True, progress=False)  # fmt: skip
    record = document["images"][0]["methods"]["gradcam"]
    first, second = record["top"]
    assert first["sanity"] == record["sanity"] and "correlation" in first["sanity"]
    assert first["class_sensitivity"] == record["class_sensitivity"]
    assert "sanity" not in second and "class_sensitivity" not in second  # rank 1 only
    html = (tmp_path / "index.html").read_text()
    assert html.count('data-check="model"') == 2  # the rank-1 card and the ranking row
