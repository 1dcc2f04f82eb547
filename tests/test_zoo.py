"""Every registered method on every architecture family users bring (``tests/zoo.py``).

For each (family, method) pair, ``convlens.explain`` on a miniature of the family must:

(a) leave the model (and the input) exactly as it was (``test_lifecycle.snapshot``);
(b) return a finite attribution of the input's spatial size, or refuse with a
    ``convlens.checks.RequestError`` whose message is one line (a refusal of ``cam`` on a
    network whose head is global average pooling + one linear layer counts as a failure:
    CAM applies there);
(c) where it ran, keep its method's invariant: integrated gradients' completeness,
    DeepLIFT's summation-to-delta, LRP's conservation, and guided backpropagation differing
    from the signed gradient on networks with rectifiers.

What convlens gets wrong today is listed in ``KNOWN``, each entry a strict xfail: the test
must fail, and with the recorded kind of failure (``raises=``), so an entry must be removed
as soon as convlens is fixed. Also checked: the CAM methods' default layer is the one users
expect, and each miniature's forward on channels-last input.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from test_lifecycle import FAST, assert_same, classes, snapshot
from zoo import ZOO, zoo_input

import convlens as cl
from convlens.checks import RequestError

# What fails today, by (family, method) for the matrix, (family, "default_layer") for the
# CAM default layer. Each value is "<kind>: what fails and why"; kind is one of KINDS' keys
# (touched, crash, result, invariant, layer), and the test must fail with that kind.
KNOWN: dict[tuple[str, str], str] = {}


class ZooFailure(AssertionError):
    """A check of this file failed."""


class Touched(ZooFailure):
    """(a) explaining changed the model or the input."""


class Crashed(ZooFailure):
    """(b) an exception other than a RequestError."""


class BadResult(ZooFailure):
    """(b) a wrong attribution (shape, non-finite values), a refusal of more than one line,
    or a refusal where the method applies."""


class Broken(ZooFailure):
    """(c) the method's invariant does not hold: a silently wrong answer."""


class WrongLayer(ZooFailure):
    """The default layer of the CAM methods is not the one users expect."""


KINDS: dict[str, type[ZooFailure]] = {
    "touched": Touched,
    "crash": Crashed,
    "result": BadResult,
    "invariant": Broken,
    "layer": WrongLayer,
}

TARGET = [1, 3]

# FAST, adapted to the zoo: no layer for cam (FAST's "act2" is the tiny CNN's; every CAM runs
# on its default layer here), 64 integration steps for the completeness check.
SETTINGS: dict[str, dict[str, Any]] = {k: dict(v) for k, v in FAST.items() if k != "cam"}
SETTINGS["integrated_gradients"] = {"steps": 64}
SETTINGS["gradient_shap"] = {"n_samples": 5}

# |gap| <= IG_RELATIVE * |F(x) - F(x')| + IG_FLOOR. The floor is the quadrature's own error on
# piecewise-linear networks: 64 Gauss-Legendre nodes miss ReLU kinks by up to 0.015 on logits
# spread +-3 (ResNet, MobileNetV3), falling to 1e-3 at 256 steps; a wrong gradient misses by
# a fraction of the difference itself.
IG_RELATIVE, IG_FLOOR = 0.05, 0.02
DEEPLIFT_RELATIVE = 1e-3
LRP_RELATIVE = 0.01

# Families built with rectifiers (ReLU, ReLU6), where guided backpropagation must differ from
# the plain gradient; EfficientNet (SiLU), ConvNeXt and ViT (GELU) have none.
RECTIFIED = {
    "resnet_basic",
    "resnet_bottleneck",
    "densenet",
    "vgg",
    "inception",
    "xception",
    "mobilenet_v2",
    "mobilenet_v3",
    "regnet_y",
}

# Families whose output is one linear layer on the global average pooling of the last
# feature map (dropout aside), where CAM (Zhou et al. 2016) applies and must not refuse.
CAM_APPLIES = {
    "resnet_basic",
    "resnet_bottleneck",
    "densenet",
    "inception",
    "xception",
    "mobilenet_v2",
    "efficientnet_b0",
    "regnet_y",
}

# The layer users point CAM methods at (as in the papers' and pytorch-grad-cam's examples):
# the last feature map the classifier pools, at the module that returns it; for ViT, the last
# block's norm1 tokens (reshaped to a 4x4 grid).
EXPECTED_CAM_LAYER: dict[str, str] = {
    "resnet_basic": "layer4",
    "resnet_bottleneck": "layer4",
    "densenet": "features",
    "vgg": "features",
    "inception": "Mixed_7c",
    "xception": "act4",
    "mobilenet_v2": "features",
    "mobilenet_v3": "features",
    "efficientnet_b0": "features",
    "regnet_y": "trunk_output",
    "convnext": "features",
    "vit": "blocks.3.norm1",
}

# Miniatures whose forward raises on channels-last input (a fact about the model, recorded,
# not a convlens failure): convlens must then run them contiguous.
NO_CHANNELS_LAST: dict[str, str] = {
    "vgg": "x.view(x.size(0), -1) (older VGG code) needs a contiguous tensor",
}


def _known(key: tuple[str, str]) -> tuple[Any, ...]:
    reason = KNOWN.get(key)
    if reason is None:
        return ()
    kind = KINDS[reason.split(":", 1)[0]]
    return (pytest.mark.xfail(strict=True, raises=kind, reason=reason),)


def _matrix() -> list[Any]:
    return [
        pytest.param(family, method, marks=_known((family, method)), id=f"{family}-{method}")
        for family in ZOO
        for method in cl.list_methods()
    ]


def _families(check: str) -> list[Any]:
    return [pytest.param(family, marks=_known((family, check)), id=family) for family in ZOO]


def _explain(model: torch.nn.Module, x: torch.Tensor, method: str, **kwargs: Any) -> Any:
    return cl.explain(model, x, method, target=classes(method, TARGET), progress=False, **kwargs)


def _invariants(
    family: str, method: str, model: torch.nn.Module, x: torch.Tensor, e: Any
) -> list[str]:
    """What is wrong with the answer of a method that ran (empty if nothing)."""
    wrong = []
    extras = e.extras
    if method == "integrated_gradients":
        for i, (gap, difference) in enumerate(
            zip(extras["completeness_gap"], extras["score_difference"], strict=True)
        ):
            if abs(gap) > IG_RELATIVE * abs(difference) + IG_FLOOR:
                wrong.append(
                    f"input {i}: completeness gap {gap:.4g} for F(x) - F(x') {difference:.4g}"
                )
    elif method == "deeplift":
        sums = e.attribution.double().sum(dim=(1, 2, 3)).tolist()
        for i, (total, delta) in enumerate(zip(sums, extras["delta"], strict=True)):
            if abs(total - delta) > DEEPLIFT_RELATIVE * abs(delta) + 1e-5:
                wrong.append(f"input {i}: attribution sums to {total:.4g}, delta is {delta:.4g}")
    elif method == "lrp":
        for i, (inputs, absorbed, logit) in enumerate(
            zip(extras["input_relevance"], extras["absorbed"], extras["logit"], strict=True)
        ):
            if abs(inputs + absorbed - logit) > LRP_RELATIVE * abs(logit) + 1e-6:
                wrong.append(
                    f"input {i}: input relevance {inputs:.4g} + absorbed {absorbed:.4g} "
                    f"!= logit {logit:.4g}"
                )
    elif method == "guided_backprop" and family in RECTIFIED:
        gradient = _explain(model, x, "saliency", absolute=False).attribution
        scale = gradient.abs().max().item()
        if (e.attribution - gradient).abs().max().item() <= 1e-3 * scale:
            wrong.append("guided backpropagation equals the signed gradient")
    return wrong


@pytest.mark.parametrize(("family", "method"), _matrix())
def test_method_on_family(family, method):
    model, x = ZOO[family](), zoo_input()
    x_before, before = x.clone(), snapshot(model)
    found: dict[type[ZooFailure], list[str]] = {}
    e = refusal = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # LRP's non-conservation warning is an error in pytest
        try:
            e = _explain(model, x, method, **SETTINGS.get(method, {}))
        except RequestError as err:
            refusal = str(err)
        except Exception as err:
            found.setdefault(Crashed, []).append(f"{type(err).__name__}: {err}")
    try:
        assert_same(before, snapshot(model))
    except AssertionError as err:
        found.setdefault(Touched, []).append(f"the model changed: {err}")
    if not torch.equal(x, x_before):
        found.setdefault(Touched, []).append("the input changed")
    if refusal is not None:
        if "\n" in refusal.strip():
            found.setdefault(BadResult, []).append(f"refusal of several lines: {refusal!r}")
        if method == "cam" and family in CAM_APPLIES:
            found.setdefault(BadResult, []).append(f"refused where CAM applies: {refusal}")
    if e is not None:
        a = e.attribution
        if a.dim() != 4 or a.shape[0] != len(x) or a.shape[-2:] != x.shape[-2:]:
            found.setdefault(BadResult, []).append(f"attribution of shape {tuple(a.shape)}")
        elif not bool(torch.isfinite(a).all()):
            found.setdefault(BadResult, []).append("attribution with non-finite values")
        else:
            wrong = _invariants(family, method, model, x, e)
            if wrong:
                said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
                found[Broken] = wrong + [f"(warned: {s})" for s in said]
    for kind in (Touched, Crashed, BadResult, Broken):  # the first kind found is raised
        if kind in found:
            everything = "; ".join(m for messages in found.values() for m in messages)
            raise kind(f"{family} / {method}: {everything}")


@pytest.mark.parametrize("family", _families("default_layer"))
def test_cam_default_layer_is_the_one_users_expect(family):
    e = cl.explain(ZOO[family](), zoo_input(), "gradcam", progress=False)
    assert isinstance(e.layer, str) and e.layer, "e.layer does not name the layer chosen"
    if e.layer != EXPECTED_CAM_LAYER[family]:
        raise WrongLayer(f"gradcam chose {e.layer!r}; users expect {EXPECTED_CAM_LAYER[family]!r}")


@pytest.mark.parametrize("family", list(ZOO))
def test_forward_on_channels_last_input(family):
    """The forward gives the same logits on channels-last input, or raises where recorded
    (``NO_CHANNELS_LAST``); convlens runs the model channels-last exactly where it can."""
    model, x = ZOO[family](), zoo_input()
    with torch.no_grad():
        plain = model(x)
        if family in NO_CHANNELS_LAST:
            with pytest.raises(RuntimeError):
                model(x.contiguous(memory_format=torch.channels_last))
        else:
            fast = model(x.contiguous(memory_format=torch.channels_last))
            torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    e = _explain(model, x, "saliency")
    expected = "contiguous" if family in NO_CHANNELS_LAST else "channels_last"
    assert e.resolved["layout"] == expected


def test_known_failures_name_real_checks():
    methods = set(cl.list_methods()) | {"default_layer"}
    for (family, check), reason in KNOWN.items():
        assert family in ZOO and check in methods, (family, check)
        kind, _, why = reason.partition(":")
        assert kind in KINDS and why.strip() and "\n" not in reason, reason


@pytest.mark.parametrize("family", list(ZOO))
def test_zoo_models_are_small_deterministic_and_in_eval_mode(family):
    # small enough for the suite: the whole zoo run takes about 20 s on 2 cores (timed by the
    # suite as a whole, not here: a timing assertion fails on a loaded machine)
    model, x = ZOO[family](), zoo_input()
    assert not any(m.training for m in model.modules())
    assert 1_000 <= sum(p.numel() for p in model.parameters()) <= 100_000
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and bool(torch.isfinite(out).all())
    again = ZOO[family]()  # the same seed builds the same model
    for (name, value), other in zip(
        model.state_dict().items(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(value, other), name


def test_the_readme_table_is_the_zoo_run():
    """The README's architecture table is generated (scripts/zoo_table.py), not written."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    try:
        from zoo_table import table
    finally:
        sys.path.remove(str(root / "scripts"))
    assert table() in (root / "README.md").read_text(), "run scripts/zoo_table.py, update README"
