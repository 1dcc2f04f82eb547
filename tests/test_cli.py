"""The command line: outputs, method listing, and one-line errors with non-zero exits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from convlens.cli import main


@pytest.fixture(scope="module")
def photo(tmp_path_factory, photos):
    path = tmp_path_factory.mktemp("images") / "cat <1>.jpg"
    photos["chelsea"].save(path)
    return path


@pytest.mark.slow
def test_explain_writes_overlays_results_and_index(tmp_path, photo, capsys):
    out = tmp_path / "out"
    status = main(
        [
            "explain",
            str(photo),
            "--methods",
            "saliency,guided_backprop",
            "--target",
            "285",
            "--out",
            str(out),
        ]
    )
    assert status == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    (image,) = results["images"]
    assert set(image["methods"]) == {"saliency", "guided_backprop"}
    for name, entry in image["methods"].items():
        assert entry["target"] == 285 and entry["label"] == "Egyptian cat"
        assert entry["forwards"] == 1 and entry["seconds"] > 0 and "params" in entry
        with Image.open(out / entry["file"]) as picture:
            assert picture.size == (224, 224), name
    page = (out / "index.html").read_text()
    assert "cat &lt;1&gt;" in page and "<1>" not in page  # user text is escaped


@pytest.mark.slow
def test_explain_with_a_label_name_and_params(tmp_path, photo):
    out = tmp_path / "out"
    status = main(
        [
            "explain",
            str(photo),
            "--methods",
            "integrated_gradients",
            "--target",
            "tabby",
            "--param",
            "steps=4",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    entry = json.loads((out / "results.json").read_text())["images"][0]["methods"][
        "integrated_gradients"
    ]
    assert entry["target"] == 281 and entry["params"]["steps"] == 4 and entry["forwards"] == 6


@pytest.mark.slow
def test_method_scoped_params_win_over_shared_ones(tmp_path, photo):
    out = tmp_path / "out"
    args = [
        "explain",
        str(photo),
        "--methods",
        "integrated_gradients,smoothgrad",
        "--out",
        str(out),
        "--param",
        "smoothgrad.n_samples=3",
        "--param",
        "steps=4",
    ]
    assert main(args) == 0
    methods = json.loads((out / "results.json").read_text())["images"][0]["methods"]
    assert methods["smoothgrad"]["params"]["n_samples"] == 3
    assert methods["integrated_gradients"]["params"]["steps"] == 4


@pytest.mark.slow
def test_superpixel_methods_also_write_their_superpixel_picture(tmp_path, photo):
    out = tmp_path / "out"
    args = ["explain", str(photo), "--methods", "lime", "--out", str(out)]
    assert main([*args, "--param", "n_samples=20", "--param", "n_segments=10"]) == 0
    entry = json.loads((out / "results.json").read_text())["images"][0]["methods"]["lime"]
    with Image.open(out / entry["superpixels"]) as picture:
        assert picture.size == (224, 224)
    assert entry["superpixels"] in (out / "index.html").read_text()


def test_methods_lists_names_families_and_descriptions(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("saliency") and "gradient" in line and "Simonyan" in line for line in lines
    )
    import convlens as cl

    assert len(lines) == len(cl.list_methods())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "salency"], "unknown method 'salency'"),
        (["--target", "1000"], "out of range"),
        (["--target", "tabbby"], "unknown label 'tabbby'"),
        (["--param", "steps"], "name=value"),
        (["--param", "window=3"], "no selected method takes"),
        (["--param", "rise.n_masks=10"], "which is not selected"),
        (["--param", "saliency.steps=3"], "takes no parameter 'steps'"),
    ],
)
def test_bad_requests_exit_non_zero_with_one_line(tmp_path, photo, capsys, args, message):
    status = main(["explain", str(photo), "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("content", [None, b"text", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_unreadable_images_are_reported_and_skipped(tmp_path, photo, capsys, content):
    bad = tmp_path / "bad.jpg"
    if content is not None:
        bad.write_bytes(content)
    status = main(["explain", str(bad), str(photo), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and "bad.jpg" in err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["image"] for r in results["images"]] == [str(photo)]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "explain" in capsys.readouterr().out


def test_no_images_is_a_usage_error(capsys):
    assert main(["explain", "--methods", "saliency"]) == 2
    assert "give image files" in capsys.readouterr().err


def test_grayscale_and_rgba_files_are_explained(tmp_path):
    rng = np.random.default_rng(0)
    gray = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 255, (64, 80, 4), dtype=np.uint8), "RGBA").save(rgba)
    assert main(["explain", str(gray), str(rgba), "--out", str(tmp_path / "o")]) == 0
