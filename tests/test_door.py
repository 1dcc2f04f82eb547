"""One door to the model: every method's model calls go through the engine, which chunks to
``batch_size``, counts every image, picks the memory layout the model accepts, casts to the
model's dtype, selects logits from tuple / dict outputs, and drives one exact progress bar."""

from __future__ import annotations

import collections
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from conftest import probe, tiny, tiny_input
from test_lifecycle import FAST, classes
from torch import nn

import convlens as cl
from convlens import features, metrics
from convlens.checks import RequestError
from convlens.targets import Channel, Neuron

METHODS = cl.list_methods()


def fast(method: str) -> dict[str, Any]:
    return dict(FAST.get(method, {}))


def explain(model: Any, x: torch.Tensor, method: str, **kwargs: Any) -> cl.Explanation:
    target = kwargs.pop("target", classes(method, [1, 2, 3][: len(x)]))
    return cl.explain(model, x, method=method, target=target,
                      progress=False, **{**fast(method), **kwargs})  # fmt: skip


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = b.abs().max().item() or 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("method", METHODS)
def test_forwards_count_every_image_and_calls_respect_batch_size(method):
    model, x = tiny(head="gap"), tiny_input(3)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    try:
        e = explain(model, x, method, batch_size=2)
    finally:
        handle.remove()
    assert sum(calls) == e.forwards, (sum(calls), e.forwards)
    # DeepLIFT runs each input with its reference in one call: at least a pair
    assert max(calls) <= 2, calls


class ViewFlatten(nn.Module):
    """A plain CNN that flattens with ``x.view(len(x), -1)`` (or ``flatten``), as many do."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        self.view = view
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = x.view(len(x), -1) if self.view else x.flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


# cam needs a global-average-pooling head, which these models lack: it refuses both
@pytest.mark.parametrize("method", [m for m in METHODS if m != "cam"])
def test_a_view_flatten_model_runs_contiguous_with_the_same_results(method):
    x = tiny_input(3)
    with pytest.raises(RuntimeError, match="view"):  # what users hit before
        ViewFlatten(view=True).eval()(x.contiguous(memory_format=torch.channels_last))
    viewed = explain(ViewFlatten(view=True).eval(), x, method)
    flat = explain(ViewFlatten(view=False).eval(), x, method)
    assert viewed.resolved["layout"] == "contiguous"
    assert flat.resolved["layout"] == "channels_last"
    close(viewed.attribution, flat.attribution)


class RawMemory(nn.Module):
    """Reads its input's memory as if it were contiguous: no error on channels-last, but a
    different answer (a custom kernel that ignores strides behaves like this)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny(head="gap")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.net(torch.as_strided(x, x.shape, (c * h * w, h * w, w, 1)))


def test_a_model_that_answers_differently_on_channels_last_runs_contiguous():
    model, x = RawMemory().eval(), tiny_input(3)
    e = cl.explain(model, x, "saliency", target=[1, 2, 3])
    assert e.resolved["layout"] == "contiguous"
    reference = cl.explain(model.net, x, "saliency", target=[1, 2, 3])
    close(e.attribution, reference.attribution)


def test_the_layout_probe_is_counted_once_per_model_and_geometry():
    model, x = tiny(), tiny_input(3)
    assert probe(model, x) == 2
    first = cl.explain(model, x, "saliency")
    second = cl.explain(model, x, "saliency")
    assert first.forwards == 2 + 3 and second.forwards == 3 and probe(model, x) == 0
    assert probe(model, tiny_input(1)) == 0  # the batch size is not part of the geometry
    assert probe(model, torch.zeros(1, 3, 16, 16)) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_models_take_float32_inputs(method, dtype):
    x = tiny_input(3)
    reference = explain(tiny(head="gap"), x, method)
    e = explain(tiny(head="gap").to(dtype), x, method)
    assert e.attribution.dtype == torch.float32 and e.attribution.device.type == "cpu"
    assert torch.isfinite(e.attribution).all()
    if method in ("saliency", "gradcam", "occlusion", "integrated_gradients", "lrp"):
        corr = torch.corrcoef(
            torch.stack([e.attribution.flatten(), reference.attribution.flatten()])
        )
        assert corr[0, 1] > 0.95, corr


Pair = collections.namedtuple("Pair", ["logits", "features"])


class Outputs(nn.Module):
    """The tiny CNN returning its logits inside a tuple, list, namedtuple or dict."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.net = kind, tiny(head="gap")

    def forward(self, x: torch.Tensor) -> Any:
        logits, extra = self.net(x), x.mean(dim=(2, 3))
        return {
            "tuple": lambda: (logits, extra),
            "list": lambda: [logits, extra],
            "namedtuple": lambda: Pair(extra, logits)._replace(logits=logits, features=extra),
            "dict": lambda: {"aux": extra, "logits": logits},
            "reversed": lambda: (extra, logits),
        }[self.kind]()


@pytest.mark.parametrize("kind", ["tuple", "list", "namedtuple", "dict"])
@pytest.mark.parametrize("method", METHODS)
def test_outputs_of_every_shape_give_their_logits(method, kind):
    x = tiny_input(3)
    model = Outputs(kind).eval()
    with pytest.warns(UserWarning, match="convlens explains output"):
        e = explain(model, x, method, **({"layer": "net.act2"} if method == "cam" else {}))
    plain = explain(model.net, x, method, **({"layer": "act2"} if method == "cam" else {}))
    close(e.attribution, plain.attribution)
    expected = {"tuple": "[0]", "list": "[0]", "namedtuple": ".logits", "dict": "['logits']"}
    assert e.resolved["output"] == expected[kind]


def test_wrap_chooses_the_output():
    x = tiny_input(3)
    model = Outputs("reversed").eval()
    chosen = cl.wrap(model, input_size=(8, 8), output=1)
    e = cl.explain(chosen, x, "saliency", target=[1, 2, 3])
    plain = cl.explain(model.net, x, "saliency", target=[1, 2, 3])
    close(e.attribution, plain.attribution)
    assert e.resolved["output"] == "[1]"
    by_function = cl.wrap(model, input_size=(8, 8), output=lambda out: out[1])
    close(cl.explain(by_function, x, "saliency", target=[1, 2, 3]).attribution, plain.attribution)
    nothing = cl.wrap(model, input_size=(8, 8), output=lambda out: None)
    with pytest.raises(RequestError, match="not a tensor"):
        cl.explain(nothing, x, "saliency")


CLASS_ONLY = {
    "cam": "cam explains classes",
    "anchors": "anchors explains a class",
    "contrast_cam": "not a (Channel|Neuron) target",
}
# methods that score classes by their probability and inner units by their raw value: on the
# cut model below the unit is a class, so these two cannot be compared
BY_PROBABILITY = {"rise", "scorecam", "meaningful_perturbation"}


class Unit(nn.Module):
    """The tiny CNN cut after ``act2``: its outputs are act2's channel means (what a Channel
    target reads) or act2 at one position (a Neuron), so class c is the unit of channel c."""

    def __init__(self, net: nn.Module, neuron: bool) -> None:
        super().__init__()
        self.net, self.neuron = net, neuron

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        a = net.act2(net.conv2(net.pool(net.act1(net.conv1(x)))))
        return a[:, :, 2, 1] if self.neuron else a.mean(dim=(2, 3))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("unit", ["channel", "neuron"])
def test_inner_unit_targets_explain_the_unit_or_are_refused(method, unit):
    model, x = tiny(head="gap"), tiny_input(2)
    target = Channel("act2", 3) if unit == "channel" else Neuron("act2", 3, 2, 1)  # live units
    if method in CLASS_ONLY:
        with pytest.raises(RequestError, match=CLASS_ONLY[method]):
            explain(model, x, method, target=target)
        return
    kwargs: dict[str, Any] = {}
    if cl.get_method(method).family == "cam":  # a layer before the unit, maps unrectified
        kwargs["layer"] = model.act1
        if "relu" in cl.get_method(method).defaults:
            kwargs["relu"] = False
    if method in ("lime", "kernel_shap", "occlusion"):
        kwargs["score"] = "logit"  # the unit's raw value, as the cut model's logit
    e = explain(model, x, method, target=target, **kwargs)
    assert torch.isfinite(e.attribution).all() and e.attribution.abs().sum() > 0
    if method not in BY_PROBABILITY:
        cut = explain(Unit(model, unit == "neuron").eval(), x, method, target=3, **kwargs)
        close(e.attribution, cut.attribution)


def test_metrics_take_inner_unit_targets():
    model, x = tiny(head="gap"), tiny_input(2)
    heat = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    curve = metrics.deletion(model, x, heat, target=Channel("conv2", 1), steps=4, score="logit")
    assert curve.scores.shape == (2, 5) and torch.isfinite(curve.scores).all()
    # step 0 is the clean input: the channel's mean activation
    with torch.no_grad():
        activation = F.conv2d(model.pool(model.act1(model.conv1(x))), model.conv2.weight,
                              model.conv2.bias, padding=1)  # fmt: skip
    close(curve.scores[:, 0], activation[:, 1].mean(dim=(1, 2)))


class Recorder:
    """Stands in for tqdm: records the bar's total and every update."""

    bars: ClassVar[list[Recorder]] = []

    def __init__(self, total: int = 0, **kwargs: Any) -> None:
        self.total, self.n, self.updates = total, 0, []
        Recorder.bars.append(self)

    def update(self, n: int) -> None:
        self.updates.append(n)
        self.n += n

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("method", METHODS)
def test_progress_bars_end_exactly_at_their_total(method, monkeypatch):
    monkeypatch.setattr("convlens.engine.tqdm", Recorder)
    Recorder.bars = []
    model, x = tiny(head="gap"), tiny_input(2)
    probed = probe(model, x)
    e = cl.explain(
        model, x, method=method, target=classes(method, [1, 2]), progress=True, **fast(method)
    )
    (bar,) = Recorder.bars
    *work, completion = bar.updates
    assert bar.n == bar.total and sum(work) == e.forwards - probed
    if method == "anchors":  # an adaptive search may stop before its budget
        assert sum(work) <= bar.total
    else:
        assert completion == 0 and sum(work) == bar.total, (sum(work), bar.total)


def test_predict_keeps_every_modules_train_flag():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))
    model = cl.wrap(module, input_size=(8, 8))
    module.train()
    module[1].eval()  # a BatchNorm kept in eval mode while fine-tuning
    probabilities = model.predict(tiny_input(2))
    assert probabilities.shape == (2, 3)
    assert [m.training for m in module] == [True, False, True, True]


@pytest.mark.parametrize("method", METHODS)
def test_params_are_what_was_asked_and_extras_are_documented(method):
    model, x = tiny(head="gap"), tiny_input(2)
    asked = fast(method)
    e = explain(model, x, method)
    cls = cl.get_method(method)
    expected = {**cls.defaults, **asked, "batch_size": e.params["batch_size"]}
    if cls.random:
        expected["seed"] = 0
    assert dict(e.params) == expected  # nothing the method resolved is written into params
    assert set(e.extras) <= set(cls.extras), set(e.extras) - set(cls.extras)
    assert e.resolved["layout"] in ("channels_last", "contiguous")
    if cls.family == "cam":
        assert e.layer == e.resolved["layer"] == asked.get("layer", "act2")  # the map GAP reads


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_metrics_and_features_take_models_with_tuple_or_dict_outputs(kind):
    x = tiny_input(2)
    model = Outputs(kind).eval()
    plain = model.net
    heat = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="convlens explains output"):
        curve = metrics.deletion(model, x, heat, target=1, steps=4)
    close(curve.scores, metrics.deletion(plain, x, heat, target=1, steps=4).scores)
    close(
        features.channel_contributions(model, x, 1, "net.act2"),
        features.channel_contributions(plain, x, 1, "act2"),
    )
    wrapped = cl.wrap(model, input_size=(8, 8))
    picture = features.class_model(wrapped, 1, steps=3, size=(8, 8))
    assert torch.isfinite(picture.data["image"]).all()
    assert features.activations(model, x[:1], "net.act2").data["activations"].shape == (8, 4, 4)
