"""LRP rules and composites against matrix-form computations of the same formulas,
conservation, inner-unit targets, batching, and DeepLIFT / DeepSHAP / GradientSHAP against
captum."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import convlens as cl
from convlens.baselines import make_baseline
from convlens.checks import RequestError
from convlens.methods.relevance import (
    COMPOSITES,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Ledger,
    Rule,
    Settings,
    ZBox,
    ZPlus,
    lrp_context,
)
from convlens.targets import Channel, Neuron

RULES = {
    "epsilon": Epsilon(epsilon=0.01),
    "gamma": Gamma(gamma=0.25, epsilon=1e-9),
    "zplus": ZPlus(epsilon=1e-9),
    "zplus_bias": ZPlus(epsilon=1e-9, bias=True),
    "alpha_beta": AlphaBeta(alpha=2.0, beta=1.0, epsilon=1e-9),
    "alpha_beta_bias": AlphaBeta(alpha=2.0, beta=1.0, epsilon=1e-9, bias=True),
    "zbox": ZBox(low=-2.0, high=3.0, epsilon=1e-9),
    "flat": Flat(epsilon=1e-9),
}


def stabilised(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).double()


def matrix_rule(
    rule: Rule,
    m: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    r: torch.Tensor,
    ones: torch.Tensor | None = None,
) -> torch.Tensor:
    """R_in of one layer y = M a + b in matrix form (Montavon et al. 2019); ``ones`` is the
    layer's map with every weight 1 (flat: each connection counts once per use). z+ and
    alpha-beta with ``bias``: b+ joins the positive denominator and b- the negative one, as
    zennit's ZPlus and AlphaBeta do; without it, biases are left out (Montavon et al. 2017)."""
    mp, mn = m.clamp(min=0), m.clamp(max=0)
    ap, an = a.clamp(min=0), a.clamp(max=0)
    eps = rule.epsilon
    if rule.name == "epsilon":
        return a * (m.T @ (r / stabilised(m @ a + b, eps)))
    if rule.name == "gamma":  # sign-aware: units with z >= 0 favour positive contributions
        g, upward = rule.gamma, (m @ a + b) >= 0
        result = torch.zeros_like(a)
        for mask, favoured, other, bias in (
            (upward, mp, mn, b + g * b.clamp(min=0)),
            (~upward, mn, mp, b + g * b.clamp(max=0)),
        ):
            w_pos, w_neg = m + g * favoured, m + g * other
            s = torch.where(mask, r / stabilised(w_pos @ ap + w_neg @ an + bias, eps), 0.0)
            result += ap * (w_pos.T @ s) + an * (w_neg.T @ s)
        return result
    bias = getattr(rule, "bias", False)
    zp = mp @ ap + mn @ an + (b.clamp(min=0) if bias else 0)
    positive = ap * (mp.T @ (r / stabilised(zp, eps))) + an * (mn.T @ (r / stabilised(zp, eps)))
    if rule.name == "zplus":
        return positive
    if rule.name == "alpha_beta":
        zn = mn @ ap + mp @ an + (b.clamp(max=0) if bias else 0) - 1e-12
        negative = ap * (mn.T @ (r / stabilised(zn, eps))) + an * (mp.T @ (r / stabilised(zn, eps)))
        return rule.alpha * positive - rule.beta * negative
    if rule.name == "zbox":
        low, high = torch.full_like(a, rule.low), torch.full_like(a, rule.high)
        s = r / stabilised(m @ a - mp @ low - mn @ high, eps)
        return a * (m.T @ s) - low * (mp.T @ s) - high * (mn.T @ s)
    if rule.name == "flat":
        return ones.T @ (r / stabilised(ones @ torch.ones_like(a), eps))
    raise ValueError(rule.name)


def layer_matrix(
    layer: nn.Module, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer as y = M a + b over flattened inputs: M is the Jacobian of the layer's own
    forward without its bias (its padding, padding mode and groups included); the third matrix
    is the same with every weight 1 (the layer's connections)."""
    n = int(torch.tensor(shape).prod())

    def matrix(weight: torch.Tensor | None) -> torch.Tensor:
        def linear_part(v: torch.Tensor) -> torch.Tensor:
            if weight is None:  # pooling
                return layer(v.view(1, *shape)).flatten()
            parameters = {"weight": weight, "bias": None}
            return functional_call(layer, parameters, (v.view(1, *shape),)).flatten()

        return torch.autograd.functional.jacobian(linear_part, torch.zeros(n).double())

    weight = getattr(layer, "weight", None)
    m = matrix(None if weight is None else weight.detach().double())
    ones = None if weight is None else matrix(torch.ones_like(weight).double())
    bias = getattr(layer, "bias", None)
    if bias is None:
        return m, torch.zeros(m.shape[0]).double(), ones
    return m, bias.detach().double().repeat_interleave(m.shape[0] // bias.numel()), ones


def dense_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)
    ).double()


def conv_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()


Choice = Rule | dict[int, Rule]  # one rule for all layers, or rules by position in the net


def lrp_with(
    net: nn.Sequential,
    x: torch.Tensor,
    rules: Rule | Callable[[nn.Module], Rule],
    target: int,
    epsilon: float | None = None,
) -> tuple[torch.Tensor, Ledger]:
    """LRP of ``net`` for class ``target`` with one rule, or a composite's chooser."""
    ledger = Ledger()
    x = x.clone().requires_grad_(True)
    choose = (lambda layer: rules) if isinstance(rules, Rule) else rules
    eps = rules.epsilon if isinstance(rules, Rule) else epsilon
    with lrp_context(net, choose, ledger, epsilon=eps):
        out = net(x)
        (relevance,) = torch.autograd.grad(out[:, target].sum(), x, out[:, target].detach().sum())
    return relevance, ledger


def matrix_lrp(net: nn.Sequential, x: torch.Tensor, rule: Choice, target: int) -> torch.Tensor:
    """LRP layer by layer in matrix form; average pooling under epsilon, ReLU and Flatten pass
    relevance on. A module listed twice in ``net`` is used twice (shared weights). ``rule``:
    one rule for every layer, or a rule for each layer's position in ``net``."""
    activations, a = [], x
    for layer in net:
        activations.append(a)
        a = layer(a)
    r = torch.zeros_like(a[0])
    r[target] = a[0, target]
    some = rule if isinstance(rule, Rule) else next(iter(rule.values()))
    pooling = Epsilon(epsilon=some.epsilon)
    for i in reversed(range(len(net))):
        layer, a_in = net[i], activations[i]
        own = rule if isinstance(rule, Rule) else rule.get(i)
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            r = padded_matrix_lrp(layer, a_in, own, r)
        elif isinstance(layer, (nn.Linear, nn.Conv2d, nn.AvgPool2d)):
            m, b, ones = layer_matrix(layer, tuple(a_in.shape[1:]))
            if isinstance(layer, nn.AvgPool2d):
                own = pooling
            r = matrix_rule(own, m, b, a_in[0].flatten(), r.flatten(), ones)
        r = r.reshape(a_in.shape[1:])
    return r


def padded_matrix_lrp(layer: nn.Conv2d, a: torch.Tensor, rule: Rule, r: torch.Tensor):
    """A convolution with a copying padding mode (reflect) as two layers: the padding, a copy
    matrix P through which relevance flows back summed over the copies (P^T R), and the
    convolution on the padded input, whose connections (one per copy) the rule sees."""

    def pad(v: torch.Tensor) -> torch.Tensor:
        return F.pad(v, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)

    padded = pad(a)
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        0,
        layer.dilation,
        layer.groups,
    ).double()
    conv.load_state_dict(layer.state_dict())
    m, b, ones = layer_matrix(conv, tuple(padded.shape[1:]))
    r_padded = matrix_rule(rule, m, b, padded[0].flatten(), r.flatten(), ones)
    copies = torch.autograd.functional.jacobian(
        lambda v: pad(v.view(a.shape)).flatten(), a.flatten().detach()
    )
    return copies.T @ r_padded


class StaticPadConv(nn.Conv2d):
    """A convolution that pads inside its forward, as EfficientNet's TensorFlow-style "same"
    convolutions do (here asymmetric: one more row and column at the end)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def odd_conv_net() -> nn.Sequential:
    """Every way a convolution can be called: padding inside the forward, a grouped
    convolution on inputs of both signs with a reflecting padding mode, string padding, a
    convolution used twice, average pooling and 1x1 convolutions."""
    torch.manual_seed(7)
    shared = nn.Conv2d(4, 4, 1)
    return nn.Sequential(
        StaticPadConv(2, 4, 3, stride=2),
        nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="reflect"),
        shared,
        nn.ReLU(),
        shared,
        nn.Conv2d(4, 3, 3, padding="same"),
        nn.ReLU(),
        nn.AvgPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    ).double()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    "make, shape",
    [(dense_net, (1, 6)), (conv_net, (1, 2, 5, 5)), (odd_conv_net, (1, 2, 7, 7))],
)
def test_each_rule_equals_its_matrix_form(rule, make, shape):
    net = make()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).double()
    ours, _ = lrp_with(net, x, RULES[rule], target=1)
    expected = matrix_lrp(net, x, RULES[rule], target=1)
    torch.testing.assert_close(ours[0], expected, rtol=1e-6, atol=1e-9)


# zennit's composites (chr5tphr/zennit, src/zennit/composites.py), written out per layer: the
# rule of each convolution / linear layer of conv_net (layers 0, 2 conv; 5 dense) and of
# dense_net (layers 0, 2, 4 dense). "First" is the first layer of the kinds zennit's first_map
# names: a Convolution for z^B (dense_net has none: no z^B), any linear layer for flat.
ZENNIT = {
    "epsilon_plus_box": {"conv": ("zbox", "zplus", "epsilon"), "dense": ("epsilon",) * 3},
    "epsilon_plus": {"conv": ("zplus", "zplus", "epsilon"), "dense": ("epsilon",) * 3},
    "epsilon_plus_flat": {
        "conv": ("flat", "zplus", "epsilon"),
        "dense": ("flat", "epsilon", "epsilon"),
    },
    "epsilon_gamma_box": {"conv": ("zbox", "gamma", "epsilon"), "dense": ("epsilon",) * 3},
    "epsilon_alpha2_beta1": {
        "conv": ("alpha_beta", "alpha_beta", "epsilon"),
        "dense": ("epsilon",) * 3,
    },
    "epsilon_alpha2_beta1_flat": {
        "conv": ("flat", "alpha_beta", "epsilon"),
        "dense": ("flat", "epsilon", "epsilon"),
    },
    "epsilon": {"conv": ("epsilon",) * 3, "dense": ("epsilon",) * 3},
}


def named_rule(name: str, bias: bool) -> Rule:
    """The rule ``name`` with the parameters of ``Settings(epsilon=1e-9, low=-2, high=3)``."""
    return {
        "epsilon": Epsilon(epsilon=1e-9),
        "zplus": ZPlus(epsilon=1e-9, bias=bias),
        "alpha_beta": AlphaBeta(alpha=2.0, beta=1.0, epsilon=1e-9, bias=bias),
        "gamma": Gamma(gamma=0.25, epsilon=1e-9),
        "zbox": ZBox(low=-2.0, high=3.0, epsilon=1e-9),
        "flat": Flat(epsilon=1e-9),
    }[name]


def test_the_composites_are_zennits():
    assert set(COMPOSITES) == set(ZENNIT)
    assert cl.get_method("lrp").defaults["composite"] == "epsilon_plus_box"
    assert cl.get_method("lrp").defaults["gamma"] == 0.25  # zennit's Gamma default
    assert {c.zennit for c in COMPOSITES.values()} >= {
        "EpsilonPlus",
        "EpsilonPlusFlat",
        "EpsilonGammaBox",
        "EpsilonAlpha2Beta1",
        "EpsilonAlpha2Beta1Flat",
    }


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", ZENNIT)
@pytest.mark.parametrize("kind, make, shape", [("conv", conv_net, (1, 2, 5, 5)),
                                               ("dense", dense_net, (1, 6))])  # fmt: skip
def test_each_composite_equals_its_rules_in_matrix_form(name, bias, kind, make, shape):
    net = make()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).double()
    settings = Settings(epsilon=1e-9, stabilizer=1e-9, gamma=0.25, bias=bias, low=-2.0, high=3.0)
    chooser = COMPOSITES[name].chooser(settings)
    ours, _ = lrp_with(net, x, chooser, target=1, epsilon=1e-9)
    positions = [i for i, layer in enumerate(net) if isinstance(layer, (nn.Conv2d, nn.Linear))]
    rules = {i: named_rule(r, bias) for i, r in zip(positions, ZENNIT[name][kind], strict=True)}
    expected = matrix_lrp(net, x, rules, target=1)
    torch.testing.assert_close(ours[0], expected, rtol=1e-6, atol=1e-9)
    assert [rules[i].describe() for i in positions] == [
        ", ".join(chooser.chosen[net[i]]) for i in positions
    ]


@pytest.mark.parametrize("bias", [False, True])
def test_explain_records_the_rules_and_passes_the_bias_setting(bias):
    net = conv_net()
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(3)).double()
    e = cl.explain(net, x, "lrp", epsilon=1e-9, low=-2.0, high=3.0, bias=bias, target=[1, 1])
    plus = "zplus_bias" if bias else "zplus"
    assert e.resolved["composite"] == "epsilon_plus_box"
    assert e.resolved["rules"] == {"0": "zbox", "2": plus, "5": "epsilon"}
    assert e.resolved["bounds"] == {"low": -2.0, "high": 3.0}
    rules = {0: named_rule("zbox", bias), 2: named_rule("zplus", bias), 5: Epsilon(epsilon=1e-9)}
    for i in range(2):
        expected = matrix_lrp(net, x[i : i + 1], rules, target=1)
        torch.testing.assert_close(e.attribution[i], expected.float(), rtol=1e-5, atol=1e-7)


def test_bias_true_shares_less_when_biases_are_positive():
    """zennit's z+ puts b+ into the denominator: positive biases absorb part of the relevance."""
    net = conv_net()
    with torch.no_grad():
        for layer in net:
            if getattr(layer, "bias", None) is not None:
                layer.bias.abs_().add_(0.1)
    x = torch.rand(1, 2, 5, 5, generator=torch.Generator().manual_seed(4)).double()
    without, plain = lrp_with(net, x, ZPlus(epsilon=1e-9), target=0)
    with_bias, biased = lrp_with(net, x, ZPlus(epsilon=1e-9, bias=True), target=0)
    assert 0 < with_bias.sum() < without.sum()
    assert biased.absorbed.item() > plain.absorbed.item()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"composite": "epsilon_plus_boxx"}, r"unknown composite.*known: epsilon_plus_box, "),
        ({"epsilon": "small"}, "epsilon must be a number"),
        ({"epsilon": float("nan")}, "epsilon must be a finite number"),
        ({"epsilon": 0.0}, "epsilon must be positive"),
        ({"gamma": -0.5}, "gamma must be non-negative"),
        ({"gamma": float("inf")}, "gamma must be a finite number"),
        ({"bias": "yes"}, "bias must be True or False"),
        ({"low": "dark"}, "low must be a number"),
        ({"high": [1.0, float("nan")]}, "high must be finite"),
    ],
)
def test_lrp_parameters_are_checked_by_name(params, message):
    from conftest import tiny, tiny_input

    with pytest.raises(RequestError, match=message):
        cl.explain(tiny(), tiny_input(1), "lrp", **params)


def test_a_parametrized_weight_is_recognised():
    """weight_norm computes the convolution's weight at each call: the rule still applies (to
    the weight the call used), where a silent gradient would otherwise pass."""
    net = conv_net()
    expected_net = conv_net()
    torch.nn.utils.parametrizations.weight_norm(net[0])
    torch.nn.utils.weight_norm(net[2])  # the older hook-based form
    with torch.no_grad():
        expected_net[0].weight.copy_(net[0].weight)
        expected_net[2].weight.copy_(net[2].weight)
    x = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(8)).double()
    ours, _ = lrp_with(net, x, RULES["zplus"], target=2)
    expected = matrix_lrp(expected_net, x, RULES["zplus"], target=2)
    torch.testing.assert_close(ours[0], expected, rtol=1e-6, atol=1e-9)


class MatmulLinear(nn.Linear):
    """A linear layer computed without F.linear: LRP cannot see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


def test_a_layer_computed_without_its_call_is_refused_by_name():
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), MatmulLinear(5, 3)).double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RequestError, match=r"layer '2' \(MatmulLinear\).*F.linear"):
        lrp_with(net, torch.randn(1, 6).double(), RULES["epsilon"], target=0)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not net[2]._forward_hooks and not net[2]._forward_pre_hooks


def test_channels_last_inputs_give_the_same_relevance():
    """cl.explain runs the model on channels-last images; the rules keep that layout."""
    net = odd_conv_net()
    x = torch.randn(1, 2, 7, 7, generator=torch.Generator().manual_seed(3)).double()
    for rule in RULES.values():
        plain, _ = lrp_with(net, x, rule, target=0)
        last, _ = lrp_with(net, x.contiguous(memory_format=torch.channels_last), rule, target=0)
        torch.testing.assert_close(last, plain, rtol=1e-9, atol=1e-12)


def unbiased(net: nn.Sequential) -> nn.Sequential:
    with torch.no_grad():
        for layer in net:
            if getattr(layer, "bias", None) is not None:
                layer.bias.zero_()
    return net


@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_relevance_is_conserved_without_biases(rule):
    net = unbiased(conv_net())
    x = torch.rand(1, 2, 5, 5, generator=torch.Generator().manual_seed(3)).double()  # x >= 0
    chosen = Epsilon(epsilon=1e-9) if rule == "epsilon" else ZPlus(epsilon=1e-9)
    relevance, ledger = lrp_with(net, x, chosen, target=0)
    logit = net(x)[0, 0]
    assert relevance.sum().item() == pytest.approx(logit.item(), rel=1e-6)
    assert abs(ledger.absorbed.item()) < 1e-6 * abs(logit.item())


def test_biases_absorb_what_input_relevance_lacks():
    net, x = dense_net(), torch.randn(1, 6, generator=torch.Generator().manual_seed(4)).double()
    relevance, ledger = lrp_with(net, x, Epsilon(epsilon=1e-9), target=2)
    logit = net(x)[0, 2].item()
    assert abs(ledger.absorbed.item()) > 1e-3 * abs(logit)  # the biases took some
    assert relevance.sum().item() + ledger.absorbed.item() == pytest.approx(logit, rel=1e-9)


class Residual(nn.Module):
    """conv -> BN -> ReLU6, then ``x + inputs`` and a mean: the shapes of EfficientNet."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU6()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.stem(x)))
        h = self.act(self.conv(h)) + h
        return self.head(h.mean(dim=(2, 3)))


def test_residual_additions_split_relevance_and_batchnorm_is_restored():
    net = Residual().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(6))
    e = cl.explain(
        net, x, "lrp", composite="epsilon", epsilon=1e-9, low=-3.0, high=3.0, target=[0, 1]
    )
    totals = torch.tensor(e.extras["input_relevance"]) + torch.tensor(e.extras["absorbed"])
    torch.testing.assert_close(totals, torch.tensor(e.extras["logit"]), rtol=1e-5, atol=1e-6)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert net.stem.bias is None


class BasicBlock(nn.Module):
    """ResNet's block, whose residual addition is written ``out += identity`` (or add_)."""

    def __init__(self, addition: str) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu, self.head, self.addition = nn.ReLU(inplace=True), nn.Linear(4, 3), addition
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.relu(self.stem(x))
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(identity)))))
        if self.addition == "+=":
            out += identity
        elif self.addition == "add_":
            out.add_(identity)
        else:
            out = out + identity
        return self.head(self.relu(out).mean(dim=(2, 3)))


def test_in_place_residual_additions_split_relevance_like_plain_ones():
    """``out += identity`` must not send the whole relevance down both branches."""
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(10))
    results = {}
    for addition in ("+", "+=", "add_"):
        e = cl.explain(
            BasicBlock(addition).eval(),
            x,
            "lrp",
            composite="epsilon",
            epsilon=1e-9,
            low=0.0,
            high=1.0,
            target=[0, 1],
        )
        totals = torch.tensor(e.extras["input_relevance"]) + torch.tensor(e.extras["absorbed"])
        torch.testing.assert_close(totals, torch.tensor(e.extras["logit"]), rtol=1e-5, atol=1e-6)
        results[addition] = e.attribution
    torch.testing.assert_close(results["+="], results["+"])
    torch.testing.assert_close(results["add_"], results["+"])


class Gated(nn.Module):
    """A gate of the signal's own size, x * sigmoid(conv(x)): LRP has no rule for it (its gate
    rule is for a gate that broadcasts over the signal, as in squeeze-and-excitation)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.conv, self.gate, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = h * torch.sigmoid(self.gate(h))
        return self.head(h.mean(dim=(2, 3)))


def test_a_model_with_an_operation_without_rule_is_flagged():
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(12))
    with pytest.warns(RuntimeWarning, match="not conserved.*without an LRP rule"):
        e = cl.explain(Gated().eval(), x, "lrp", composite="epsilon", low=0.0, high=1.0)
    (inputs,), (absorbed,), (logit,) = (
        e.extras[k] for k in ("input_relevance", "absorbed", "logit")
    )
    assert abs(inputs + absorbed - logit) > 0.01 * abs(logit)


@pytest.mark.slow
@pytest.mark.parametrize("composite", ["epsilon_plus_box", "epsilon_plus"])
def test_relevance_is_conserved_on_the_bundled_model(bundled, photos, composite):
    before = {k: v.clone() for k, v in bundled.module.state_dict().items()}
    e = cl.explain(bundled, photos["chelsea"], "lrp", composite=composite)
    (logit,), (absorbed,), (inputs,) = (
        e.extras[k] for k in ("logit", "absorbed", "input_relevance")
    )
    # Nothing is lost or counted twice: what does not reach the pixels is what the biases
    # (BatchNorm shifts merged into the convolutions) and stabilisers absorbed, layer by layer.
    assert inputs + absorbed == pytest.approx(logit, rel=0.01)
    assert 0 < inputs < logit and 0 < absorbed < logit
    for key, value in bundled.module.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- DeepLIFT, DeepSHAP and GradientSHAP against captum -----------------------------------------


def close_to_oracle(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to the oracle to 1e-5 of its largest magnitude."""
    theirs = theirs.detach()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * float(theirs.abs().max()))


def relu_net(pool: bool = False) -> nn.Sequential:
    torch.manual_seed(12)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()]
    layers += [nn.MaxPool2d(2)] if pool else [nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()


def output_delta(model: nn.Module, x: torch.Tensor, reference: torch.Tensor, targets: list[int]):
    rows = torch.arange(len(x))
    with torch.no_grad():
        return model(x)[rows, targets] - model(reference)[rows, targets]


def test_deeplift_equals_captum_and_sums_to_delta():
    import captum.attr as ca
    from conftest import tiny_input

    model, x = relu_net(), tiny_input(3)
    reference = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(9)) * 0.5
    e = cl.explain(model, x, "deeplift", baseline=reference, target=[0, 1, 2])
    theirs = ca.DeepLift(model).attribute(x, baselines=reference, target=[0, 1, 2])
    close_to_oracle(e.attribution, theirs)
    delta = output_delta(model, x, reference, [0, 1, 2])
    torch.testing.assert_close(e.attribution.sum(dim=(1, 2, 3)), delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(e.extras["delta"]).float(), delta, rtol=1e-5, atol=1e-6)


def test_deeplift_max_pooling_sums_to_delta_where_captum_does_not():
    """A ReLU before a max pooling: captum 0.9's max-pool rule falls back to the first batch
    element's gradient where x = x0 (captum issue #1276) and loses the summation-to-delta
    property that defines DeepLIFT; convlens keeps it, so it departs from captum here."""
    import captum.attr as ca
    from conftest import tiny_input

    model, x = relu_net(pool=True), tiny_input(4)
    reference = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(13))
    targets = [0, 1, 2, 3]
    delta = output_delta(model, x, reference, targets)
    e = cl.explain(model, x, "deeplift", baseline=reference, target=targets)
    torch.testing.assert_close(e.attribution.sum(dim=(1, 2, 3)), delta, rtol=1e-4, atol=1e-5)
    theirs = ca.DeepLift(model).attribute(x, baselines=reference, target=targets)
    assert (theirs.sum(dim=(1, 2, 3)) - delta).abs().max() > 1e-3  # captum misses the delta


def test_deeplift_with_overlapping_max_pooling_windows_sums_to_delta():
    torch.manual_seed(14)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=1),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 2),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(15))
    reference = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(16))
    e = cl.explain(model, x, "deeplift", baseline=reference, target=[0, 1])
    delta = output_delta(model, x, reference, [0, 1])
    torch.testing.assert_close(e.attribution.sum(dim=(1, 2, 3)), delta, rtol=1e-4, atol=1e-5)


def test_deeplift_rescale_also_covers_functional_and_relu6_rectifiers():
    from conftest import tiny, tiny_input

    x = tiny_input(2)
    for act in ("functional", "relu6", "reused", "relu_inplace"):
        model = tiny(act)
        e = cl.explain(model, x, "deeplift", baseline="blur", target=[3, 4])
        delta = output_delta(model, x, make_baseline("blur", x), [3, 4])
        torch.testing.assert_close(e.attribution.sum(dim=(1, 2, 3)), delta, rtol=1e-4, atol=1e-5)


def test_deepshap_equals_captum_deepliftshap():
    import captum.attr as ca
    from conftest import tiny_input

    model, x = relu_net(), tiny_input(2)
    references = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(10)) * 0.3
    e = cl.explain(model, x, "deeplift", baseline=references, shap=True, target=[1, 2])
    theirs = ca.DeepLiftShap(model).attribute(x, baselines=references, target=[1, 2])
    close_to_oracle(e.attribution, theirs)


def test_gradient_shap_equals_captum_on_the_same_draws(monkeypatch):
    """captum draws its noise with torch.normal, references with np.random.choice and path
    points with np.random.uniform; the same seeds reproduce them, and convlens is given them,
    chunk by chunk, in place of its own draws (rows input by input, n_samples each)."""
    import captum.attr as ca
    import numpy as np
    from conftest import tiny, tiny_input

    from convlens.methods.relevance import deeplift

    model, x = tiny("relu6"), tiny_input(2)
    references = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    n, stdev = 6, 0.1
    torch.manual_seed(0)
    np.random.seed(0)
    theirs = ca.GradientShap(model).attribute(
        x, baselines=references, target=[0, 3], n_samples=n, stdevs=stdev
    )
    torch.manual_seed(0)
    np.random.seed(0)
    noise = torch.normal(0, torch.tensor(stdev).repeat((2 * n, 3, 8, 8)))
    index = torch.tensor(np.random.choice(5, n * 2))
    alpha = torch.tensor(np.random.uniform(0.0, 1.0, n * 2))
    made = [0]
    calls: list[int] = []

    def captums(generator, rows, k, shape, sd):
        assert (k, shape, sd) == (5, (3, 8, 8), stdev)
        calls.append(rows)
        start, made[0] = made[0], made[0] + rows
        return index[start : made[0]], alpha[start : made[0]], noise[start : made[0]]

    monkeypatch.setattr(deeplift, "shap_draws", captums)
    e = cl.explain(model, x, "gradient_shap", baseline=references, n_samples=n, stdev=stdev,
                   target=[0, 3], batch_size=5)  # fmt: skip
    assert made == [2 * n]
    assert max(calls) <= 5 and len(calls) > 1  # drawn chunk by chunk, never all up front
    close_to_oracle(e.attribution, theirs)


def test_shap_draws_stream_row_by_row():
    """Drawn in chunks of any size, the rows are the same: the stream goes row by row."""
    from convlens.methods.relevance import shap_draws

    whole = shap_draws(torch.Generator().manual_seed(3), 7, 4, (2, 3, 3), 0.5)
    g = torch.Generator().manual_seed(3)
    parts = [shap_draws(g, rows, 4, (2, 3, 3), 0.5) for rows in (1, 4, 2)]
    for k in range(3):
        assert torch.equal(whole[k], torch.cat([part[k] for part in parts]))
    index, alpha, noise = shap_draws(torch.Generator().manual_seed(3), 5, None, (2,), 0.0)
    assert index is None and noise is None and alpha.dtype == torch.float64


def test_gradient_shap_approaches_the_expected_gradients_integral():
    """With one reference and many samples, GradientSHAP is integrated gradients in expectation,
    whose attributions sum to f(x) - f(x0)."""
    from conftest import tiny, tiny_input

    model, x = tiny(), tiny_input(1)
    e = cl.explain(model, x, "gradient_shap", baseline="zero", n_samples=4000, target=2)
    with torch.no_grad():
        delta = model(x)[0, 2] - model(torch.zeros_like(x))[0, 2]
    assert e.attribution.sum().item() == pytest.approx(delta.item(), rel=0.05, abs=0.02)


# -- the engine: batch sizes, progress, inner-unit targets -----------------------------------------


RELEVANCE = {
    "lrp": {"low": -3.0, "high": 3.0},
    "deeplift": {"baseline": "blur"},
    "deepshap": {"shap": True},
    "gradient_shap": {"n_samples": 5, "stdev": 0.1},
}


def relevance_call(method: str, x: torch.Tensor, **params):
    """The method's arguments; DeepSHAP takes a set of three references."""
    params = {**RELEVANCE[method], **params}
    shape = x.shape[1:]
    if method == "deepshap":
        params["baseline"] = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5))
    if method == "gradient_shap":
        params["baseline"] = torch.randn(4, *shape, generator=torch.Generator().manual_seed(6))
    return ("deeplift" if method == "deepshap" else method), params


@pytest.mark.parametrize("method", RELEVANCE)
def test_results_do_not_depend_on_batch_size(method):
    from conftest import tiny, tiny_input

    model, x = tiny(), tiny_input(5)
    name, params = relevance_call(method, x)
    runs = {b: cl.explain(model, x, name, target=[0, 1, 2, 3, 4], batch_size=b, **params)
            for b in (1, 3, 64)}  # fmt: skip
    for b in (3, 64):
        torch.testing.assert_close(runs[b].attribution, runs[1].attribution, rtol=1e-6, atol=1e-7)
        for key in runs[1].extras:
            torch.testing.assert_close(
                torch.tensor(runs[b].extras[key]), torch.tensor(runs[1].extras[key])
            )


@pytest.mark.parametrize("method", RELEVANCE)
@pytest.mark.parametrize("batch_size", [1, 4, 5])
def test_model_calls_hold_at_most_a_batch_and_progress_totals_are_exact(method, batch_size,
                                                                         monkeypatch):  # fmt: skip
    """Every image is counted; DeepLIFT's calls hold pairs [inputs; references], at most
    max(batch_size, 2) images; the bar's total is the number of images the method passes."""
    from conftest import probe, tiny, tiny_input

    from convlens.engine import Engine

    model, x = tiny(), tiny_input(3)
    name, params = relevance_call(method, x)
    totals: list[tuple[int, int]] = []
    task = Engine.task

    def recorded(engine, total):
        totals.append((total, engine.forwards))
        return task(engine, total)

    monkeypatch.setattr(Engine, "task", recorded)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    probed = probe(model, x)
    try:
        e = cl.explain(model, x, name, batch_size=batch_size, **params)  # Predicted() targets
    finally:
        handle.remove()
    ((total, before),) = totals
    assert e.forwards - before == total and before == probed
    assert sum(calls) == e.forwards
    assert max(calls[1 if probed else 0 :]) <= max(batch_size, 2 if name == "deeplift" else 1)
    pairs = 3 * (3 if method == "deepshap" else 1)
    expected = {"lrp": 3, "deeplift": 2 * pairs, "deepshap": 2 * pairs, "gradient_shap": 3 + 15}
    assert total == expected[method]


class ChannelMean(nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.flatten(2).mean(dim=2)


class Unit(nn.Module):
    def __init__(self, y: int, x: int) -> None:
        super().__init__()
        self.y, self.x = y, x

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a[:, :, self.y, self.x]


@pytest.mark.parametrize("method", RELEVANCE)
@pytest.mark.parametrize("unit", ["channel", "neuron"])
def test_inner_unit_targets_explain_the_unit_as_a_truncated_model_would(method, unit):
    """A Channel / Neuron target on layer "2" of relu_net explains what the same method
    explains for the model cut after that layer, with a head that reads the unit."""
    model, x = relu_net(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(20))
    name, params = relevance_call(method, x)
    head = ChannelMean() if unit == "channel" else Unit(1, 2)
    target = Channel("2", 4) if unit == "channel" else Neuron("2", 4, 1, 2)
    truncated = nn.Sequential(*model[:3], head).eval()
    ours = cl.explain(model, x, name, target=target, **params)
    theirs = cl.explain(truncated, x, name, target=4, **params)
    close_to_oracle(ours.attribution, theirs.attribution)
    assert ours.attribution.abs().sum() > 0 and ours.targets == [target.describe()] * 2
    for key in ours.extras:
        torch.testing.assert_close(
            torch.tensor(ours.extras[key]), torch.tensor(theirs.extras[key]), rtol=1e-4, atol=1e-5
        )
    if name == "deeplift":  # summation to delta, for the unit
        sums = ours.attribution.sum(dim=(1, 2, 3))
        torch.testing.assert_close(sums, torch.tensor(ours.extras["delta"]).float(),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


def test_gradient_shap_resolves_predicted_targets_on_the_clean_input():
    from conftest import tiny, tiny_input

    model, x = tiny(), tiny_input(3)
    with torch.no_grad():
        predicted = model(x).argmax(dim=1).tolist()
    e = cl.explain(model, x, "gradient_shap", n_samples=4, stdev=2.0, target=[None, 1, None])
    assert e.targets == [predicted[0], 1, predicted[2]]


def test_epsilon_reaches_only_the_epsilon_rule_as_in_zennit():
    # zennit's EpsilonPlus(epsilon=...) gives epsilon to its Epsilon rule (dense layers) only;
    # z+, pooling and sums keep the fixed stabiliser 1e-6. A network without dense layers
    # therefore does not depend on epsilon at all.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    small = cl.explain(net, x, "lrp", composite="epsilon_plus", epsilon=1e-6, target=1)
    large = cl.explain(net, x, "lrp", composite="epsilon_plus", epsilon=0.25, target=1)
    torch.testing.assert_close(large.attribution, small.attribution)


class InPlaceSkip(nn.Module):
    """Xception's pattern: a max-pool output that the forward adds a skip to in place."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.skip = nn.Conv2d(3, 4, 1, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(x)
        y = self.pool(self.conv(x))
        y += skip
        return self.fc(self.relu(y).mean(dim=(2, 3)))


def test_deeplift_on_an_in_place_residual_over_max_pooling_sums_to_delta():
    model, x = InPlaceSkip().eval(), torch.randn(2, 3, 8, 8)
    e = cl.explain(model, x, "deeplift", target=[0, 2])
    torch.testing.assert_close(
        e.attribution.sum(dim=(1, 2, 3)).double(), torch.tensor(e.extras["delta"]).double(),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip


class EfficientGates(nn.Module):
    """EfficientNet's ingredients: SiLU, a squeeze-and-excitation gate (sigmoid, x * scale),
    hard-swish and GELU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.squeeze, self.excite = nn.Conv2d(6, 2, 1), nn.Conv2d(2, 6, 1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv(x))
        scale = torch.sigmoid(self.excite(F.silu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = x * scale
        x = F.gelu(F.hardswish(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_deeplift_rescales_every_nonlinearity_and_splits_gates_so_it_sums_to_delta():
    model, x = EfficientGates().eval(), torch.randn(2, 3, 8, 8)
    for baseline in ("zero", "blur"):
        e = cl.explain(model, x, "deeplift", target=[1, 3], baseline=baseline)
        torch.testing.assert_close(
            e.attribution.sum(dim=(1, 2, 3)).double(), torch.tensor(e.extras["delta"]).double(),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip


class Normed(nn.Module):
    """A LayerNorm over channels, as ConvNeXt and ViT have."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm, self.fc = nn.Conv2d(3, 4, 3), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(torch.relu(self.conv(x)).mean(dim=(2, 3))))


class FunctionalMax(nn.Module):
    """A maximum taken by a function, not an nn.MaxPool2d module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).amax(dim=(2, 3)))


def test_deeplift_sums_to_delta_through_layer_norm_and_softmax():
    x = torch.randn(2, 3, 8, 8)
    for model in (Normed().eval(), Attending().eval()):
        e = cl.explain(model, x, "deeplift", target=[0, 1], baseline="blur")
        torch.testing.assert_close(
            e.attribution.sum(dim=(1, 2, 3)).double(), torch.tensor(e.extras["delta"]).double(),
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip


class Attending(nn.Module):
    """Self-attention over a feature map's positions: softmax(q k^T / sqrt(d)) v."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.qkv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 12), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv(x).flatten(2).transpose(1, 2)  # (B, N, 4)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attention = (q @ k.transpose(1, 2) / 2).softmax(dim=-1)
        return self.fc((attention @ v).mean(dim=1))


def test_deeplift_refuses_operations_without_a_rule_by_name():
    x = torch.randn(2, 3, 8, 8)
    grouped = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(RequestError, match="no rule for group_norm"):
        cl.explain(grouped.eval(), x, "deeplift", target=0)
    with pytest.raises(RequestError, match="not f\\(x\\) - f\\(x0\\)"):
        # a reference whose maxima lie elsewhere: the plain gradient of amax then misses
        cl.explain(FunctionalMax().eval(), x, "deeplift", target=0, baseline=-x.flip(-1))


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "guided_gradcam"])
def test_rectifier_rules_refuse_other_nonlinearities_by_name(method):
    with pytest.raises(RequestError, match="applies silu"):
        cl.explain(EfficientGates().eval(), torch.randn(1, 3, 8, 8), method, target=0)


def test_lrp_conservation_is_judged_against_the_logit_not_the_largest_term():
    from convlens.methods.relevance.lrp import _warn_unless_conserved

    one = torch.ones(1, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="not conserved"):  # 0.5 off a logit of 1
        _warn_unless_conserved(one, one * 100.5, one * -99.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_unless_conserved(one, one * 100.5, one * -99.5)  # conserved


def test_lrp_passes_activations_and_gives_squeeze_excitation_gates_nothing():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    model = EfficientGates().eval()
    e = cl.explain(model, x, "lrp", composite="epsilon", target=[1, 3], low=0.0, high=1.0)
    inputs, absorbed, logit = (torch.tensor(e.extras[k]) for k in
                               ("input_relevance", "absorbed", "logit"))  # fmt: skip
    torch.testing.assert_close(inputs + absorbed, logit, rtol=1e-4, atol=1e-6)
    # a layer scale (a product with a constant) passes relevance unchanged
    ref = cl.explain(model, x, "lrp", composite="epsilon", target=1, low=0.0, high=1.0)

    class LayerScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.gamma = model, nn.Parameter(torch.full((4,), 0.5))

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.net(t) * self.gamma

    half = cl.explain(LayerScale().eval(), x, "lrp", composite="epsilon", target=1, low=0.0,
                      high=1.0)  # fmt: skip
    torch.testing.assert_close(half.attribution, ref.attribution * 0.5)


class FunctionalPool(nn.Module):
    """Max pooling called as a function (as Inception's blocks do), with overlapping windows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(torch.relu(self.conv(x)), kernel_size=3, stride=2)
        return self.fc(y.mean(dim=(2, 3)))


def test_deeplift_through_functional_max_pooling_sums_to_delta():
    x = torch.randn(2, 3, 9, 9)
    e = cl.explain(FunctionalPool().eval(), x, "deeplift", target=1, baseline=-x.flip(-1))
    torch.testing.assert_close(
        e.attribution.sum(dim=(1, 2, 3)).double(), torch.tensor(e.extras["delta"]).double(),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip


class FusedAttending(Attending):
    """The same attention through F.scaled_dot_product_attention (timm's fused path)."""

    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, scale=0.5, is_causal=self.causal)
        return self.fc(out.mean(dim=1))


@pytest.mark.parametrize("method", ["deeplift", "lrp"])
def test_fused_attention_is_explained_as_its_pieces(method):
    x = torch.randn(2, 3, 8, 8)
    params = {"baseline": "blur"} if method == "deeplift" else {"composite": "epsilon"}
    explicit = cl.explain(Attending().eval(), x, method, target=[0, 1], **params)
    fused = cl.explain(FusedAttending().eval(), x, method, target=[0, 1], **params)
    torch.testing.assert_close(fused.attribution, explicit.attribution, rtol=1e-4, atol=1e-6)
    causal = cl.explain(FusedAttending(causal=True).eval(), x, method, target=[0, 1], **params)
    assert torch.isfinite(causal.attribution).all()
    if method == "deeplift":
        torch.testing.assert_close(
            causal.attribution.sum(dim=(1, 2, 3)).double(),
            torch.tensor(causal.extras["delta"]).double(), rtol=1e-4, atol=1e-5,
        )  # fmt: skip
