"""What convlens promises when used as users (and attackers) use it: threads, TorchScript,
in-place activations, refusals before any work, and inputs of every kind."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch
from conftest import probe, tiny, tiny_input
from test_lifecycle import FAST, assert_same, classes, snapshot
from torch import nn

import convlens as cl
from convlens import features
from convlens.checks import RequestError
from convlens.targets import Channel


def fast(method: str) -> dict[str, Any]:
    return dict(FAST.get(method, {}))


# -- threads ---------------------------------------------------------------------------------------

PAIRS = [
    ("gradcam", "ablationcam"),
    ("saliency", "lrp"),
    ("guided_backprop", "occlusion"),
    ("integrated_gradients", "scorecam"),
    ("deeplift", "layercam"),
]


@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_concurrent_calls_on_one_model_equal_sequential_calls(pair):
    model, x = tiny(head="gap"), tiny_input(3)
    model.train()  # a model in training mode must come back in training mode
    model.fc.eval()
    before = snapshot(model)
    sequential = {m: cl.explain(model, x, m, target=[1, 2, 3], **fast(m)) for m in pair}
    results: dict[str, list[cl.Explanation]] = {m: [] for m in pair}
    errors: list[BaseException] = []

    def run(method: str) -> None:
        try:
            for _ in range(3):
                results[method].append(
                    cl.explain(model, x, method, target=[1, 2, 3], progress=False, **fast(method))
                )
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(m,)) for m in pair for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for method in pair:
        assert len(results[method]) == 6
        for e in results[method]:
            torch.testing.assert_close(e.attribution, sequential[method].attribution)
    assert_same(before, snapshot(model))
    assert model.training and not model.fc.training


# -- TorchScript -----------------------------------------------------------------------------------

MODEL_AGNOSTIC = {
    "saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "occlusion", "rise",
    "lime", "kernel_shap", "anchors", "meaningful_perturbation", "gradient_shap",
}  # fmt: skip


def scriptable() -> nn.Module:
    """A small CNN that TorchScript can compile (the suite's TinyCNN has lambdas)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("method", cl.list_methods())
def test_scripted_models_are_refused_where_rules_cannot_reach(method, how, monkeypatch):
    model, x = scriptable(), tiny_input(2)
    compiled = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    if method in MODEL_AGNOSTIC:
        e = cl.explain(compiled, x, method, target=[1, 2], **fast(method))
        reference = cl.explain(model, x, method, target=[1, 2], **fast(method))
        torch.testing.assert_close(e.attribution, reference.attribution, rtol=1e-4, atol=1e-5)
        return
    calls: list[int] = []
    monkeypatch.setattr("convlens.engine.Engine.prepare", lambda *args: calls.append(1))
    with pytest.raises(RequestError, match="TorchScript") as refusal:
        cl.explain(compiled, x, method, target=[1, 2], **fast(method))
    assert "\n" not in str(refusal.value) and "saliency" in str(refusal.value)
    assert not calls  # refused before any model call


def test_smoothgrad_over_guided_backprop_is_refused_on_a_scripted_model():
    compiled = torch.jit.script(scriptable())
    with pytest.raises(RequestError, match="TorchScript"):
        cl.explain(compiled, tiny_input(1), "smoothgrad", base="guided_backprop", n_samples=2)


def test_inner_units_of_a_scripted_model_are_refused():
    compiled = torch.jit.script(scriptable())
    with pytest.raises(RequestError, match="TorchScript"):
        cl.explain(compiled, tiny_input(1), "saliency", target=Channel("4", 3))
    with pytest.raises(RequestError, match="TorchScript"):
        features.activations(compiled, tiny_input(1), "4")


# -- in-place activations ----------------------------------------------------------------------


@pytest.mark.parametrize("method", cl.list_methods())
def test_inplace_rectifiers_after_the_layer_change_nothing(method):
    x = tiny_input(2)
    params = fast(method)
    if cl.get_method(method).uses_layer and method != "cam":  # cam: the GAP head reads act2
        params["layer"] = "conv2"  # followed by the in-place rectifier
    plain = cl.explain(
        tiny("relu", head="gap"), x, method, target=classes(method, [1, 2]), **params
    )
    inplace = cl.explain(
        tiny("relu_inplace", head="gap"), x, method, target=classes(method, [1, 2]), **params
    )
    torch.testing.assert_close(inplace.attribution, plain.attribution)


def test_activations_of_a_layer_followed_by_an_inplace_relu_are_its_own():
    x = tiny_input(1)
    plain = features.activations(tiny("relu"), x, "conv2").data["activations"]
    inplace = features.activations(tiny("relu_inplace"), x, "conv2").data["activations"]
    torch.testing.assert_close(inplace, plain)
    assert plain.min() < 0  # a convolution's output: the in-place ReLU would have clipped it


def test_an_ablated_layer_is_what_a_target_on_it_reads():
    model, x = tiny(head="gap"), tiny_input(2)
    e = cl.explain(model, x, "ablationcam", layer="act2", target=Channel("act2", 3))
    # ablating channel 3 itself removes the whole score: weight 1 for it, 0 for the others
    activation = model.act2(model.conv2(model.pool(model.act1(model.conv1(x))))).detach()
    expected = torch.nn.functional.interpolate(
        activation[:, 3:4].clamp(min=0), size=(8, 8), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(e.attribution, expected)


# -- refusals before any work ------------------------------------------------------------------

BAD = [
    ("lime", {"kernel_width": 0}, "kernel_width"),
    ("lime", {"n_segments": 0}, "n_segments"),
    ("kernel_shap", {"segmentation": "watershed"}, "segmentation"),
    ("anchors", {"delta": 0}, "delta"),
    ("anchors", {"beam": 0}, "beam"),
    ("anchors", {"threshold": float("nan")}, "threshold"),
    ("deeplift", {"shap": True}, "reference set"),
    ("integrated_gradients", {"baseline": float("inf")}, "baseline"),
    ("integrated_gradients", {"baseline": "black"}, "baseline"),
    ("occlusion", {"baseline": torch.full((1, 3, 8, 8), float("nan"))}, "baseline"),
    ("smoothgrad", {"noise": float("nan")}, "noise"),
    ("smoothgrad", {"base": "gradcam"}, "wraps a gradient method"),
    ("gradient_shap", {"stdev": float("inf")}, "stdev"),
    ("gradient_shap", {"n_samples": 0}, "n_samples"),
    ("lrp", {"epsilon": float("nan")}, "epsilon"),
    ("lrp", {"gamma": -1.0}, "gamma"),
    ("meaningful_perturbation", {"lr": float("nan")}, "lr"),
    ("meaningful_perturbation", {"l1": -1}, "l1"),
    ("rise", {"p": 0}, "p must be"),
    ("gradcam", {"layer": "no_such_layer"}, "unknown layer"),
    ("layercam", {"gamma": 0}, "gamma"),
    ("cam", {"target": Channel("act2", 3)}, "cam explains classes"),
    ("anchors", {"target": Channel("act2", 3)}, "anchors explains a class"),
    ("saliency", {"target": Channel("nope", 3)}, "unknown layer"),
    ("saliency", {"seed": None}, "seed"),
    ("saliency", {"seed": -1}, "seed"),
]


@pytest.mark.parametrize(("method", "params", "message"), BAD, ids=lambda v: str(v)[:30])
def test_bad_requests_are_refused_by_name_before_any_model_call(method, params, message):
    model = tiny(head="gap")
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    kwargs = {"target": 1, **params}
    with pytest.raises(RequestError, match=message) as refusal:
        cl.explain(model, tiny_input(2), method, **kwargs)
    assert "\n" not in str(refusal.value)
    assert not calls


# -- inputs of every kind ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_input_tensors_of_other_float_types_are_cast(dtype):
    model, x = tiny(), tiny_input(2)
    reference = cl.explain(model, x, "saliency", target=1)
    e = cl.explain(model, x.to(dtype), "saliency", target=1)
    torch.testing.assert_close(e.inputs, x.to(dtype).float())
    tolerance = 1e-6 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(e.attribution, reference.attribution, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("target", [np.int64(2), np.array([2, 2]), torch.tensor(2)], ids=str)
def test_numpy_and_torch_integer_targets_are_accepted(target):
    e = cl.explain(tiny(), tiny_input(2), "saliency", target=target)
    assert e.targets == [2, 2]


def test_wrap_takes_an_int_input_size_and_keeps_the_train_flag():
    module = tiny()
    module.train()
    model = cl.wrap(module, input_size=8)
    assert model.input_size == (8, 8) and module.training
    e = cl.explain(model, tiny_input(1), "saliency", target=1)
    assert e.attribution.shape == (1, 3, 8, 8) and module.training
    with pytest.raises(RequestError, match="input_size"):
        cl.wrap(module, input_size=(8, 0))
    with pytest.raises(RequestError, match="std"):
        cl.wrap(module, mean=(0.5,), std=(0.0,))


class Gray(nn.Module):
    """A grayscale classifier: one input channel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_a_one_channel_model_gets_one_channel_preprocessing():
    model = cl.wrap(Gray().eval(), input_size=(16, 16), mean=(0.5,), std=(0.25,))
    picture = np.zeros((20, 20, 3), dtype=np.uint8)
    picture[:, :10] = 255
    x = model.preprocess(picture)
    assert x.shape == (1, 1, 16, 16)
    assert x.max().item() == pytest.approx((1 - 0.5) / 0.25) and x.min().item() == pytest.approx(-2)
    e = cl.explain(model, picture, "gradcam")
    assert e.attribution.shape == (1, 1, 16, 16) and e.overlay().size == (16, 16)
    with pytest.raises(RequestError, match="channels"):
        cl.explain(model, torch.zeros(1, 3, 16, 16), "saliency")


def test_anchors_stay_within_their_sample_budget():
    from test_perturbation import BLOCKS, TwoTextures, checkerboard

    model, x = TwoTextures(), checkerboard()
    probed = probe(model, x)
    e = cl.explain(model, x, "anchors", target=0, segmentation=BLOCKS, n_samples=40, batch=16)
    (found,) = e.extras["anchor"]
    assert found["samples"] <= 40 and not found["found"]
    assert e.forwards == probed + 1 + found["samples"]


# -- superpixels -------------------------------------------------------------------------------


def picture(size: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(size)
    if kind == "flat":
        return np.full((size, size, 3), 128, np.uint8)
    if kind == "noisy":
        return rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
    image = np.zeros((size, size, 3), np.uint8)
    image[: size // 2] = 200
    image[:, : size // 3, 1] = 90
    return image


@pytest.mark.parametrize("kind", ["plain", "noisy", "flat"])
@pytest.mark.parametrize("size", [32, 64, 224])
def test_slic_delivers_about_the_superpixels_asked_for(size, kind):
    from convlens.methods.perturbation import segment

    labels, info = segment(picture(size, kind), "slic", 50)
    count = int(labels.max()) + 1
    assert count == info["count"] and 25 <= count <= 75, info
    assert info["method"] in ("slic", "grid")
    assert torch.equal(torch.unique(labels), torch.arange(count))


def test_lime_and_kernel_shap_on_noise_have_superpixels_and_say_which():
    model = tiny(head="gap")
    noise = picture(64, "noisy")
    x = torch.from_numpy(noise).permute(2, 0, 1)[None].float() / 255
    for method in ("lime", "kernel_shap"):
        e = cl.explain(model, x, method, target=1, n_samples=40)
        (info,) = e.extras["superpixels"]
        assert info["segmentation"]["count"] >= 25, info["segmentation"]


def test_lime_points_at_the_object_more_often_than_the_centre_on_held_out_shapes():
    from convlens import metrics
    from convlens.metrics.benchmark import model_inputs

    model = cl.load_model("shapes-cnn")
    data = cl.datasets.shapes(16, seed=2000)  # not the images the shapes CNN was trained on
    x = model_inputs(model, data)
    tolerance = 15 * 64 / 224
    e = cl.explain(model, x, "lime", target=data.labels.tolist(), n_samples=300)
    lime = metrics.pointing_game(e, data.boxes, tolerance).float().mean()
    centre = torch.zeros(len(x), 64, 64)
    centre[:, 32, 32] = 1
    baseline = metrics.pointing_game(centre, data.boxes, tolerance).float().mean()
    assert lime > baseline + 0.2, (float(lime), float(baseline))


class Saturated(nn.Module):
    """Predicts class 0 with probability 1 whatever the input (a saturated prediction)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x).mean(dim=(2, 3))
        return torch.tensor([50.0, -50.0]) + 0 * features


def test_a_saturated_prediction_is_said_not_shown_as_a_blank_map(tmp_path):
    from convlens import report

    model = cl.wrap(Saturated().eval(), input_size=(16, 16), labels=["a", "b"])
    x = torch.rand(1, 3, 16, 16)
    e = cl.explain(model, x, "meaningful_perturbation", steps=5, mask_size=4)
    assert e.extras["saturated"] == [True]
    assert e.attribution.abs().max() == 0  # what would have been shown as the evidence
    image = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    params = {"meaningful_perturbation": {"steps": 5, "mask_size": 4}}
    report.explain_images(model, [("photo", image)], ["meaningful_perturbation"], tmp_path / "r",
                          params=params, curve_steps=4, progress=False)  # fmt: skip
    page = (tmp_path / "r" / "index.html").read_text()
    assert "no explanation: the prediction did not move under any mask" in page
