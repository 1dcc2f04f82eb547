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


def test_methods_lists_names_families_descriptions_parameters_and_passes(capsys):
    import convlens as cl
    from convlens.registry import get_method

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("saliency") and "gradient" in line and "Simonyan" in line for line in lines
    )
    heads = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert heads == cl.list_methods()
    text = "\n".join(lines)
    assert text.count("parameters: ") == text.count("forward passes per image: ") == len(heads)
    assert "parameters: n_masks=4000, grid=7, p=0.5" in text
    assert "forward passes per image: 1 + n_masks (4001)" in text
    assert all(get_method(name).passes for name in heads)


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


# -- which errors are the user's (one line, status 2) and which are bugs (a traceback) ----------


@pytest.mark.parametrize("error", [TypeError, ValueError, IndexError, KeyError, RuntimeError])
def test_an_internal_error_propagates_with_its_traceback(monkeypatch, error):
    import convlens.registry

    def broken(family=None):
        raise error("internal")

    monkeypatch.setattr(convlens.registry, "list_methods", broken)
    with pytest.raises(error, match="internal"):
        main(["methods"])


def test_an_internal_error_while_explaining_propagates(tmp_path, photo, monkeypatch):
    from convlens.registry import get_method

    def broken(self, inputs, targets):
        raise TypeError("internal")  # a bug inside a method, not a bad request

    monkeypatch.setattr(get_method("saliency"), "explain", broken)
    args = ["explain", str(photo), "--model", "shapes-cnn", "--methods", "saliency"]
    with pytest.raises(TypeError, match="internal"):
        main([*args, "--out", str(tmp_path / "out")])


def test_the_program_exits_1_with_a_traceback_on_a_bug_and_2_with_one_line_on_a_bad_request():
    import subprocess
    import sys

    bug = (
        "import sys, convlens.registry as r\n"
        "def broken(family=None): raise TypeError('internal')\n"
        "r.list_methods = broken\n"
        "from convlens.cli import main\n"
        "sys.exit(main(['methods']))\n"
    )
    done = subprocess.run([sys.executable, "-c", bug], capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "TypeError: internal" in done.stderr
    request = [sys.executable, "-m", "convlens.cli", "methods", "--family", "gradiant"]
    done = subprocess.run(request, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("convlens: error: unknown family 'gradiant'")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["methods", "--family", "gradiant"], "unknown family 'gradiant'"),
        (["explain", "--methods", "salency", "x.png"], "unknown method 'salency'"),
        (["explain", "--methods", "saliency", "--model", "no-such.pt", "x.png"], "not found"),
        (["features", "filters", "--model", "shapes-cnn", "--layer", "nope"], "unknown layer"),
        (["train", "no-such-folder"], "data folder not found"),
    ],
)
def test_bad_requests_anywhere_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_param_that_is_no_python_literal_is_taken_as_text(tmp_path, photo, capsys):
    # "{[1]: 2}" makes ast.literal_eval raise TypeError (a list is no dict key), not ValueError
    args = ["explain", str(photo), "--model", "shapes-cnn", "--methods", "integrated_gradients"]
    status = main([*args, "--param", "steps={[1]: 2}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert "steps" in err and "{[1]: 2}" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_an_unreadable_concepts_file_is_a_usage_error(tmp_path, capsys, content):
    concepts = tmp_path / "concepts.pt"
    if content is not None:
        concepts.write_bytes(content)
    args = ["features", "dissect", "--model", "shapes-cnn", "--shapes", "4"]
    assert main([*args, "--concepts", str(concepts), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "concepts" in err and len(err.strip().splitlines()) == 1, err


def test_main_leaves_the_allocator_setting_as_it_found_it(capsys):
    from convlens import engine

    assert not engine.keeping_freed_memory()
    assert main(["methods"]) == 0
    assert main(["methods", "--family", "gradiant"]) == 2
    assert not engine.keeping_freed_memory()
    assert engine._KEPT == {"active": False, "scoped": False}


def test_a_bug_while_reading_an_image_is_not_reported_as_a_skipped_image(
    tmp_path, photo, monkeypatch
):
    from convlens.model import Model

    def broken(self, images):
        raise TypeError("internal")

    monkeypatch.setattr(Model, "preprocess", broken)
    args = ["explain", str(photo), "--model", "shapes-cnn", "--methods", "saliency"]
    with pytest.raises(TypeError, match="internal"):
        main([*args, "--out", str(tmp_path / "out")])


def test_target_forms_of_the_command_line():
    from convlens.cli.requests import UsageError, parse_target
    from convlens.targets import Channel, Contrast, Neuron

    assert parse_target(None) is None and parse_target("predicted") is None
    assert parse_target("285") == 285 and parse_target("tabby") == "tabby"
    assert parse_target("contrast:281,tiger cat") == Contrast(281, "tiger cat")
    channel = parse_target("channel:_blocks.15:3")
    assert isinstance(channel, Channel) and (channel.layer, channel.channel) == ("_blocks.15", 3)
    neuron = parse_target("neuron:_blocks.15:3:2:1")
    assert isinstance(neuron, Neuron) and (neuron.channel, neuron.y, neuron.x) == (3, 2, 1)
    for bad in ("contrast:281", "channel:_blocks.15", "neuron:_blocks.15:3:x:1", "channel::3"):
        with pytest.raises(UsageError, match="--target"):
            parse_target(bad)


@pytest.mark.slow
def test_explain_with_contrast_and_unit_targets_and_a_layer(tmp_path, photo, capsys):
    out = tmp_path / "contrast"
    args = ["explain", str(photo), "--methods", "saliency,gradcam", "--out", str(out)]
    assert main([*args, "--target", "contrast:285,281", "--layer", "_blocks.10"]) == 0
    (image,) = json.loads((out / "results.json").read_text())["images"]
    assert image["methods"]["saliency"]["target"] == {"contrast": [285, 281]}
    assert image["methods"]["gradcam"]["params"]["layer"] == "_blocks.10"
    units = tmp_path / "units"
    args = ["explain", str(photo), "--methods", "saliency,cam", "--out", str(units)]
    status = main([*args, "--target", "channel:_blocks.15:3"])
    assert status == 1  # cam refuses a channel on its card; saliency explains it
    (image,) = json.loads((units / "results.json").read_text())["images"]
    assert image["methods"]["saliency"]["target"] == {"channel": ["_blocks.15", 3]}
    assert "cam explains classes" in image["methods"]["cam"]["refused"]
    capsys.readouterr()
    assert main([*args, "--target", "neuron:_blocks.15:3"]) == 2  # a malformed target
    assert "--target" in capsys.readouterr().err
