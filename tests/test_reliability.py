"""Reliability: hostile and huge images, refusals that do not sink a report, a report folder
that is one unit, requests checked before any work, malformed checkpoints and concept files,
diverging training, t-SNE on identical images, hidden files and terminal escapes."""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convlens as cl
from convlens import report, zoo
from convlens.checks import RequestError
from convlens.cli import main
from convlens.datasets import shapes_folder
from convlens.images import ImageError, load_image, to_rgb

# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_model():
    return cl.load_model("shapes-cnn")


@pytest.fixture(scope="module")
def shape_files(tmp_path_factory) -> list[Path]:
    """Four 64x64 shapes pictures, as PNG files."""
    root = shapes_folder(tmp_path_factory.mktemp("shapes"), 2, seed=3)
    return sorted(root.rglob("*.png"))[:4]


@pytest.fixture
def no_forward():
    """Fails the test if any module runs a forward pass while it is active."""

    def forbidden(module, inputs):
        raise AssertionError(f"a forward pass ({type(module).__name__}) ran before the check")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(forbidden)
    yield
    handle.remove()


def one_line_error(capsys, status: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convlens: error: "), err
    for word in words:
        assert word in lines[0], err
    return lines[0]


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def referenced(folder: Path) -> set[str]:
    """The files a report's results.json refers to (any string naming a file of the report: the
    pictures of each card, its views and raw picture, the attributions), with the page and
    results.json."""
    document = json.loads((folder / "results.json").read_text())
    names = {"index.html", "results.json"}

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.endswith((".png", ".npz")) and "/" not in value:
            names.add(value)

    walk(document)
    return names


# -- 3. images: decompression bombs, huge pictures --------------------------------------------


@pytest.mark.parametrize("side", [40, 100])  # over the limit (a warning), over twice (an error)
def test_a_decompression_bomb_is_an_image_error(tmp_path, monkeypatch, side):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(path)


def test_the_cli_skips_a_decompression_bomb_and_goes_on(tmp_path, monkeypatch, capsys, shape_files):
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (200, 200)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 64x64 shapes pass, 200x200 does not
    out = tmp_path / "out"
    args = ["explain", str(bomb), str(shape_files[0]), "--model", "shapes-cnn"]
    status = main([*args, "--methods", "saliency", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1 and "bomb.png" in err and "decompression bomb" in err, err
    results = json.loads((out / "results.json").read_text())
    assert [s["image"] for s in results["skipped"]] == [str(bomb)]
    assert [i["image"] for i in results["images"]] == [str(shape_files[0])]


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # resets VmHWM, the peak resident memory
        return True
    except OSError:
        return False


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("VmHWM"))


def test_a_huge_jpeg_is_decoded_at_a_reduced_size_for_a_small_input(tmp_path, monkeypatch):
    path = tmp_path / "huge.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    Image.fromarray(noise).resize((6000, 4000)).save(path, quality=80)
    full = 6000 * 4000 * 3  # bytes of the decoded picture

    opened = []
    real_open = Image.open

    def spy(*args, **kwargs):
        image = real_open(*args, **kwargs)
        opened.append(image)
        return image

    monkeypatch.setattr(Image, "open", spy)
    measured = _peak_rss_reset()
    before = _peak_rss_kib() if measured else 0
    picture = load_image(path, size=(256, 256))  # a 224 input from a 256-pixel shorter side
    peak = (_peak_rss_kib() - before) * 1024 if measured else 0
    (decoded,) = opened
    assert decoded.size == (750, 500)  # JPEG decoded at 1/8: 6000x4000 -> 750x500
    assert picture.mode == "RGB" and min(picture.size) >= 256 and picture.size == (750, 500)
    assert peak < full / 4, f"peak {peak / 2**20:.0f} MiB for a {full / 2**20:.0f} MiB picture"
    # without the hint the file is read in full
    assert load_image(path).size == (6000, 4000)


def test_other_formats_and_pictures_in_memory_are_reduced_by_an_integer_factor(tmp_path):
    picture = Image.fromarray(
        np.random.default_rng(1).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    )
    path = tmp_path / "large.png"
    picture.save(path)
    loaded = load_image(path, size=(256, 256))
    assert loaded.size == (2000 // 5, 1500 // 5)  # the largest factor that still covers 256
    assert to_rgb(picture, size=(256, 256)).size == (400, 300)
    assert to_rgb(picture.convert("P"), size=(256, 256)).size == (400, 300)  # after conversion
    assert to_rgb(picture, size=(1000, 1000)).size == (2000, 1500)  # factor < 2: unchanged
    small = to_rgb(np.asarray(picture), size=(100, 100))
    assert small.size == (math.ceil(2000 / 15), 100)  # reduce() rounds up


# -- 4. a method that refuses one image does not sink the report -------------------------------


def test_a_refusal_is_recorded_on_its_card_and_the_report_goes_on(tmp_path, capsys, shape_files):
    out = tmp_path / "out"
    args = ["explain", *map(str, shape_files[:2]), "--model", "shapes-cnn"]
    args += ["--methods", "saliency,kernel_shap", "--param", "kernel_shap.n_segments=1"]
    status = main([*args, "--param", "kernel_shap.n_samples=8", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1, captured.err
    assert "kernel_shap refused" in captured.err and "2 refused" in captured.out
    results = json.loads((out / "results.json").read_text())
    assert [i["image"] for i in results["images"]] == list(map(str, shape_files[:2]))
    for image in results["images"]:
        card = image["methods"]["kernel_shap"]
        assert card == {"refused": "kernel_shap needs at least 2 superpixels"}
        assert math.isfinite(image["methods"]["saliency"]["deletion"])
    assert [r["method"] for r in results["refused"]] == ["kernel_shap", "kernel_shap"]
    assert [row["method"] for row in results["ranking"]] == ["saliency"]
    page = (out / "index.html").read_text()
    assert page.count("kernel_shap refused this image: kernel_shap needs at least 2") == 2
    assert set(files_of(out)) == referenced(out)  # no orphaned pictures
    assert os.listdir(tmp_path) == ["out"]  # nothing temporary left beside it


def test_a_refusal_reason_is_escaped_on_the_page():
    document = {
        "model": "m", "methods": ["lime"], "curve_steps": 2, "seconds": 1.0, "skipped": [],
        "refused": [{"image": "a.png", "method": "lime", "reason": "<script>x</script>"}],
        "ranking": [], "features": [],
        "images": [{
            "image": "a.png", "input": "a.png", "class": 0, "label": "c", "probability": 1.0,
            "top5": [{"class": 0, "label": "c", "probability": 1.0}],
            "methods": {"lime": {"refused": "<script>x</script>"}},
        }],
    }  # fmt: skip
    page = report.render(document)
    assert "<script>x" not in page
    assert page.count("&lt;script&gt;x&lt;/script&gt;") == 2  # on the card and in the list


# -- 5. the report is one unit ------------------------------------------------------------------


def _interrupt_after(monkeypatch, name: str, calls: int, error: type[BaseException]) -> None:
    cls = cl.get_method(name)
    original = cls.explain
    seen = []

    def explain(self, x, targets):
        seen.append(1)
        if len(seen) > calls:
            raise error()
        return original(self, x, targets)

    monkeypatch.setattr(cls, "explain", explain)


def test_an_interrupted_run_leaves_the_previous_report_intact(
    tmp_path, monkeypatch, shapes_model, shape_files
):
    out = tmp_path / "reports" / "out"
    first = [(str(p), p) for p in shape_files[:2]]
    report.explain_images(shapes_model, first, ["saliency"], out, progress=False)
    previous = files_of(out)
    # page, results; per image: the input, the saliency map and its raw RGB picture
    assert set(previous) == referenced(out) and len(previous) == 2 + 2 * 3

    _interrupt_after(monkeypatch, "saliency", 1, KeyboardInterrupt)  # after the first image
    second = [(str(p), p) for p in shape_files[2:4]]
    with pytest.raises(KeyboardInterrupt):
        report.explain_images(shapes_model, second, ["saliency"], out, progress=False)
    assert files_of(out) == previous  # page, numbers and every picture as they were
    assert os.listdir(out.parent) == ["out"]  # the new run's folder is gone


def test_an_interrupted_or_terminated_command_exits_and_leaves_the_previous_report(
    tmp_path, monkeypatch, capsys, shape_files
):
    out = tmp_path / "reports" / "out"
    args = ["explain", *map(str, shape_files[:2]), "--model", "shapes-cnn"]
    args += ["--methods", "saliency", "--out", str(out)]
    assert main(args) == 0
    previous = files_of(out)
    _interrupt_after(monkeypatch, "saliency", 1, KeyboardInterrupt)
    assert main(args) == 130
    assert files_of(out) == previous and os.listdir(out.parent) == ["out"]

    def terminate(self, x, targets):  # SIGTERM arrives in the middle of the work
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    def fallback(signum, frame):  # what runs if main() installs no handler of its own
        raise KeyboardInterrupt

    monkeypatch.setattr(cl.get_method("saliency"), "explain", terminate)
    outer = signal.signal(signal.SIGTERM, fallback)
    try:
        status = main(args)
        assert signal.getsignal(signal.SIGTERM) is fallback  # main() restored it
    finally:
        signal.signal(signal.SIGTERM, outer)
    assert status == 143 and "terminated" in capsys.readouterr().err
    assert files_of(out) == previous and os.listdir(out.parent) == ["out"]


def test_a_second_run_leaves_only_its_own_files(tmp_path, shapes_model, shape_files):
    out = tmp_path / "out"
    three = [(str(p), p) for p in shape_files[:3]]
    report.explain_images(shapes_model, three, ["saliency", "gradcam"], out, progress=False)
    # per image: the input, the two maps and saliency's raw RGB picture (Simonyan et al.)
    assert len(files_of(out)) == 2 + 3 * 4
    one = [(str(shape_files[3]), shape_files[3])]
    document = report.explain_images(shapes_model, one, ["saliency"], out, progress=False)
    assert set(files_of(out)) == referenced(out)  # no stale pictures of the first run
    assert len(files_of(out)) == 2 + 3
    assert json.loads((out / "results.json").read_text()) == document
    assert os.listdir(tmp_path) == ["out"]


def test_a_report_does_not_replace_a_folder_that_is_not_a_report(tmp_path, capsys, shape_files):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    args = ["explain", str(shape_files[0]), "--model", "shapes-cnn", "--out", str(folder)]
    one_line_error(capsys, main(args), "not a convlens report")
    assert files_of(folder) == {"notes.txt": b"keep me"}


# -- 6. the whole request is checked before any work --------------------------------------------


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--methods", "integrated_gradients", "--param", "steps=0"], ["steps"]),
        (["--methods", "smoothgrad", "--param", "smoothgrad.n_samples=-1"], ["n_samples"]),
        (["--target", "hexagon"], ["unknown label 'hexagon'"]),
        (["--target", "7"], ["out of range"]),
        (["--methods", "gradcam", "--param", "layer=features.99"], ["unknown layer"]),
        (["--batch-size", "0"], ["batch_size"]),
    ],
)
def test_explain_checks_the_request_before_any_work(
    tmp_path, capsys, no_forward, shape_files, extra, words
):
    out = tmp_path / "out"
    args = ["explain", str(shape_files[0]), "--model", "shapes-cnn", "--out", str(out), *extra]
    one_line_error(capsys, main(args), *words)
    assert os.listdir(tmp_path) == []  # no files written


def test_explain_refuses_an_out_that_is_a_file(tmp_path, capsys, no_forward, shape_files):
    out = tmp_path / "out"
    out.write_text("a file")
    args = ["explain", str(shape_files[0]), "--model", "shapes-cnn", "--out", str(out)]
    one_line_error(capsys, main(args), "not a folder")
    assert out.read_text() == "a file" and os.listdir(tmp_path) == ["out"]


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if `train` starts its work (builds the model or reads an image)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("training started before the request was checked")

    monkeypatch.setattr(zoo, "lite0_transfer", forbidden)
    monkeypatch.setattr("convlens.train.load_image", forbidden)


@pytest.mark.parametrize(
    ("out", "words"),
    [("file.txt/model.pt", ["not a folder"]), ("folder", ["is a folder"])],
)
def test_train_refuses_an_unusable_out_before_training(tmp_path, capsys, no_training, out, words):
    data = shapes_folder(tmp_path / "data", 2, seed=0)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    before = sorted(os.listdir(tmp_path))
    one_line_error(capsys, main(["train", str(data), "--out", str(tmp_path / out)]), *words)
    assert sorted(os.listdir(tmp_path)) == before


def test_train_refuses_an_out_in_a_folder_it_cannot_write(
    tmp_path, capsys, no_training, monkeypatch
):
    data = shapes_folder(tmp_path / "data", 2, seed=0)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    real_access = os.access
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root may write anywhere: ask as a user
        monkeypatch.setattr(
            os,
            "access",
            lambda path, mode, **kw: (
                not (mode & os.W_OK and locked == pathlib.Path(path))
                and real_access(path, mode, **kw)
            ),
        )
    try:
        args = ["train", str(data), "--out", str(locked / "model.pt")]
        one_line_error(capsys, main(args), "not writable")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["evaluate", "--methods", "integrated_gradients", "--param", "steps=0"], ["steps"]),
        (["evaluate", "--methods", "gradcam", "--param", "layer=nope"], ["unknown layer"]),
        (["features", "class-model", "--target", "hexagon"], ["unknown label 'hexagon'"]),
        (["features", "class-model", "--target", "9"], ["out of range"]),
        (["features", "patches", "--shapes", "4", "--layer", "nope"], ["unknown layer"]),
        (["features", "patches", "--shapes", "4", "--k", "0"], ["--k"]),
    ],
)
def test_evaluate_and_features_check_the_request_before_any_work(
    tmp_path, capsys, no_forward, args, words
):
    out = tmp_path / "out"
    one_line_error(capsys, main([*args, "--model", "shapes-cnn", "--out", str(out)]), *words)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["evaluate", "features"])
def test_evaluate_and_features_refuse_an_out_that_is_a_file(tmp_path, capsys, no_forward, command):
    out = tmp_path / "out"
    out.write_text("a file")
    args = [command] + (["patches", "--shapes", "4"] if command == "features" else [])
    one_line_error(capsys, main([*args, "--model", "shapes-cnn", "--out", str(out)]), "folder")
    assert out.read_text() == "a file"


# -- 7. checkpoints and concept files -----------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint():
    model = zoo.lite0_transfer(["cat", "dog"], (64, 64), name="pets")
    return zoo.make_checkpoint(model)


def _without(checkpoint: dict, field: str) -> dict:
    return {k: v for k, v in checkpoint.items() if k != field}


def _state(checkpoint: dict, change) -> dict:
    state = dict(checkpoint["state_dict"])
    change(state)
    return {**checkpoint, "state_dict": state}


def _nan_weight(state: dict) -> None:
    state["_fc.bias"] = torch.full_like(state["_fc.bias"], float("nan"))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: {**c, "labels": ["cat", "dog", "bird"]}, "labels"),  # 3 names, 2 classes
        (lambda c: {**c, "labels": [1, 2]}, "labels"),
        (lambda c: {**c, "labels": ["cat", "cat"]}, "labels"),
        (lambda c: {**c, "labels": "cat,dog"}, "labels"),
        (lambda c: _without(c, "labels"), "labels"),
        (lambda c: _without(c, "state_dict"), "state_dict"),
        (lambda c: {**c, "input_size": [64]}, "input_size"),
        (lambda c: {**c, "input_size": ["64", 64]}, "input_size"),
        (lambda c: {**c, "input_size": [64.5, 64]}, "input_size"),
        (lambda c: {**c, "mean": [float("nan"), 0.5, 0.5]}, "mean"),
        (lambda c: {**c, "mean": ["a", 0.5, 0.5]}, "mean"),
        (lambda c: {**c, "mean": [0.5, 0.5]}, "mean"),
        (lambda c: {**c, "std": [0.0, 0.5, 0.5]}, "std"),
        (lambda c: {**c, "std": [float("inf"), 0.5, 0.5]}, "std"),
        (lambda c: {**c, "crop": 0.0}, "crop"),
        (lambda c: {**c, "crop": float("nan")}, "crop"),
        (lambda c: {**c, "name": 3}, "name"),
        (lambda c: _state(c, _nan_weight), "state_dict"),
        (lambda c: _state(c, lambda s: s.pop("_fc.weight")), "state_dict"),
        (lambda c: {**c, "state_dict": [1, 2]}, "state_dict"),
    ],
)
def test_a_malformed_checkpoint_is_refused_naming_the_field(checkpoint, change, field):
    with pytest.raises(RequestError, match=f"'{field}'"):
        zoo.from_checkpoint(change(checkpoint))


def test_a_malformed_checkpoint_file_is_one_line_on_the_command_line(
    tmp_path, capsys, checkpoint, no_forward, shape_files
):
    path = tmp_path / "bad.pt"
    torch.save({**checkpoint, "labels": ["cat", "dog", "bird"]}, path)
    with pytest.raises(RequestError, match="'labels' has 3 names"):
        cl.load_model(path)
    args = ["explain", str(shape_files[0]), "--model", str(path), "--out", str(tmp_path / "o")]
    line = one_line_error(capsys, main(args), "bad.pt", "'labels'")
    assert "2 classes" in line
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]


def test_a_good_checkpoint_still_loads(checkpoint):
    model = zoo.from_checkpoint(checkpoint)
    assert model.labels == ["cat", "dog"] and model.input_size == (64, 64)
    # the preprocessing fields have defaults (the bundled model's) when they are left out
    bare = {k: checkpoint[k] for k in ("state_dict", "labels")}
    model = zoo.from_checkpoint({**bare, "input_size": (64, 64)})
    assert (model.mean, model.std, model.crop) == (zoo.LITE_MEAN, zoo.LITE_STD, 0.875)


def test_training_never_writes_a_checkpoint_with_nan_weights(checkpoint):
    model = zoo.from_checkpoint(checkpoint)
    with torch.no_grad():
        model.module._fc.weight[0, 0] = float("nan")
    with pytest.raises(RequestError, match="NaN"):
        zoo.make_checkpoint(model)


def _concepts(n: int = 4, side: int = 64) -> torch.Tensor:
    masks = torch.zeros(n, side, side, dtype=torch.bool)
    masks[:, :32] = True
    return masks


@pytest.mark.parametrize(
    ("concepts", "words"),
    [
        ({"top": torch.full((4, 64, 64), float("nan"))}, ["'top'", "boolean"]),
        ({"top": torch.full((4, 64, 64), 0.5)}, ["'top'", "boolean"]),
        ({1: _concepts()}, ["names"]),
        ({"top": _concepts(), "half": _concepts(4, 32)}, ["'half'", "shape"]),
        ({"top": _concepts(3)}, ["'top'", "3 masks"]),
        ({"top": "masks"}, ["'top'"]),
        ({"top": _concepts()[0]}, ["'top'", "(N, H, W)"]),
        ({}, ["at least one concept"]),
    ],
)
def test_a_malformed_concepts_file_is_refused_before_any_work(
    tmp_path, capsys, no_forward, concepts, words
):
    path = tmp_path / "concepts.pt"
    torch.save(concepts, path)
    args = ["features", "dissect", "--model", "shapes-cnn", "--shapes", "4"]
    status = main([*args, "--concepts", str(path), "--out", str(tmp_path / "out")])
    one_line_error(capsys, status, "concepts", *words)
    assert os.listdir(tmp_path) == ["concepts.pt"]


def test_dissect_refuses_concepts_of_different_shapes(shapes_model):
    x = cl.datasets.shapes(4, seed=0).images
    with pytest.raises(RequestError, match="'half' has masks of shape"):
        cl.features.dissect(shapes_model, x, {"top": _concepts(), "half": _concepts(4, 32)})


# -- 8. training: the learning rate, and a loss that diverges -----------------------------------


@pytest.mark.parametrize("lr", ["nan", "inf", "-inf", "0", "-0.1"])
def test_train_refuses_a_bad_learning_rate_before_training(tmp_path, capsys, no_training, lr):
    data = shapes_folder(tmp_path / "data", 2, seed=0)
    out = tmp_path / "model.pt"
    one_line_error(capsys, main(["train", str(data), "--out", str(out), f"--lr={lr}"]), "lr")
    assert not out.exists()


def test_a_diverging_training_stops_and_writes_no_checkpoint(tmp_path):
    data = shapes_folder(tmp_path / "data", 3, seed=1)
    out = tmp_path / "model.pt"
    with pytest.raises(RequestError, match="diverged"):
        cl.train.train(data, out, epochs=3, image_size=64, lr=1e30, progress=False,
                       log=lambda _: None)  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["data"]


# -- 11. t-SNE on identical images ---------------------------------------------------------------


def test_tsne_refuses_identical_embeddings_before_scikit_learn(shapes_model, monkeypatch):
    import sklearn.manifold

    def crash(*args, **kwargs):  # scikit-learn's t-SNE dies with SIGSEGV on identical points
        raise AssertionError("TSNE was called on embeddings it cannot place")

    monkeypatch.setattr(sklearn.manifold, "TSNE", crash)
    x = cl.datasets.shapes(1, seed=0).images.expand(6, -1, -1, -1)
    with pytest.raises(RequestError, match="distinct"):
        cl.features.tsne(shapes_model, x)
    with pytest.raises(RequestError, match="at least 5 images"):
        cl.features.tsne(shapes_model, x[:1])


# -- 12. hidden files, honest output, terminal escapes --------------------------------------------


def test_hidden_files_and_folders_are_ignored_at_every_depth(tmp_path):
    data = shapes_folder(tmp_path / "data", 2, seed=0)
    picture = next((data / "circle").glob("*.png")).read_bytes()
    for hidden in (
        ".ipynb_checkpoints/circle_0000-checkpoint.png",
        "deeper/.cache/circle.png",
        "deeper/._circle.png",
        ".DS_Store",
    ):
        path = data / "circle" / hidden
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(picture)
    (data / ".trash" / "x").mkdir(parents=True)
    (data / ".trash" / "x" / "a.png").write_bytes(picture)
    folder = cl.train.scan_folder(data)
    assert folder.classes == ["circle", "square", "triangle"]
    assert [p.name for p in folder.files if p.parent.name != "square"][:2] == [
        "circle_0000.png",
        "circle_0001.png",
    ]
    assert len(folder.files) == 6


def test_train_prints_no_validation_accuracy_it_did_not_measure(tmp_path, capsys):
    data = shapes_folder(tmp_path / "data", 2, seed=0)
    (data / "circle" / "evil\x1b[2J\x07.png").write_bytes(b"not a png")
    out = tmp_path / "model.pt"
    args = ["train", str(data), "--out", str(out), "--epochs", "1", "--image-size", "64"]
    assert main([*args, "--val-fraction", "0"]) == 0
    err = capsys.readouterr().err
    assert "validation accuracy" not in err, err
    assert "no validation split" in err and "accuracy on the training images" in err
    assert "\x1b" not in err and "\x07" not in err  # the file name's escapes are not echoed
    assert "evil\\x1b[2J\\x07.png" in err
    assert out.exists()


def test_the_command_line_escapes_control_characters_of_names(tmp_path, capsys, shape_files):
    evil = tmp_path / "evil\x1b]0;owned\x07\x1b[31m.png"
    evil.write_bytes(b"not a png")
    args = ["explain", str(evil), str(shape_files[0]), "--model", "shapes-cnn"]
    assert main([*args, "--methods", "saliency", "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "\x1b" not in captured.err + captured.out and "\x07" not in captured.err
    assert "evil\\x1b]0;owned\\x07\\x1b[31m.png" in captured.err
    status = main(["explain", str(evil), "--model", "no\x1b[2J.pt", "--out", str(tmp_path / "o")])
    line = one_line_error(capsys, status, "not found")
    assert "no\\x1b[2J.pt" in line


# -- the folder swap itself ----------------------------------------------------------------------


@pytest.mark.parametrize("exchange", [True, False])  # renameat2, or the two-rename fallback
def test_replace_folder_swaps_a_full_folder_and_removes_the_old_one(
    tmp_path, monkeypatch, exchange
):
    from convlens import files

    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda first, second: False)
    target = tmp_path / "report"
    target.mkdir()
    (target / "old.png").write_text("old")
    new = files.make_staging_folder(target)
    (new / "new.png").write_text("new")
    files.replace_folder(new, target)
    assert files_of(target) == {"new.png": b"new"} and os.listdir(tmp_path) == ["report"]


def test_replace_folder_puts_the_previous_folder_back_if_the_move_is_interrupted(
    tmp_path, monkeypatch
):
    from convlens import files

    monkeypatch.setattr(files, "_exchange", lambda first, second: False)
    target = tmp_path / "report"
    target.mkdir()
    (target / "old.png").write_text("old")
    new = files.make_staging_folder(target)
    (new / "new.png").write_text("new")
    real_rename = os.rename
    moves = []

    def rename(source, destination):
        moves.append((Path(source).name, Path(destination).name))
        if Path(source) == new and len(moves) > 1:  # once the previous folder is moved away
            raise KeyboardInterrupt
        real_rename(source, destination)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        files.replace_folder(new, target)
    assert files_of(target) == {"old.png": b"old"}
    assert [m[0] for m in moves] == [new.name, "report", new.name, moves[1][1]]  # and back
