"""Any model on the command line (issue 17, parts 1 and 2): factories ``file.py:function`` and
``package.module:function`` with ``--weights``/``--labels``/``--input-size``/``--mean``/
``--std``, their errors, and ``convlens train --arch`` with the zoo's ResNet and Xception."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from zoo import resnet_basic

import convlens as cl
from convlens.checks import RequestError
from convlens.cli import main
from convlens.datasets import shapes_folder
from convlens.factories import find_head, is_factory, read_labels, replace_head
from convlens.model import Model
from convlens.train import _stored, train

ZOO_FILE = Path(__file__).with_name("zoo.py")
RESNET = f"{ZOO_FILE}:resnet_basic"
XCEPTION = f"{ZOO_FILE}:xception"
LABELS = [f"class {i}" for i in range(10)]


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nets.py:resnet", True),
        ("dir/nets.py:build_model", True),
        ("package.module:resnet50", True),
        ("timm:create", True),
        ("runs/skin.pt", False),
        ("C:\\runs\\skin.pt", False),
        ("efficientnet-lite0", False),
        ("nets.py:", False),
        ("nets.py:not-a-name", False),
    ],
)
def test_a_factory_spec_is_told_from_names_and_paths(spec, expected):
    assert is_factory(spec) is expected


def test_a_file_factory_gives_the_module_with_imagenet_preprocessing():
    model = cl.load_model(RESNET, input_size=32)
    reference = resnet_basic()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.module(x), reference(x), rtol=0, atol=0)
    assert model.input_size == (32, 32) and model.labels is None and model.name == "resnet_basic"
    assert model.mean == pytest.approx((0.485, 0.456, 0.406))
    assert not model.module.training


def test_a_module_factory_with_weights_labels_and_preprocessing(tmp_path, monkeypatch):
    package = tmp_path / "mynets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "small.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ZOO_FILE.parent)!r})\n"
        "from zoo import resnet_basic\n"
        "def build():\n    return resnet_basic()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    trained = resnet_basic()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1)
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    model = cl.load_model(
        "mynets.small:build", weights=tmp_path / "w.pth", labels=tmp_path / "labels.json",
        input_size=(32, 40), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    )  # fmt: skip
    x = torch.randn(1, 3, 32, 40)
    torch.testing.assert_close(model.module(x), trained(x), rtol=0, atol=0)
    assert model.labels == LABELS and model.input_size == (32, 40)
    assert model.std == (0.25, 0.25, 0.25)


def test_weights_wrapped_in_a_training_checkpoint_or_data_parallel_load(tmp_path):
    trained = resnet_basic()
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "w.pth")
    model = cl.load_model(RESNET, weights=tmp_path / "w.pth")
    loaded, expected = model.module.state_dict(), trained.state_dict()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_labels_one_per_line_or_json(tmp_path):
    (tmp_path / "a.txt").write_text("cat\n\n dog \n")
    assert read_labels(tmp_path / "a.txt") == ["cat", "dog"]
    (tmp_path / "b.json").write_text('["cat", "dog"]')
    assert read_labels(tmp_path / "b.json") == ["cat", "dog"]
    (tmp_path / "c.txt").write_text("cat\ncat\n")
    with pytest.raises(RequestError, match="'cat' more than once"):
        read_labels(tmp_path / "c.txt")
    (tmp_path / "d.json").write_text('["cat", 3]')
    with pytest.raises(RequestError, match="JSON list of strings"):
        read_labels(tmp_path / "d.json")


def _factories(tmp_path: Path) -> Path:
    nets = tmp_path / "nets.py"
    nets.write_text(
        "import torch\n"
        "def number():\n    return 3\n"
        "def broken():\n    raise RuntimeError('no GPU here')\n"
        "def conv_head():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),\n"
        "        torch.nn.Conv2d(8, 5, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())\n"
        "class Aux(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(3, 10)\n"
        "        self.aux = torch.nn.Linear(3, 4)  # registered last, not the classifier\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.mean((2, 3)))\n"
    )
    (tmp_path / "bad.py").write_text("import not_a_module_anywhere\n")
    return nets


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("missing.py:build", FileNotFoundError, "model factory file not found: missing.py"),
        ("{nets}:absent", RequestError, "has no function 'absent'; it defines .*conv_head"),
        ("{nets}:number", RequestError, "returned a int, not an nn.Module"),
        ("{dir}/bad.py:build", RequestError, "importing .*bad.py failed: ModuleNotFoundError"),
        ("no_such_package.nets:build", RequestError, "cannot import module 'no_such_package"),
    ],
)
def test_a_bad_factory_is_refused_naming_the_part(tmp_path, spec, error, message):
    nets = _factories(tmp_path)
    with pytest.raises(error, match=message):
        cl.load_model(spec.format(nets=nets, dir=tmp_path))


def test_a_factory_that_raises_keeps_its_traceback(tmp_path):
    nets = _factories(tmp_path)
    with pytest.raises(RuntimeError, match="no GPU here"):  # a bug in the user's code
        cl.load_model(f"{nets}:broken")


def test_weights_that_do_not_fit_name_the_first_key_and_shapes(tmp_path):
    other = resnet_basic()
    other.fc = nn.Linear(other.fc.in_features, 3)
    torch.save(other.state_dict(), tmp_path / "w.pth")
    with pytest.raises(RequestError, match=r"fc.weight has shape \(3, 32\) there, \(10, 32\) in"):
        cl.load_model(RESNET, weights=tmp_path / "w.pth")
    state = resnet_basic().state_dict()
    del state["conv1.weight"]
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(RequestError, match=r"lacks 'conv1.weight' \(1 missing, 0 unexpected"):
        cl.load_model(RESNET, weights=tmp_path / "x.pth")
    torch.save([1, 2], tmp_path / "y.pth")
    with pytest.raises(RequestError, match="holds no state dict"):
        cl.load_model(RESNET, weights=tmp_path / "y.pth")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        cl.load_model(RESNET, weights=tmp_path / "none.pth")


def test_factory_options_with_another_model_are_refused():
    with pytest.raises(RequestError, match="labels is for a factory model"):
        cl.load_model("shapes-cnn", labels=["a"])


def test_the_cli_refuses_bad_model_options_in_one_line(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    cases = [
        (["--model", "shapes-cnn", "--weights", "w.pth"], "--weights is for a factory --model"),
        (["--model", RESNET, "--mean", "0.5,x"], "--mean '0.5,x': expected comma-separated"),
        (["--model", RESNET, "--input-size", "1,2,3"], "--input-size '1,2,3': give H or H,W"),
        (["--model", "none.py:f"], "model factory file not found: none.py"),
    ]
    for options, message in cases:
        out = tmp_path / "report"
        assert main(["explain", str(image), *options, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_explain_and_features_on_a_factory_model_from_the_cli(tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    image = tmp_path / "photo.png"
    picture = (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(picture).save(image)
    model_options = ["--model", RESNET, "--labels", str(tmp_path / "labels.txt")]
    model_options += ["--input-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"]
    out = tmp_path / "report"
    args = ["explain", str(image), *model_options, "--methods", "gradcam", "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    model = cl.wrap(resnet_basic(), input_size=32, mean=(0.5,) * 3, std=(0.2,) * 3, labels=LABELS)
    expected = int(model.predict(str(image)).argmax())
    assert results["images"][0]["label"] == LABELS[expected]
    assert results["images"][0]["methods"]["gradcam"]["target"] == expected
    features = tmp_path / "features"
    args = ["features", "filters", *model_options, "--out", str(features)]
    assert main(args) == 0
    assert json.loads((features / "filters.json").read_text())["model"] == "resnet_basic"
    capsys.readouterr()


def test_stored_training_images_are_the_pixels_not_wrapped_normalised_values():
    """The images kept for training are 0-255 pixels; before issue 17 they were normalised
    with ImageNet's mean/std and cast to uint8, which wrapped negative values around."""
    photo = cl.sample_images()["chelsea"]
    model = Model(nn.Identity(), input_size=(64, 64), crop=1.0)
    stored = _stored(model, (64, 64))(photo).float()
    plain = Model(nn.Identity(), input_size=(64, 64), mean=None, std=None, crop=1.0)
    torch.testing.assert_close(stored, (plain.preprocess(photo)[0] * 255).round(), atol=0, rtol=0)


def test_the_head_is_the_last_linear_or_the_one_named():
    module = resnet_basic()
    assert find_head(module)[0] == "fc"
    assert replace_head(module, 4) == "fc" and module.fc.out_features == 4
    with pytest.raises(RequestError, match="no module 'classifier'"):
        find_head(module, "classifier")
    with pytest.raises(RequestError, match="'layer1' is a Sequential; convlens replaces"):
        replace_head(module, 4, "layer1")


@pytest.mark.parametrize("arch", [RESNET, XCEPTION], ids=["resnet", "xception"])
def test_train_any_architecture_then_load_its_checkpoint(tmp_path, arch):
    data = shapes_folder(tmp_path / "data", 4, seed=2)
    out = tmp_path / "net.pt"
    result = train(
        data, out, arch=arch, epochs=2, image_size=32, batch_size=4, progress=False, log=quiet
    )
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert saved["arch"] == "factory" and saved["factory"] == arch and saved["head"] == "fc"
    assert len(result.history) == 2
    with pytest.raises(RequestError, match=r"by running .*zoo.py, outside the checkpoint's folder"):
        cl.load_model(out)  # the factory is not in the checkpoint's folder: code from elsewhere
    loaded = cl.load_model(out, trust_code=True)
    assert loaded.labels == ["circle", "square", "triangle"] and loaded.input_size == (32, 32)
    x = loaded.preprocess(sorted((data / "circle").glob("*.png"))[0])
    torch.testing.assert_close(loaded.module(x), result.model.module(x), rtol=0, atol=0)
    # only the head learned (the backbone is frozen by default)
    fresh = cl.load_model(arch).module.state_dict()
    for key, value in loaded.module.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, fresh[key]), key


def test_train_from_the_cli_with_arch_head_and_weights_then_explain(tmp_path, capsys):
    data = shapes_folder(tmp_path / "data", 3, seed=3)
    torch.save(resnet_basic().state_dict(), tmp_path / "pretrained.pth")
    out = tmp_path / "skin.pt"
    args = ["train", str(data), "--arch", RESNET, "--head", "fc", "--weights"]
    args += [str(tmp_path / "pretrained.pth"), "--input-size", "32", "--epochs", "1"]
    assert main([*args, "--out", str(out)]) == 0
    assert "epoch 1/1" in capsys.readouterr().err
    report = tmp_path / "report"
    image = sorted((data / "square").glob("*.png"))[0]
    args = ["explain", str(image), "--model", str(out), "--methods", "saliency"]
    assert main([*args, "--out", str(report)]) == 2
    assert "--trust-code" in capsys.readouterr().err and not report.exists()
    assert main([*args, "--trust-code", "--out", str(report)]) == 0
    results = json.loads((report / "results.json").read_text())
    assert results["images"][0]["label"] in ("circle", "square", "triangle")


def test_train_refuses_factory_options_without_arch_and_a_head_that_does_not_fit(tmp_path, capsys):
    data = shapes_folder(tmp_path / "data", 2, seed=4)
    assert main(["train", str(data), "--head", "fc", "--out", str(tmp_path / "a.pt")]) == 2
    assert "--head is for --arch SPEC" in capsys.readouterr().err
    nets = _factories(tmp_path)
    common = {"image_size": 32, "epochs": 1, "progress": False, "log": quiet}
    with pytest.raises(RequestError, match=r"'aux' replaced, .* gives 10 outputs per image, not 3"):
        train(data, tmp_path / "b.pt", arch=f"{nets}:Aux", **common)
    assert not (tmp_path / "b.pt").exists()
    result = train(data, tmp_path / "c.pt", arch=f"{nets}:Aux", head="fc", **common)
    assert result.model.module.fc.out_features == 3
    result = train(data, tmp_path / "d.pt", arch=f"{nets}:conv_head", head="2", **common)
    assert cl.load_model(tmp_path / "d.pt").module[2].out_channels == 3


def test_a_factory_checkpoint_finds_its_file_beside_it_after_a_move(tmp_path):
    data = shapes_folder(tmp_path / "data", 2, seed=5)
    project = tmp_path / "project"
    project.mkdir()
    nets = project / "nets.py"
    nets.write_text(ZOO_FILE.read_text())
    train(data, project / "m.pt", arch=f"{nets}:resnet_basic", epochs=1, image_size=32,
          progress=False, log=quiet)  # fmt: skip
    moved = tmp_path / "moved"
    project.rename(moved)
    model = cl.load_model(moved / "m.pt")
    assert model.labels == ["circle", "square", "triangle"]
    (moved / "nets.py").unlink()
    with pytest.raises(FileNotFoundError, match="model factory file not found"):
        cl.load_model(moved / "m.pt")


def test_labels_that_do_not_match_the_outputs_are_refused(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    with pytest.raises(RequestError, match=r"2 labels were given, but .* gives 10 outputs"):
        cl.load_model(RESNET, labels=tmp_path / "labels.txt", input_size=32)


def _checkpoint_naming(tmp_path: Path, factory: str) -> Path:
    """A checkpoint of the walkthrough's kind whose ``factory`` field names ``factory``."""
    data = shapes_folder(tmp_path / "data", 2, seed=6)
    nets = tmp_path / "nets.py"
    nets.write_text(ZOO_FILE.read_text())
    train(data, tmp_path / "m.pt", arch=f"{nets}:resnet_basic", epochs=1, image_size=32,
          progress=False, log=quiet)  # fmt: skip
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    saved["factory"] = factory
    saved.pop("factory_relative")
    torch.save(saved, tmp_path / "evil.pt")
    return tmp_path / "evil.pt"


def test_a_checkpoint_cannot_make_convlens_call_any_installed_function(tmp_path):
    """A checkpoint is data: one naming ``sys:exit`` (or any module's function) is refused
    unless the user says it trusts that code, and a factory that exits is a one-line error."""
    evil = _checkpoint_naming(tmp_path, "sys:exit")
    with pytest.raises(RequestError, match="by calling sys:exit, an installed module's code"):
        cl.load_model(evil)
    with pytest.raises(RequestError, match="the factory 'sys:exit' exited"):
        cl.load_model(evil, trust_code=True)


def test_factories_that_need_arguments_are_refused(tmp_path):
    with pytest.raises(RequestError, match=r"needs arguments \(in_features, out_features\)"):
        cl.load_model("torch.nn:Linear")
    with pytest.raises(RequestError, match=r"nets.py is a Python file: name its factory"):
        cl.load_model("nets.py")


def test_a_checkpoint_finds_its_factory_relative_to_it_after_the_folder_moved(tmp_path):
    """The walkthrough's layout: ``shapes.pt`` at the top, the factory in ``examples/``."""
    data = shapes_folder(tmp_path / "data", 2, seed=7)
    project = tmp_path / "project"
    (project / "examples").mkdir(parents=True)
    (project / "examples" / "nets.py").write_text(ZOO_FILE.read_text())
    arch = f"{project / 'examples' / 'nets.py'}:resnet_basic"
    train(data, project / "shapes.pt", arch=arch, epochs=1, image_size=32, progress=False,
          log=quiet)  # fmt: skip
    project.rename(tmp_path / "moved")
    model = cl.load_model(tmp_path / "moved" / "shapes.pt")
    assert model.labels == ["circle", "square", "triangle"]


def test_a_factory_file_imports_its_neighbours_also_lazily_and_never_another_folders(tmp_path):
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "layers.py").write_text(f"import torch\nWIDTH = {3 if name == 'a' else 5}\n")
        (folder / "net.py").write_text(
            "import torch\n"
            "import layers\n"
            "def head(width):\n"
            "    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),\n"
            "                               torch.nn.Linear(3, width))\n"
            "def make():\n    return head(layers.WIDTH)\n"
            "def lazy():\n    import layers as later\n    return head(later.WIDTH)\n"
        )
    assert cl.load_model(f"{tmp_path / 'a' / 'net.py'}:make").module[2].out_features == 3
    assert cl.load_model(f"{tmp_path / 'b' / 'net.py'}:make").module[2].out_features == 5
    assert cl.load_model(f"{tmp_path / 'a' / 'net.py'}:lazy").module[2].out_features == 3
    assert "layers" not in sys.modules


def test_training_is_reproducible_from_its_seed_alone(tmp_path):
    data = shapes_folder(tmp_path / "data", 2, seed=8)
    states = []
    for draw in (1, 2):
        torch.manual_seed(draw)  # the caller's random state must not matter
        result = train(data, tmp_path / f"{draw}.pt", arch=RESNET, epochs=1, image_size=32,
                       seed=3, progress=False, log=quiet)  # fmt: skip
        states.append(result.model.module.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_grayscale_factory_trains_on_one_channel(tmp_path):
    (tmp_path / "gray.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),\n"
        "        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 7))\n"
    )
    data = shapes_folder(tmp_path / "data", 2, seed=9)
    result = train(data, tmp_path / "g.pt", arch=f"{tmp_path / 'gray.py'}:make", image_size=32,
                   mean=(0.5,), std=(0.25,), epochs=1, progress=False, log=quiet)  # fmt: skip
    assert result.model.channels == 1 and cl.load_model(tmp_path / "g.pt").channels == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--mean", "0.5"], "--mean has 1 and --std 3 value(s) (3 when not given)"),
        (["--mean", "0.5,0.5", "--std", "1,1"], "--mean has 2 and --std 2 value(s)"),
        (["--mean", "0.5", "--std", "0.2"], "cannot run on a blank input of shape (1, 1, 32, 32)"),
    ],
)
def test_preprocessing_that_does_not_fit_the_model_is_refused_before_any_work(
    tmp_path, capsys, options, message
):
    image = tmp_path / "x.png"
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    out = tmp_path / "report"
    args = ["explain", str(image), "--model", RESNET, "--input-size", "32", *options]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_pickled_module_as_weights_gets_no_advice_to_unpickle_it(tmp_path):
    torch.save(resnet_basic(), tmp_path / "whole.pth")
    with pytest.raises(RequestError, match="need code to load") as caught:
        cl.load_model(RESNET, weights=tmp_path / "whole.pth")
    assert "weights_only=False" not in str(caught.value)
