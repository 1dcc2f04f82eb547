"""LRP's ledger across paddings: relevance on a zero padding's border is nothing (the rules put
relevance on inputs in proportion to them), relevance that does fall on a border (a padding
of ones) is counted as absorbed, so that input relevance + absorbed = the logit
(conservation, Bach et al. 2015) in every case."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens.methods.relevance import Epsilon, Ledger, lrp_context


def lrp(net: nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
    """(input relevance, absorbed, logit) of class 0 under epsilon."""
    ledger = Ledger()
    x = x.clone().requires_grad_(True)
    with lrp_context(net, lambda layer: Epsilon(epsilon=1e-9), ledger, epsilon=1e-9):
        out = net(x)[:, 0].sum()
        (relevance,) = torch.autograd.grad(out, x, out.detach())
    return relevance.sum().item(), ledger.absorbed.item(), out.item()


def unbiased(*layers: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(*layers).double().eval()
    for m in net.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    return net


def test_a_zero_padding_loses_nothing():
    net = unbiased(
        nn.ZeroPad2d((0, 1, 2, 1)), nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(30, 2)
    )
    x = torch.rand(1, 2, 4, 3, generator=torch.Generator().manual_seed(1)).double() + 0.1
    inputs, absorbed, logit = lrp(net, x)
    assert inputs + absorbed == pytest.approx(logit, rel=1e-12)
    assert abs(absorbed) < 1e-6 * abs(logit)  # no bias: only the stabiliser's trace


@pytest.mark.parametrize(
    "padding", [nn.ConstantPad2d(1, 1.0), nn.ReflectionPad2d(1)], ids=["ones", "reflect"]
)
def test_relevance_on_a_border_is_absorbed_or_handed_back(padding):
    """A padding of ones takes relevance (its values are inputs of the convolution): a constant,
    like a bias, so the ledger counts it as absorbed; a reflection hands it back to the
    input, whose relevance then holds it all."""
    net = unbiased(padding, nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    with torch.no_grad():  # positive weights: every unit takes part
        net[1].weight.abs_()
        net[-1].weight.abs_()
    x = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(2)).double() + 0.1
    inputs, absorbed, logit = lrp(net, x)
    assert inputs + absorbed == pytest.approx(logit, rel=1e-12)
    if isinstance(padding, nn.ReflectionPad2d):
        assert abs(absorbed) < 1e-6 * abs(logit)
    else:
        assert absorbed > 0.1 * logit  # the border took its share
