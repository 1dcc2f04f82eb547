"""Ablation-CAM from the layer on against its full passes (Desai & Ramaswamy 2020).

The oracle is the method forced to run one full forward pass per ablated channel (the private
switch ``AblationCAM._full_passes``), as it always ran before: every model it explains from the
layer on must give the same maps. In float64 they agree to 1e-5 of the largest magnitude (to
rounding); in float32 the full passes themselves move by a few 1e-5 with the batch size (the
bundled model's head at 96 px: 3e-5 between batch sizes 16 and 4), so float32 is held to 1e-4.
Where the network after the layer cannot take one row per channel (a torch.cat or an in-place
update of an earlier tensor, a reshape to the input's batch, rows that mix), the method must
notice it and run the full passes, with the same maps and an honest count of forwards.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from conftest import probe, tiny, tiny_input
from test_lifecycle import assert_same, snapshot
from torch import nn
from zoo import ZOO, zoo_input

import convlens as cl
from convlens.methods import ablation
from convlens.methods.cam import AblationCAM

TARGET = [1, 3]


def explain(model: Any, x: torch.Tensor, full: bool = False, **kwargs: Any) -> cl.Explanation:
    """Ablation-CAM from the layer on, or (``full``) with one full pass per channel."""
    old = AblationCAM._full_passes
    AblationCAM._full_passes = full
    try:
        target = kwargs.pop("target", TARGET[: len(x)])
        return cl.explain(model, x, "ablationcam", target=target, progress=False, **kwargs)
    finally:
        AblationCAM._full_passes = old


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.abs().max().item()
    assert scale > 0, "the expected map is all zeros: the test would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale)


def same_as_full(model: nn.Module, x: torch.Tensor, rtol: float, **kwargs: Any) -> cl.Explanation:
    """The method from the layer on, checked against its full passes; the model untouched."""
    module = getattr(model, "module", model)
    before = snapshot(module)
    fast = explain(model, x, **kwargs)
    assert_same(before, snapshot(module))
    full = explain(model, x, full=True, **kwargs)
    assert full.resolved["ablation"] == "full passes (forced)"
    close(fast.attribution, full.attribution, rtol)
    return fast


# -- the bundled model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> cl.Model:
    return cl.load_model("efficientnet-lite0")


def photo(model: cl.Model, size: int) -> torch.Tensor:
    x = model.preprocess(cl.sample_images()["chelsea"])
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def test_bundled_head_is_ablated_from_the_layer_on(lite0):
    """The 3x3x1280 head at 96 px: the model reads its batch size from the input
    (``x.view(bs, -1)``), which sees the rows; 1281 rows in a few passes of one image."""
    x = photo(lite0, 96)
    probed = probe(lite0, x)
    fast = same_as_full(lite0, x, rtol=1e-4, target=[281], relu=False)
    assert fast.layer == "_swish" and fast.resolved["ablation"] == "from the layer"
    assert fast.resolved["rows_from_layer"] == 1281
    passes = fast.forwards - probed - 1 - 1  # the clean pass, the check
    assert 1 <= passes <= 8, fast.forwards


def test_bundled_inner_layer_with_a_residual_skip_float64(lite0):
    """Inside an MBConv block: the skip ``x + inputs`` reads the block's input (batch 1)."""
    model = copy.deepcopy(lite0.module).double()
    x = photo(lite0, 64).double()
    fast = same_as_full(model, x, rtol=1e-5, target=[281], layer="_blocks.4._bn2", relu=False)
    assert fast.resolved["ablation"] == "from the layer"


# -- the zoo -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(ZOO))
def test_zoo_default_layer_from_the_layer_on(family):
    model, x = ZOO[family]().double(), zoo_input().double()
    fast = same_as_full(model, x, rtol=1e-5, relu=False)
    assert fast.resolved["ablation"] == "from the layer"
    model32 = ZOO[family]()
    same_as_full(model32, zoo_input(), rtol=1e-4, relu=False)


# (family, layer, from the layer on?): skips that broadcast, and concatenations or in-place
# updates of earlier tensors that cannot take the rows
INNER = [
    ("resnet_basic", "layer3", True),  # the next block's identity reads the layer
    ("resnet_basic", "layer4.0.bn2", True),  # out += identity: the rows take the skip in place
    ("resnet_basic", "layer4.0.downsample", False),  # out += identity: out is batch 1
    ("resnet_bottleneck", "layer4.0.relu", True),  # a module called twice in the block
    ("densenet", "features.denseblock1.denselayer1", False),  # torch.cat of earlier maps
    ("densenet", "features.transition1", True),
    ("inception", "Mixed_6a.branch3x3", False),  # torch.cat of the other branches
    ("mobilenet_v2", "features.3", True),
    ("efficientnet_b0", "features.2", True),
    ("convnext", "features.1", True),
    ("vit", "blocks.1.norm1", True),  # tokens; the residual stream is batch 1
]


@pytest.mark.parametrize(("family", "layer", "shortcut"), INNER)
def test_zoo_inner_layers(family, layer, shortcut):
    model, x = ZOO[family]().double(), zoo_input().double()
    probed = probe(model, x)
    fast = same_as_full(model, x, rtol=1e-5, layer=layer, relu=False)
    how = fast.resolved["ablation"]
    if shortcut:
        assert how == "from the layer", how
        assert fast.forwards == probed + 2 + 2 + 1  # clean, one pass each, the check
    else:
        assert how.startswith("full passes (RuntimeError after the layer"), how
        assert fast.resolved["rows_from_layer"] == 0
        channels = _channels(model, x, layer)
        assert fast.forwards == probed + 2 + 2 * channels  # failed attempts count nothing


def _channels(model: nn.Module, x: torch.Tensor, layer: str) -> int:
    seen: list[int] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: seen.append(o.shape[1])
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[-1]


# -- models that read the input's batch, or transform the input first -------------------------


class Reads(nn.Module):
    """conv, conv, flatten to the input's batch, linear: ``normalise`` adds a functional
    normalisation before the first module, ``view`` flattens with ``len(input)``."""

    def __init__(self, normalise: bool, view: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.normalise, self.view = normalise, view
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if self.normalise:
            x = (x - 0.5) / 2.0
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(h.reshape(n, -1) if self.view else h.flatten(1))


@pytest.mark.parametrize(
    ("normalise", "view", "wrapped", "how"),
    [
        (False, True, False, "from the layer"),  # expanded at the door: len(x) is the rows
        (False, True, True, "from the layer"),  # so is it for the wrapped network
        (True, False, False, "from the layer"),  # the door's batch reaches conv1: fed at batch 1
        (True, True, False, "full passes (RuntimeError after the layer"),  # neither works
    ],
)
def test_models_that_read_the_input(normalise, view, wrapped, how):
    model, x = Reads(normalise, view).eval(), tiny_input(2)
    model, layer = (nn.Sequential(model), "0.conv2") if wrapped else (model, "conv2")
    probed = probe(model, x)
    fast = same_as_full(model, x, rtol=1e-4, layer=layer, relu=False)
    assert fast.resolved["ablation"].startswith(how), fast.resolved
    passes = 2 * 8 if how.startswith("full") else 2 + 1
    assert fast.forwards == probed + 2 + passes


class MixesRows(nn.Module):
    """After its layer, each row is centred on the batch's mean: rows are not independent."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny(head="gap")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net.act2(self.net.conv2(self.net.pool(self.net.act1(self.net.conv1(x)))))
        h = h - 0.5 * h.mean(dim=0, keepdim=True)
        return self.net.fc(self.net.gap(h).flatten(1))


def test_rows_that_mix_are_caught_by_the_unablated_row():
    model, x = MixesRows().eval(), tiny_input(2)
    fast = same_as_full(model, x, rtol=1e-5, layer="net.act2", relu=False)
    assert fast.resolved["ablation"] == (
        "full passes (an un-ablated row's score differs from the clean pass's)"
    )


def test_a_wrong_row_is_caught_by_the_full_pass_check(monkeypatch):
    """The check must be able to fail: rows that ablate the wrong channels (shifted by one)
    keep the un-ablated row right; the full pass of the first channel catches them."""
    model, x = tiny(head="gap"), tiny_input(2)
    truth = explain(model, x, full=True, layer="act2")
    batch = ablation.FromLayer.batch

    def shifted(self, start, stop):
        inputs, made = batch(self, start, stop)
        return inputs, torch.where(made >= 0, (made + 1) % self.n, made)

    monkeypatch.setattr(ablation.FromLayer, "batch", shifted)
    e = explain(model, x, layer="act2")
    why = "an ablated row's score differs from a full pass's"
    assert e.resolved["ablation"] == f"full passes ({why})"
    close(e.attribution, truth.attribution, 1e-5)


def test_errors_of_the_model_itself_are_not_swallowed():
    """A model that fails on any ablated channel fails the full passes too: the error is
    raised, and the model is left as it was."""

    class DeadChannels(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            if (h.abs().sum(dim=(2, 3)) == 0).any():
                raise ValueError("a dead channel")
            return h

    model, x = tiny(head="gap"), tiny_input(1)
    model.conv2 = nn.Sequential(model.conv2, DeadChannels())
    cl.explain(model, x, "gradcam", target=1)  # no channel of conv2 is dead on the clean input
    before = snapshot(model)
    with pytest.raises(ValueError, match="a dead channel"):
        explain(model, x, layer="conv2.0", target=[1])
    assert_same(before, snapshot(model))


def test_several_passes_per_input_and_the_counts(monkeypatch):
    """Rows per pass: the widest output after the layer times the rows stays within the widest
    output of a full pass at the batch size. The tiny CNN at act2: 8x4x4 = 128 per row after
    the layer, 6x8x8 = 384 at conv1, so 3 rows per image of the batch size."""
    monkeypatch.setattr(ablation, "MIN_ELEMENTS", 0)
    model, x = tiny(head="gap"), tiny_input(3)
    probed = probe(model, x)
    fast = explain(model, x, layer="act2", batch_size=1, target=[0, 3, 1], relu=False)
    full = explain(model, x, full=True, layer="act2", batch_size=1, target=[0, 3, 1], relu=False)
    close(fast.attribution, full.attribution, 1e-5)
    # 3 rows per pass: 8 channels in passes of 3, 3, 2 (the first leads with the clean row)
    assert fast.forwards == probed + 3 + 3 * 3 + 1 and full.forwards == 3 + 3 * 8
    assert fast.resolved["rows_from_layer"] == 3 * 9


class Bar:
    """A progress bar that records its total and its updates."""

    bars: ClassVar[list[Bar]] = []

    def __init__(self, total: int = 0, **kwargs: Any) -> None:
        self.total, self.n = total, 0
        Bar.bars.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_later_input_falls_back_and_the_bar_ends_at_its_total(monkeypatch):
    """Rows after the layer are refused only for the second input (a data-dependent failure):
    the first input's passes stay, the second runs one full pass per channel."""

    class Picky(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            if len(h) > 1 and h.mean() > 1.0:
                raise ValueError("rows of a bright input")
            return h

    monkeypatch.setattr("convlens.engine.tqdm", Bar)
    Bar.bars = []
    model = tiny(head="gap")
    model.act2 = nn.Sequential(model.act2, Picky())
    x = torch.stack([tiny_input(1)[0] * 0.1, tiny_input(1)[0] + 3.0])
    probed = probe(model, x)
    e = cl.explain(model, x, "ablationcam", layer="act2.0", target=[1, 2], batch_size=1)
    assert e.resolved["ablation"] == (
        "from the layer for inputs 0-0, then full passes (ValueError after the layer: rows of a "
        "bright input)"
    )
    assert e.forwards == probed + 2 + (1 + 1) + 8 and e.resolved["rows_from_layer"] == 9
    (bar,) = Bar.bars
    assert bar.n == bar.total == e.forwards - probed
    full = explain(model, x, full=True, layer="act2.0", target=[1, 2], batch_size=1)
    close(e.attribution, full.attribution, 1e-5)
