"""Incremental occlusion (``convlens.incremental``) against plain occlusion, and occlusion's
probability score against a hand computation.

The oracle is plain occlusion: every occluded copy through the whole model
(``Occlusion._incremental = False``). Incremental occlusion must give the same map, the same
number of forwards, and leave the model as it was; the zoo runs in float64 so that agreement is
not hidden by float32 rounding (the bundled model runs in float32, at 1e-4).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import probe, tiny
from test_lifecycle import assert_same, snapshot
from torch import nn
from zoo import ZOO, zoo_input

import convlens as cl
from convlens import incremental
from convlens.methods.perturbation import Occlusion
from convlens.targets import Channel, Contrast


@pytest.fixture(autouse=True)
def always(monkeypatch):
    """Localise whatever can be, however little it saves (the miniatures save little)."""
    monkeypatch.setattr(incremental, "WORTH", 0)
    monkeypatch.setattr(incremental, "MIN_AREA", 0)


def both(monkeypatch, model, x, **params):
    """Occlusion computed incrementally, then plain, on the same model and inputs."""
    probed = probe(model, x)
    fast = cl.explain(model, x, "occlusion", progress=False, **params)
    with monkeypatch.context() as m:
        m.setattr(Occlusion, "_incremental", False)
        slow = cl.explain(model, x, "occlusion", progress=False, **params)
    assert slow.resolved["incremental"] == "plain (switched off)"
    assert fast.forwards - probed == slow.forwards
    return fast, slow


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.abs().max().item()
    assert scale > 0, "the expected map is all zeros: the test would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def localised(result) -> bool:
    record = result.resolved["incremental"]
    return isinstance(record, dict) and record["localised up to"] not in (None, "x")


@pytest.mark.parametrize("family", sorted(ZOO))
def test_zoo_equals_plain_occlusion(monkeypatch, family):
    model = ZOO[family]().double()
    x = zoo_input(1).double()
    before = snapshot(model)
    fast, slow = both(monkeypatch, model, x, target=3, window=8, stride=6)
    close(fast.attribution, slow.attribution, 1e-4)
    assert_same(before, snapshot(model))


def test_results_do_not_depend_on_batch_size():
    model, x = ZOO["inception"]().double(), zoo_input(2).double()
    one = cl.explain(model, x, "occlusion", window=6, stride=5, batch_size=1, progress=False)
    many = cl.explain(model, x, "occlusion", window=6, stride=5, batch_size=64, progress=False)
    assert localised(one) and localised(many)
    close(many.attribution, one.attribution, 1e-9)


# families whose first layers are local (convolution, pooling, normalisation, activations,
# additions, concatenations): localisation must go past the input there
DEEP = ("resnet_basic", "resnet_bottleneck", "densenet", "vgg", "inception", "mobilenet_v2")


@pytest.mark.parametrize("family", DEEP)
def test_localisation_reaches_past_the_input(monkeypatch, family):
    fast, _ = both(monkeypatch, ZOO[family]().double(), zoo_input(1).double(), window=4, stride=4)
    assert localised(fast), fast.resolved


@pytest.mark.parametrize(
    ("window", "stride", "size"),
    [
        (5, 3, (32, 32)),  # the stride does not divide the side
        (32, 32, (32, 32)),  # the window is the whole input
        (3, 5, (32, 32)),  # stride larger than the window: pixels no window covers
        (1, 7, (32, 32)),  # one-pixel window
        (7, 4, (29, 35)),  # odd, non-square input
    ],
)
@pytest.mark.parametrize("family", ["resnet_basic", "inception", "vgg"])
def test_window_edge_cases(monkeypatch, family, window, stride, size):
    model = ZOO[family]().double()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2)).double()
    fast, slow = both(monkeypatch, model, x, target=1, window=window, stride=stride)
    close(fast.attribution, slow.attribution, 1e-4)


def test_bundled_model_equals_plain_occlusion(monkeypatch, bundled):
    x = torch.randn(1, 3, 72, 72, generator=torch.Generator().manual_seed(0))
    for score in ("probability", "logit"):
        fast, slow = both(monkeypatch, bundled, x, window=16, stride=8, score=score)
        close(fast.attribution, slow.attribution, 1e-4)
        assert localised(fast), fast.resolved


class Functional(nn.Module):
    """The functional forms and corner cases of the local operations: ``F.conv2d`` with
    dilation, groups and ``padding="same"``, ``F.pad``, max pooling with ``ceil_mode``, average
    pooling whose divisor depends on the position (not local: localisation stops there),
    ``F.relu(x, True)``, a concatenation along channels and a broadcast channel scale."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(8)
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3, generator=generator) * 0.3)
        self.w2 = nn.Parameter(torch.randn(6, 2, 3, 3, generator=generator) * 0.3)
        self.scale = nn.Parameter(torch.rand(1, 6, 1, 1, generator=generator) + 0.5)
        self.conv = nn.Conv2d(12, 8, 3, padding="same", dilation=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.conv2d(F.pad(x, (1, 2, 0, 1)), self.w1, None, 1, 0, 2)
        a = F.max_pool2d(a, 3, 2, 1, ceil_mode=True)  # signed: the -inf padding matters
        b = F.relu(F.conv2d(a, self.w2, None, 1, 1, 1, 3), True) * self.scale
        c = self.conv(torch.cat([a, b], dim=1))
        c = F.avg_pool2d(c, 3, 1, 1, count_include_pad=False)
        return self.fc(c.mean(dim=(2, 3)))


def test_functional_forms_equal_plain_occlusion(monkeypatch):
    x = torch.randn(2, 3, 41, 37, generator=torch.Generator().manual_seed(9)).double()
    fast, slow = both(monkeypatch, Functional().double().eval(), x, target=[1, 2], window=5,
                      stride=3)  # fmt: skip
    close(fast.attribution, slow.attribution, 1e-6)
    record = fast.resolved["incremental"]
    assert record["localised up to"] == "conv"
    assert record["reason"] == "avg_pool2d: not a local operation"


class Outputs(nn.Module):
    """A model that returns a dict: the engine picks its ``logits``, for both ways."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ZOO["vgg"]()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"logits": logits, "aux": logits.sigmoid()}


@pytest.mark.filterwarnings("ignore:Outputs returns a dict")
def test_a_dict_output_equals_plain_occlusion(monkeypatch):
    x = zoo_input(1).double()
    fast, slow = both(monkeypatch, Outputs().double().eval(), x, target=2, window=8, stride=8)
    close(fast.attribution, slow.attribution, 1e-6)
    assert localised(fast)


def test_hooks_on_the_model_run_plain(monkeypatch):
    model = tiny()
    handle = model.conv2.register_forward_hook(lambda m, i, o: o * 2)
    try:
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(11))
        fast, slow = both(monkeypatch, model, x, target=1, window=2, stride=2)
    finally:
        handle.remove()
    assert fast.resolved["incremental"] == "plain (the model has forward hooks)"
    assert torch.equal(fast.attribution, slow.attribution)


class ValueBranch(nn.Module):
    """A forward that branches on a value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if x.sum() > -1e9 else -self.net(x)


class ReadAgain(nn.Module):
    """An in-place change of a value that is read again afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = torch.relu_(y)
        return self.fc((y + z).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (ValueBranch(), "plain (torch.fx cannot trace the model"),
        (ReadAgain(), "plain (relu_ changes a value in place that is read again)"),
    ],
)
def test_what_cannot_be_localised_falls_back_to_plain(monkeypatch, model, reason):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    fast, slow = both(monkeypatch, model.eval(), x, target=1, window=3, stride=2)
    assert fast.resolved["incremental"].startswith(reason)
    close(fast.attribution, slow.attribution, 1e-6)


def test_too_little_to_skip_runs_plain(monkeypatch):
    """The 32-pixel miniatures skip a few thousand multiply-adds per localised node: less
    than the crops' bookkeeping costs, so plain occlusion runs, and says why."""
    monkeypatch.setattr(incremental, "WORTH", 200_000)
    fast, slow = both(monkeypatch, ZOO["vgg"](), zoo_input(1), window=8, stride=4)
    assert fast.resolved["incremental"].startswith("plain (incremental would skip ")
    assert torch.equal(fast.attribution, slow.attribution)


def test_small_inputs_run_plain_untraced(monkeypatch):
    """Under MIN_AREA pixels nothing is traced: plain occlusion, and the reason."""
    monkeypatch.setattr(incremental, "MIN_AREA", 128 * 128)
    traced = []
    monkeypatch.setattr(incremental.fx, "symbolic_trace", lambda m: traced.append(m))
    fast, slow = both(monkeypatch, ZOO["vgg"](), zoo_input(1), window=8, stride=4)
    assert fast.resolved["incremental"].startswith("plain (inputs under 16384 pixels: too little")
    assert not traced and torch.equal(fast.attribution, slow.attribution)


def test_in_place_activations_keep_the_cache_clean(monkeypatch):
    """ReLU(inplace=True) after every convolution: crops and cached maps stay separate."""
    model = tiny("relu_inplace").double()
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)).double()
    fast, slow = both(monkeypatch, model, x, target=[0, 2], window=2, stride=1)
    close(fast.attribution, slow.attribution, 1e-6)
    assert localised(fast)
    assert_same(before, snapshot(model))


# -- the probability score (Zeiler & Fergus 2014) -------------------------------------------------


@pytest.mark.parametrize("incremental", [True, False])
def test_occlusion_scores_the_drop_of_the_class_probability(monkeypatch, incremental):
    """Windows 4 x 4 with stride 4 tile an 8 x 8 input: each pixel carries the drop of the
    probability of its class when its own tile is zeroed, computed here by hand."""
    monkeypatch.setattr(Occlusion, "_incremental", incremental)
    model = tiny()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    e = cl.explain(model, x, "occlusion", target=[1, 4], window=4, stride=4)
    assert e.resolved["score"] == "probability"
    expected = torch.zeros(2, 1, 8, 8)
    with torch.no_grad():
        for i, c in enumerate([1, 4]):
            clean = model(x[i : i + 1]).softmax(-1)[0, c]
            for top in (0, 4):
                for left in (0, 4):
                    hidden = x[i : i + 1].clone()
                    hidden[..., top : top + 4, left : left + 4] = 0
                    drop = clean - model(hidden).softmax(-1)[0, c]
                    expected[i, 0, top : top + 4, left : left + 4] = drop
    torch.testing.assert_close(e.attribution, expected, rtol=1e-4, atol=1e-6)


def test_a_contrast_scores_the_difference_of_the_probabilities():
    model = tiny()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    e = cl.explain(model, x, "occlusion", target=Contrast(2, 0), window=8, stride=8)
    assert e.resolved["score"] == "probability"
    with torch.no_grad():
        clean, hidden = model(x).softmax(-1)[0], model(torch.zeros_like(x)).softmax(-1)[0]
    drop = (clean[2] - clean[0]) - (hidden[2] - hidden[0])
    torch.testing.assert_close(e.attribution, drop.expand(1, 1, 8, 8), rtol=1e-5, atol=1e-7)


def test_inner_unit_targets_keep_their_raw_values():
    """A channel has no class probability: under "probability" it scores its raw activation,
    the same map as "logit", and the record says so (plain occlusion: the target reads an
    inner layer the crops would not show)."""
    model = tiny()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    target = Channel("conv2", 3)
    raw = cl.explain(model, x, "occlusion", target=target, window=2, stride=2)
    logit = cl.explain(model, x, "occlusion", target=target, window=2, stride=2, score="logit")
    close(raw.attribution, logit.attribution, 1e-6)
    assert raw.resolved["score"] == "probability (raw values for Channel targets)"
    assert raw.resolved["incremental"] == "plain (the target reads an inner layer)"


def test_bad_score_is_refused():
    with pytest.raises(ValueError, match="score must be 'probability' or 'logit'"):
        cl.explain(tiny(), torch.zeros(1, 3, 8, 8), "occlusion", score="logits")


def test_a_changed_model_is_traced_again():
    """The trace is remembered per model and its modules: a replaced layer is seen."""
    model = tiny()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    first = cl.explain(model, x, "occlusion", target=0, window=2, stride=2)
    changed = copy.deepcopy(model)
    changed.conv2 = nn.Conv2d(6, 8, 3, padding=1)
    fast = cl.explain(changed, x, "occlusion", target=0, window=2, stride=2)
    with torch.no_grad():
        model.conv2 = changed.conv2
    again = cl.explain(model, x, "occlusion", target=0, window=2, stride=2)
    close(again.attribution, fast.attribution, 1e-6)
    assert not torch.allclose(first.attribution, again.attribution)


@pytest.mark.parametrize("family", ["mobilenet_v2", "resnet_bottleneck"])
def test_aligned_crops_equal_the_copied_ones(monkeypatch, family):
    """Windows whose input crops are exactly their source's crops (1x1 convolutions) read
    those crops as they are: the same scores, bit for bit, as copying them out."""
    model, x = ZOO[family]().double(), zoo_input(1).double()
    found = []
    real = incremental._aligned

    def spy(*args):
        found.append(real(*args))
        return found[-1]

    monkeypatch.setattr(incremental, "_aligned", spy)
    fast = cl.explain(model, x, "occlusion", target=3, window=8, stride=6, progress=False)
    assert any(found), "no aligned window: the test would prove nothing"
    monkeypatch.setattr(incremental, "_aligned", lambda *args: False)
    copied = cl.explain(model, x, "occlusion", target=3, window=8, stride=6, progress=False)
    assert torch.equal(fast.attribution, copied.attribution)
