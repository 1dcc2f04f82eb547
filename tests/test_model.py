"""Model, wrap, preprocessing, layer lookup, checkpoints and the bundled EfficientNet-Lite0."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny, tiny_input

import convlens as cl
from convlens.zoo import CHECKPOINT_FORMAT


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(3, 8, 8), "add a batch dimension"),
        (torch.zeros(1, 1, 3, 8, 8), "must have shape"),
        (torch.zeros(0, 3, 8, 8), "empty"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
        (torch.full((1, 3, 8, 8), float("inf")), "infinite"),
    ],
)
def test_bad_tensors_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        cl.explain(tiny(), bad, "saliency")


def test_integer_tensor_is_refused():
    with pytest.raises(TypeError, match="floating-point"):
        cl.explain(tiny(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "saliency")


def test_bare_module_needs_a_tensor():
    with pytest.raises(TypeError, match="preprocessed tensor"):
        cl.explain(tiny(), "photo.jpg", "saliency")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'salency'.*saliency.*Known methods"):
        cl.explain(tiny(), tiny_input(1), "salency")


def test_layer_lookup():
    model = cl.wrap(tiny())
    assert model.layer("conv2") is model.module.conv2
    with pytest.raises(ValueError, match=r"unknown layer 'conv3'.*conv1, conv2"):
        model.layer("conv3")


def test_preprocess_resizes_crops_and_normalises():
    import numpy as np

    model = cl.wrap(tiny(), input_size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    image = np.full((30, 50, 3), 255, dtype=np.uint8)
    x = model.preprocess([image, image])
    assert x.shape == (2, 3, 8, 8)
    torch.testing.assert_close(x, torch.ones_like(x))  # white -> (1 - 0.5) / 0.5
    assert model.to_display(x).max() == 255


def test_predict_returns_probabilities():
    model = cl.wrap(tiny(), input_size=(8, 8))
    probabilities = model.predict(tiny_input(2))
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2))


def test_checkpoint_roundtrip_with_weights_only(tmp_path, bundled):
    path = tmp_path / "model.pt"
    labels = [f"class {i}" for i in range(1000)]
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "arch": "efficientnet-lite0",
            "state_dict": bundled.module.state_dict(),
            "labels": labels,
            "input_size": (224, 224),
        },
        path,
    )
    model = cl.load_model(path)
    assert model.labels == labels
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model.module(x), bundled.module(x))


def test_checkpoints_with_code_or_wrong_content_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": Evil()}, path)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        cl.load_model(path)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a convlens checkpoint"):
        cl.load_model(plain)
    with pytest.raises(FileNotFoundError):
        cl.load_model(tmp_path / "missing.pt")


@pytest.mark.slow
def test_bundled_model_recognises_the_sample_photos(bundled, photos):
    assert bundled.labels is not None and len(bundled.labels) == 1000
    assert bundled.labels[281] == "tabby" and bundled.labels[967] == "espresso"
    probabilities = bundled.predict([photos["chelsea"], photos["coffee"]])
    chelsea, coffee = probabilities.argmax(1).tolist()
    assert 281 <= chelsea <= 285, bundled.label(chelsea)
    assert coffee in (967, 968, 504), bundled.label(coffee)
    assert not bundled.module.training
