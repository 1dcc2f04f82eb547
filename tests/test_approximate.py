"""Approximate incremental occlusion (``approximate=tau``): Krypton's projective-field
thresholding (Nakandala, Kumar & Papakonstantinou 2019).

Oracles: plain occlusion (``Occlusion._incremental = False``) for ``tau = 1``; for ``tau < 1``
the truncated computation written out layer by layer on a small convolution stack, each
occluded copy run in full with its change from the clean activation zeroed outside the capped
region, the regions found by brute force (which output pixels read a changed input pixel);
for one threshold those regions are written out by hand.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny
from torch import nn
from zoo import ZOO, zoo_input

import convlens as cl
from convlens import incremental
from convlens.checks import RequestError
from convlens.methods.perturbation import Occlusion


@pytest.fixture(autouse=True)
def always(monkeypatch):
    """Localise whatever can be, however little it saves (the miniatures save little)."""
    monkeypatch.setattr(incremental, "WORTH", 0)
    monkeypatch.setattr(incremental, "MIN_AREA", 0)


def plain(monkeypatch, model, x, **params):
    with monkeypatch.context() as m:
        m.setattr(Occlusion, "_incremental", False)
        return cl.explain(model, x, "occlusion", progress=False, **params)


class Stack(nn.Module):
    """Three 3x3 convolutions (the second with stride 2, the third on a map padded at the
    bottom and right only: its regions shift up and left), tanh after each, a residual
    addition after the third, global mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(
            [nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 1, 0)]
        )
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.convs[0](x))
        b = torch.tanh(self.convs[1](a))
        c = b + torch.tanh(self.convs[2](F.pad(b, (0, 2, 0, 2))))
        return self.fc(c.mean(dim=(2, 3)))


Interval = tuple[int, int]


def reach(span: Interval, conv: nn.Conv2d, size: int) -> tuple[Interval, Interval]:
    """Output indices whose window reads an input index in ``span``, by brute force: unbounded,
    then inside [0, size)."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]  # type: ignore[index]
    hit = [o for o in range(-2 * size, 3 * size) if o * s - p < span[1] and o * s - p + k > span[0]]
    return (min(hit), max(hit) + 1), (max(min(hit), 0), min(max(hit) + 1, size))


def cut(raw: Interval, inside: Interval, side: int, tau: float) -> Interval:
    """The threshold's rule: at most ceil(tau side) long, centred on ``raw``, within ``inside``."""
    cap = math.ceil(round(tau * side, 9))
    if inside[1] - inside[0] <= cap:
        return inside
    start = raw[0] + (raw[1] - raw[0] - cap) // 2
    start = max(min(start, inside[1] - cap), inside[0])
    return start, start + cap


def masked(clean: torch.Tensor, new: torch.Tensor, rows: Interval, cols: Interval) -> torch.Tensor:
    """``new`` inside the rectangle, ``clean`` outside it."""
    out = clean.clone()
    out[..., rows[0] : rows[1], cols[0] : cols[1]] = new[..., rows[0] : rows[1], cols[0] : cols[1]]
    return out


def truncated(model: Stack, x: torch.Tensor, window: int, target: int,
              regions) -> torch.Tensor:  # fmt: skip
    """The map of non-overlapping windows (stride = window) where each occluded copy changes
    each layer only inside ``regions(top, left)``: one (rows, cols) per layer a, b, tanh(c),
    c."""
    c0, c1, c2 = model.convs
    with torch.no_grad():
        a = torch.tanh(c0(x))
        b = torch.tanh(c1(a))
        t = torch.tanh(c2(F.pad(b, (0, 2, 0, 2))))
        c = b + t
        clean = model.fc(c.mean(dim=(2, 3)))[0, target]
        out = torch.zeros(1, 1, *x.shape[-2:], dtype=x.dtype)
        for top in range(0, x.shape[-2], window):
            for left in range(0, x.shape[-1], window):
                ra, rb, rt, rc = regions(top, left)
                hidden = x.clone()
                hidden[..., top : top + window, left : left + window] = 0
                a2 = masked(a, torch.tanh(c0(hidden)), *ra)
                b2 = masked(b, torch.tanh(c1(a2)), *rb)
                t2 = masked(t, torch.tanh(c2(F.pad(b2, (0, 2, 0, 2)))), *rt)
                c2_ = masked(c, b2 + t2, *rc)
                drop = clean - model.fc(c2_.mean(dim=(2, 3)))[0, target]
                out[..., top : top + window, left : left + window] = drop
    return out


def rule(model: Stack, size: int, window: int, tau: float):
    """Each layer's region under the threshold, the reach found by brute force."""
    c0, c1, c2 = model.convs

    def regions(top: int, left: int):
        found = []
        for start in (top, left):
            span = (start, min(start + window, size))
            a = cut(*reach(span, c0, size), size, tau)
            b = cut(*reach(a, c1, size // 2), size // 2, tau)
            t = cut(*reach(b, c2, size // 2), size // 2, tau)
            union = (min(b[0], t[0]), max(b[1], t[1]))
            found.append((a, b, t, cut(union, union, size // 2, tau)))
        return list(zip(*found, strict=True))

    return regions


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding (maps are returned in float32)."""
    scale = expected.abs().max().item()
    assert scale > 0, "the expected map is all zeros: the test would prove nothing"
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6 * scale)


def approximate(model: nn.Module, x: torch.Tensor, tau: float | None, **params):
    return cl.explain(model, x, "occlusion", approximate=tau, progress=False, **params)


def test_a_threshold_of_the_window_keeps_each_change_on_the_window():
    """16-pixel input, 4-pixel windows, tau = 1/4: each layer's region is capped at 4 pixels
    (16 x 16 maps) and 2 (8 x 8), worked out by hand: the window's own pixels at the first
    layer, their half-size footprint after the stride-2 convolution, that footprint shifted
    up and left by one pixel (away from the top and left border) after the third convolution
    and, the union with the footprint cut back to 2, after the addition."""
    model = Stack().double().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)).double()

    def by_hand(top: int, left: int):
        first = ((top, top + 4), (left, left + 4))
        half = ((top // 2, top // 2 + 2), (left // 2, left // 2 + 2))
        up, back = max(top // 2 - 1, 0), max(left // 2 - 1, 0)
        shifted = ((up, up + 2), (back, back + 2))
        return first, half, shifted, shifted

    expected = truncated(model, x, 4, 2, by_hand)
    e = approximate(model, x, 0.25, target=2, window=4, stride=4, score="logit")
    assert e.resolved["incremental"]["approximate"] == 0.25
    assert e.resolved["incremental"]["reason"] == "mean: its output is not a 4-D map"
    close(e.attribution, expected)


def test_the_cut_keeps_a_region_inside_its_map():
    """The rule on rows of a 16-pixel map, tau = 1/4 (4 pixels), worked by hand: centred on
    the unbounded reach, shifted back inside the map at either border, left alone where short
    enough or empty; columns untouched where they fit."""
    rows = [(10, 16, 10, 20), (0, 6, -4, 6), (4, 10, 4, 10), (4, 7, 3, 8), (0, 0, 0, 0)]
    rects = torch.tensor([[a, b, 2, 5] for a, b, _, _ in rows])
    grown = torch.tensor([[a, b, 1, 6] for _, _, a, b in rows])
    out = incremental._cap(rects, grown, (16, 16), 0.25)
    expected = [[12, 16], [0, 4], [5, 9], [4, 7], [0, 0]]
    assert out.tolist() == [[a, b, 2, 5] for a, b in expected]


@pytest.mark.parametrize("tau", [0.3, 0.45, 0.6, 0.8])
@pytest.mark.parametrize("size", [16, 18])
def test_the_threshold_gives_the_truncated_computation(tau, size):
    model = Stack().double().eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2)).double()
    expected = truncated(model, x, 3, 1, rule(model, size, 3, tau))
    e = approximate(model, x, tau, target=1, window=3, stride=3, score="logit")
    close(e.attribution, expected)


def test_the_error_shrinks_as_the_threshold_grows(monkeypatch):
    """32-pixel input, 4-pixel windows: the mean error against plain occlusion falls as tau
    grows, to none from tau = 0.4 (13 pixels on the first map, 7 on the others: more than any
    region reaches, so the cap never binds)."""
    model = Stack().double().eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()
    exact = plain(monkeypatch, model, x, target=0, window=4, stride=2).attribution
    errors = [
        (approximate(model, x, tau, target=0, window=4, stride=2).attribution - exact).abs().mean()
        for tau in (0.1, 0.15, 0.2, 0.3, 0.4, 1.0)
    ]
    assert all(a > b for a, b in pairwise(errors[:4])), errors
    assert errors[3] > 0 and errors[4] == errors[5] == 0, errors


@pytest.mark.parametrize("family", sorted(ZOO))
def test_a_threshold_of_one_is_exact(monkeypatch, family):
    model, x = ZOO[family]().double(), zoo_input(1).double()
    exact = approximate(model, x, None, target=3, window=8, stride=6)
    one = approximate(model, x, 1.0, target=3, window=8, stride=6)
    assert torch.equal(one.attribution, exact.attribution)
    reference = plain(monkeypatch, model, x, target=3, window=8, stride=6).attribution
    torch.testing.assert_close(one.attribution, reference, rtol=1e-4,
                               atol=1e-4 * reference.abs().max().item())  # fmt: skip
    record, before = one.resolved["incremental"], exact.resolved["incremental"]
    if isinstance(before, dict):
        assert record == before | {"approximate": 1.0}
    else:
        assert record == f"{before}; exact, not approximate=1.0"


@pytest.mark.parametrize("family", sorted(ZOO))
def test_every_zoo_family_runs_approximately(family):
    """On every miniature: tau = 0.99, whose cap (ceil(0.99 side)) is each map's whole side,
    runs the capping and gives the exact map; tau = 0.3 gives a finite map that differs,
    except where only a patchifying convolution (stride = kernel) is localised: there a
    region never outgrows the cap."""
    model, x = ZOO[family]().double(), zoo_input(1).double()
    exact = approximate(model, x, None, target=3, window=8, stride=6)
    loose = approximate(model, x, 0.99, target=3, window=8, stride=6)
    assert loose.resolved["incremental"] == exact.resolved["incremental"] | {"approximate": 0.99}
    assert torch.equal(loose.attribution, exact.attribution)
    cut = approximate(model, x, 0.3, target=3, window=8, stride=6)
    assert cut.resolved["incremental"]["approximate"] == 0.3
    assert torch.isfinite(cut.attribution).all()
    patchify = family in ("convnext", "vit")
    assert torch.equal(cut.attribution, exact.attribution) == patchify, cut.resolved


def test_a_model_that_cannot_run_incrementally_runs_plain_and_exact(monkeypatch):
    model = tiny()
    handle = model.conv2.register_forward_hook(lambda m, i, o: o * 2)
    try:
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(11))
        e = approximate(model, x, 0.5, target=1, window=2, stride=2)
        reference = plain(monkeypatch, model, x, target=1, window=2, stride=2)
    finally:
        handle.remove()
    assert e.resolved["incremental"] == (
        "plain (the model has forward hooks); exact, not approximate=0.5"
    )
    assert torch.equal(e.attribution, reference.attribution)


@pytest.mark.parametrize("tau", [0, 0.0, -0.5, 1.01, float("nan"), True, "0.5", [0.5]])
def test_a_bad_threshold_is_refused(tau):
    with pytest.raises(RequestError, match=r"approximate=.* must be a number in \(0, 1\]"):
        cl.explain(tiny(), torch.zeros(1, 3, 8, 8), "occlusion", approximate=tau)
