"""Target resolution and scoring: ints, lists, names, Predicted, Contrast, Channel, Neuron."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny, tiny_input

import convlens as cl
from convlens.targets import Channel, Class, Contrast, Neuron, Predicted


def grad_of(model, x, score_fn):
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(score_fn(model, x).sum(), x)
    return g


def test_none_and_predicted_explain_the_predicted_class(x):
    model = tiny()
    predicted = model(x).argmax(1).tolist()
    assert cl.explain(model, x, "saliency").targets == predicted
    assert cl.explain(model, x, "saliency", target=Predicted()).targets == predicted
    assert cl.explain(model, x, "integrated_gradients", steps=4).targets == predicted


def test_int_and_list_targets(x):
    model = tiny()
    assert cl.explain(model, x, "saliency", target=4).targets == [4, 4, 4]
    assert cl.explain(model, x, "saliency", target=[0, 1, 2]).targets == [0, 1, 2]
    with pytest.raises(ValueError, match="one target per input"):
        cl.explain(model, x, "saliency", target=[0, 1])


def test_label_names_resolve_and_unknown_names_are_refused(x):
    model = cl.wrap(tiny(), input_size=(8, 8), labels=["ant", "bee", "cat", "dog", "eel"])
    e = cl.explain(model, x, "saliency", target="cat")
    assert e.targets == [2, 2, 2] and e.labels == ["cat"] * 3
    with pytest.raises(ValueError, match=r"unknown label 'cta'.*'cat'"):
        cl.explain(model, x, "saliency", target="cta")
    with pytest.raises(ValueError, match="no labels"):
        cl.explain(tiny(), x, "saliency", target="cat")


@pytest.mark.parametrize("bad", [5, -1, Contrast(0, 7)])
def test_class_out_of_range(x, bad):
    with pytest.raises(ValueError, match="out of range"):
        cl.explain(tiny(), x, "saliency", target=bad)


def test_contrast_is_the_difference_of_two_logits(x):
    model = tiny()
    ours = cl.explain(model, x, "saliency", target=Contrast(1, 3), absolute=False).attribution
    expected = grad_of(model, x, lambda m, v: m(v)[:, 1] - m(v)[:, 3])
    torch.testing.assert_close(ours, expected)
    assert cl.explain(model, x, "saliency", target=Contrast(1, 3)).targets[0] == {
        "contrast": [1, 3]
    }


def test_channel_and_neuron_targets_explain_inner_units(x):
    model = tiny()
    channel = cl.explain(model, x, "saliency", target=Channel("conv2", 5), absolute=False)
    expected = grad_of(
        model, x, lambda m, v: m.conv2(m.pool(torch.relu(m.conv1(v))))[:, 5].mean((1, 2))
    )
    torch.testing.assert_close(channel.attribution, expected)
    neuron = cl.explain(model, x, "saliency", target=Neuron(model.conv2, 5, 1, 2), absolute=False)
    expected = grad_of(model, x, lambda m, v: m.conv2(m.pool(torch.relu(m.conv1(v))))[:, 5, 1, 2])
    torch.testing.assert_close(neuron.attribution, expected)
    assert channel.targets[0] == {"channel": ["conv2", 5]}


def test_inner_unit_errors_name_the_problem(x):
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'.*conv"):
        cl.explain(tiny(), x, "saliency", target=Channel("conv9", 0))
    with pytest.raises(ValueError, match="channel 99 is out of range"):
        cl.explain(tiny(), x, "saliency", target=Channel("conv2", 99))
    with pytest.raises(ValueError, match="out of range"):
        cl.explain(tiny(), x, "saliency", target=Neuron("conv2", 0, 9, 9))


def test_mixed_targets_per_input(x):
    model = tiny()
    e = cl.explain(model, x, "saliency", target=[Class(0), 2, Contrast(3, 4)], absolute=False)
    rows = [
        grad_of(model, x[:1], lambda m, v: m(v)[:, 0]),
        grad_of(model, x[1:2], lambda m, v: m(v)[:, 2]),
        grad_of(model, x[2:], lambda m, v: m(v)[:, 3] - m(v)[:, 4]),
    ]
    torch.testing.assert_close(e.attribution, torch.cat(rows))


def test_bad_target_types():
    with pytest.raises(TypeError, match="target must be"):
        cl.explain(tiny(), tiny_input(1), "saliency", target=1.5)
