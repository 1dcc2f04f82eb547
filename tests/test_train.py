"""Transfer learning on an image folder (`convlens train`), its checkpoint and its errors."""

from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image

import convlens as cl
from convlens.cli import main
from convlens.datasets import shapes_folder
from convlens.train import _augment, scan_folder, stratified_split, train
from convlens.zoo import _lite0_weights


@pytest.mark.slow
def test_train_then_explain_with_the_checkpoint(tmp_path, capsys):
    """A generated 3-class folder (40 shapes per class, one broken file): above 90% validation
    accuracy in under 3 minutes on 2 cores, then `convlens explain --model` on the result."""
    data = shapes_folder(tmp_path / "data", 40, seed=0)
    (data / "square" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    checkpoint = tmp_path / "shapes.pt"
    started = time.perf_counter()
    assert main(["train", str(data), "--out", str(checkpoint)]) == 0
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert seconds < 180, seconds
    assert "skipping" in err and "broken.jpg" in err
    assert "epoch 1/8" in err and "epoch 8/8" in err  # progress per epoch

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    training = saved["training"]
    assert saved["labels"] == ["circle", "square", "triangle"]
    assert training["val_accuracy"] > 0.9, training
    assert len(training["history"]) == 8 and sum(map(sum, training["confusion"])) == 24
    assert len(training["per_class_accuracy"]) == 3
    with Image.open(tmp_path / "shapes_confusion.png") as picture:
        assert picture.width > 200

    model = cl.load_model(checkpoint)
    assert model.labels == ["circle", "square", "triangle"] and model.cam_layer == "_swish"
    images = sorted((data / "triangle").glob("*.png"))[:2]
    out = tmp_path / "report"
    args = ["explain", *map(str, images), "--model", str(checkpoint), "--out", str(out)]
    assert main([*args, "--methods", "gradcam,saliency"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "data"
    assert {i["label"] for i in results["images"]} <= {"circle", "square", "triangle"}
    assert (out / "index.html").exists()


def test_frozen_backbone_trains_only_the_head_and_fine_tuning_trains_all(tmp_path):
    data = shapes_folder(tmp_path / "data", 3, seed=1)
    imagenet = _lite0_weights()
    frozen = train(
        data, tmp_path / "a.pt", epochs=1, image_size=64, progress=False, log=lambda _: None
    )
    state = frozen.model.module.state_dict()
    backbone = [k for k in state if not k.startswith("_fc.")]
    assert all(torch.equal(state[k], imagenet[k]) for k in backbone)
    assert state["_fc.weight"].shape == (3, 1280)
    assert all(p.requires_grad for p in frozen.model.module.parameters())  # restored
    tuned = train(
        data, tmp_path / "b.pt", epochs=1, image_size=64, freeze_backbone=False, progress=False,
        log=lambda _: None,
    )  # fmt: skip
    state = tuned.model.module.state_dict()
    changed = [
        k for k in backbone if k.endswith("weight") and not torch.equal(state[k], imagenet[k])
    ]
    assert len(changed) > 0.5 * len([k for k in backbone if k.endswith("weight")])


def test_unbalanced_folders_get_inverse_frequency_class_weights(tmp_path):
    data = shapes_folder(tmp_path / "data", {"circle": 12, "square": 4, "triangle": 4}, seed=2)
    result = train(
        data, tmp_path / "m.pt", epochs=1, image_size=64, progress=False, log=lambda _: None
    )
    saved = torch.load(result.checkpoint, weights_only=True)["training"]
    # stratified 20%: 10 / 3 / 3 training images -> weights n / (k n_c)
    expected = [16 / (3 * 10), 16 / (3 * 3), 16 / (3 * 3)]
    assert saved["class_weights"] == pytest.approx(expected, rel=1e-6)
    assert result.confusion.sum(1).tolist() == [2, 1, 1]


def test_stratified_split_keeps_every_class_in_both_parts():
    labels = [0] * 10 + [1] * 5 + [2] * 2
    train_rows, val_rows = stratified_split(labels, 0.2, seed=0)
    assert sorted(train_rows + val_rows) == list(range(17))
    assert [sum(labels[i] == c for i in val_rows) for c in range(3)] == [2, 1, 1]
    assert stratified_split(labels, 0.2, seed=0) == (train_rows, val_rows)
    assert stratified_split(labels, 0.0)[1] == []
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 1.0)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    with pytest.raises(ValueError, match="at least two"):
        scan_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        scan_folder(tmp_path)
    assert main(["train", str(tmp_path / "missing")]) == 2


def test_augmentation_is_seeded_and_stays_in_range():
    batch = (torch.rand(3, 3, 40, 40) * 255).to(torch.uint8)
    first = _augment(batch, (32, 32), torch.Generator().manual_seed(0))
    again = _augment(batch, (32, 32), torch.Generator().manual_seed(0))
    other = _augment(batch, (32, 32), torch.Generator().manual_seed(1))
    assert first.shape == (3, 3, 32, 32) and torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1


def test_save_checkpoint_round_trips_through_load_model(tmp_path):
    from convlens import zoo

    model = zoo.lite0_transfer(["cat", "dog"], (64, 64), name="pets")
    with torch.no_grad():
        model.module._fc.weight.normal_(generator=torch.Generator().manual_seed(0))
    path = zoo.save_checkpoint(tmp_path / "pets.pt", model, {"epochs": 3, "history": [{"a": 1}]})
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["format"] == zoo.CHECKPOINT_FORMAT and saved["arch"] == "efficientnet-lite0"
    assert saved["training"] == {"epochs": 3, "history": [{"a": 1}]}
    loaded = cl.load_model(path)
    assert cl.load_model is zoo.load_model
    assert (loaded.name, loaded.labels, loaded.input_size) == ("pets", ["cat", "dog"], (64, 64))
    assert (loaded.mean, loaded.std, loaded.crop) == (model.mean, model.std, model.crop)
    assert loaded.cam_layer == model.cam_layer
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model.module(x))
    with pytest.raises(ValueError, match="unknown architecture"):
        zoo.save_checkpoint(tmp_path / "x.pt", model, arch="resnet-9000")
