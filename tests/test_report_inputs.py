"""What a report explains besides the predicted class: top:K maps, one target per image
(--targets-file), reference sets drawn from the user's images (--background) and the raw
attributions (--save-attributions), through the library and the command line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import convlens as cl
from convlens import report
from convlens.checks import RequestError
from convlens.cli import main
from convlens.cli.requests import UsageError, parse_target
from convlens.datasets import shapes_folder
from convlens.metrics import deletion, insertion
from convlens.report import Background, Top

GRADIENT_SHAP = {"n_samples": 3}


@pytest.fixture(scope="module")
def model():
    return cl.load_model("shapes-cnn")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two PNG images per shape class, in one folder per class."""
    return shapes_folder(tmp_path_factory.mktemp("inputs") / "data", 2, seed=3)


def fresh(model, path, method, **kwargs):
    return cl.explain(model, str(path), method, progress=False, **kwargs)


# -- top:K ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def top2(tmp_path_factory, model, data):
    """A top:2 report of two images, with a deterministic and a random method and the raw
    attributions."""
    out = tmp_path_factory.mktemp("top") / "out"
    images = [data / "circle" / "circle_0000.png", data / "square" / "square_0001.png"]
    document = report.explain_images(
        model, [(str(p), p) for p in images], ["saliency", "gradient_shap"], out,
        params={"gradient_shap": GRADIENT_SHAP}, target=Top(2), progress=False,
        save_attributions=True,
    )  # fmt: skip
    return out, document, images


def test_top_k_maps_are_explain_for_each_ranked_class(top2, model):
    out, document, images = top2
    assert json.loads((out / "results.json").read_text()) == document
    for entry, path in zip(document["images"], images, strict=True):
        x = model.inputs(str(path))
        probabilities = model.predict(x)[0]
        best = probabilities.topk(2)
        assert entry["target"] == "top:2"
        assert [c["class"] for c in entry["top"]] == best.indices.tolist()
        arrays = np.load(out / entry["attributions"])
        assert sorted(arrays) == sorted(
            f"{m}@{r}" for m in ("saliency", "gradient_shap") for r in (1, 2)
        )
        for method in ("saliency", "gradient_shap"):
            record = entry["methods"][method]
            assert [m["rank"] for m in record["top"]] == [1, 2]
            assert {k: record[k] for k in ("file", "deletion", "target")} == {
                k: record["top"][0][k] for k in ("file", "deletion", "target")
            }
            for rank, (c, p) in enumerate(zip(best.indices, best.values, strict=True), 1):
                m = record["top"][rank - 1]
                assert (m["class"], m["target"], m["label"]) == (
                    int(c),
                    int(c),
                    model.label(int(c)),
                )
                assert m["probability"] == pytest.approx(float(p), abs=1e-7)
                assert (out / m["file"]).is_file() and m["array"] == f"{method}@{rank}"
                params = GRADIENT_SHAP if method == "gradient_shap" else {}
                e = fresh(model, path, method, target=int(c), **params)
                assert np.array_equal(arrays[m["array"]], e.attribution[0].numpy())
                heat = e.heatmap()
                common = {"steps": document["curve_steps"], "target": [int(c)], "progress": False}
                auc = deletion(model, x, heat, **common).auc[0]
                assert m["deletion"] == pytest.approx(float(auc), abs=1e-6)
                auc = insertion(model, x, heat, **common).auc[0]
                assert m["insertion"] == pytest.approx(float(auc), abs=1e-6)


def test_top_k_ranks_methods_on_rank_one_maps_only(top2):
    _, document, _ = top2
    for row in document["ranking"]:
        firsts = [image["methods"][row["method"]]["top"][0] for image in document["images"]]
        assert row["deletion"] == pytest.approx(np.mean([m["deletion"] for m in firsts]))
        assert row["insertion"] == pytest.approx(np.mean([m["insertion"] for m in firsts]))


def test_top_k_card_shows_each_rank_with_its_class_and_probability(top2):
    out, document, _ = top2
    page = (out / "index.html").read_text()
    assert "only the rank-1 maps" in page
    for entry in document["images"]:
        assert f'href="{entry["attributions"]}"' in page
        for c in entry["top"]:
            assert f"#{c['rank']} {c['label']} ({100 * c['probability']:.1f}%)" in page
    for source in re.findall(r'src="([^"]+)"', page):  # every picture the page shows exists
        assert (out / source).is_file()


def test_a_top_k_card_escapes_labels_and_shows_a_refused_rank():
    hostile = "<script>alert(1)</script>"
    ranks = [
        {"rank": 1, "class": 0, "label": hostile, "probability": 0.75},
        {"rank": 2, "class": 1, "label": "b", "probability": 0.25},
    ]
    shown = {"file": "a_top1_saliency.png", "target": 0, "seconds": 0.1, "forwards": 1}
    first = {**ranks[0], **shown, "deletion": 0.1, "insertion": 0.9}
    second = {**ranks[1], "refused": "too few superpixels"}
    page = report.render(
        {
            "model": "m", "methods": ["saliency"], "curve_steps": 2, "seconds": 1.0,
            "skipped": [], "features": [], "ranking": [], "target": "top:2", "background": None,
            "refused": [{"image": "a.png", "method": "saliency", "rank": 2, "reason": "few"}],
            "images": [
                {
                    "image": "a.png", "input": "a.png", "target": "top:2", "top": ranks,
                    "class": 0, "label": hostile, "probability": 0.75, "top5": ranks,
                    "methods": {"saliency": {**first, "top": [first, second]}},
                }
            ],
        }
    )  # fmt: skip
    assert "<script>alert" not in page
    assert "#1 &lt;script&gt;alert(1)&lt;/script&gt; (75.0%)" in page
    assert "#2 b (25.0%)" in page and "saliency refused this image: too few superpixels" in page
    assert "(rank 2): few" in page


def test_top_k_requests_are_checked(model, tmp_path):
    with pytest.raises(RequestError, match="top k must be a positive integer"):
        Top(0)
    with pytest.raises(RequestError, match="more classes than the model has"):
        report.explain_images(model, [("a", "a.png")], ["saliency"], tmp_path / "o", target=Top(5))
    assert not (tmp_path / "o").exists()
    assert parse_target("top:3", top=True) == Top(3)
    for bad in ("top:0", "top:x", "top:"):
        with pytest.raises(UsageError, match="K of top:K"):
            parse_target(bad, top=True)
    with pytest.raises(UsageError, match="only"):
        parse_target("top:3")  # not for `convlens features class-model`


# -- --targets-file ---------------------------------------------------------------------------


def test_targets_file_gives_each_image_its_own_target(tmp_path, data, model, capsys):
    images = [
        data / "circle" / "circle_0000.png",
        data / "square" / "square_0000.png",
        data / "triangle" / "triangle_0000.png",
    ]
    table = tmp_path / "targets.csv"
    table.write_text(
        "image,target\n"
        f"{images[0]},top:2\n"  # by the path as given
        "square_0000.png,contrast:square,circle\n"  # by file name; an unquoted contrast
    )
    out = tmp_path / "out"
    args = ["explain", *map(str, images), "--model", "shapes-cnn", "--methods", "saliency"]
    assert main([*args, "--target", "3", "--targets-file", str(table), "--out", str(out)]) == 0
    first, second, third = json.loads((out / "results.json").read_text())["images"]
    assert first["target"] == "top:2" and len(first["methods"]["saliency"]["top"]) == 2
    assert second["target"] == {"contrast": [1, 0]}
    assert second["methods"]["saliency"]["target"] == {"contrast": [1, 0]}
    assert third["target"] == 3 and third["methods"]["saliency"]["target"] == 3
    e = fresh(model, images[1], "saliency", target=cl.targets.Contrast(1, 0))
    assert second["methods"]["saliency"]["deletion"] == pytest.approx(
        float(deletion(model, images[1], e.heatmap(), steps=20, progress=False).auc[0]), abs=1e-6
    )
    assert "--targets-file CSV" in _help(capsys) and "win" in _help(capsys)


def _help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "content, message",
    [
        ("name,target\na.png,1\n", "line 1: the first row must be the header image,target"),
        ("image,target\na.png,1\nb.png,channel:x\n", "line 3: target 'channel:x': expected"),
        ("image,target\na.png,\n", "line 2: expected IMAGE,TARGET"),
        ("image,target\na.png,1\n\na.png,2\n", "line 4: 'a.png' already has a target (line 2)"),
        ('image,target\na.png,"1\n', "line 2: unexpected end of data"),
        ("image,target\nc.png,1\na.png,1\nd.png,2\n", "images that are not given: c.png, d.png"),
        ("image,target\na.png,nonagon\n", "line 2: unknown label 'nonagon'"),
        ("image,target\nb.png,top:9\n", "line 2: top:9 asks for more classes"),
        ("", "is empty; expected the header image,target"),
    ],
)  # fmt: skip
def test_a_bad_targets_file_is_one_line_naming_it_before_any_work(
    tmp_path, data, capsys, content, message
):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes((data / "circle" / "circle_0000.png").read_bytes())
    table = tmp_path / "t.csv"
    table.write_text(content)
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", "shapes-cnn"]
    assert main([*args, "--targets-file", str(table), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and f"--targets-file {table}" in err
    assert not out.exists()


def test_a_file_name_of_two_given_images_is_refused(tmp_path, data, capsys):
    images = [data / "circle" / "circle_0000.png", tmp_path / "circle_0000.png"]
    images[1].write_bytes(images[0].read_bytes())
    table = tmp_path / "t.csv"
    table.write_text("image,target\ncircle_0000.png,1\n")
    args = ["explain", *map(str, images), "--model", "shapes-cnn", "--targets-file", str(table)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "is the file name of 2 given images" in capsys.readouterr().err


def test_explain_images_takes_targets_per_image_and_the_old_call(model, data, tmp_path):
    sources = [
        ("a", data / "circle" / "circle_0000.png"),
        ("b", data / "square" / "square_0000.png"),
    ]
    document = report.explain_images(
        model, sources, ["saliency"], tmp_path / "one", target=2, targets={"b": Top(2)},
        progress=False,
    )  # fmt: skip
    assert [i["target"] for i in document["images"]] == [2, "top:2"]
    old = report.explain_images(model, sources, ["saliency"], tmp_path / "two", None, 3)
    assert [i["methods"]["saliency"]["target"] for i in old["images"]] == [3, 3]
    with pytest.raises(RequestError, match="not explained: c, d"):
        report.explain_images(
            model, sources, ["saliency"], tmp_path / "x", targets={"c": 1, "d": 2}
        )
    with pytest.raises(RequestError, match="unknown label 'nonagon'"):
        report.explain_images(
            model, sources, ["saliency"], tmp_path / "x", targets={"a": "nonagon"}
        )
    assert not (tmp_path / "x").exists()


# -- --background -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backdrop(tmp_path_factory, data):
    """A folder of six readable images (in sub-folders), a hidden one and an unreadable one."""
    root = tmp_path_factory.mktemp("background") / "bg"
    for path in sorted(data.rglob("*.png")):
        target = root / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (root / ".hidden.png").write_bytes((data / "circle" / "circle_0000.png").read_bytes())
    (root / "broken.png").write_bytes(b"not a png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_background_draws_a_seeded_set_and_skips_unreadable_files(model, backdrop):
    files = report.background_files([backdrop])
    assert ".hidden.png" not in {f.name for f in files} and "notes.txt" not in {
        f.name for f in files
    }
    assert len(files) == 7  # six images and the broken one
    logged: list[str] = []
    everything = report.load_background(model, [backdrop], size=32, seed=0, log=logged.append)
    assert everything.files == [str(f) for f in files if f.name != "broken.png"]
    assert [s["image"] for s in everything.skipped] == [str(backdrop / "broken.png")]
    assert len(logged) == 1 and "broken.png" in logged[0]
    expected = torch.cat([model.preprocess(f) for f in everything.files])
    assert torch.equal(everything.images, expected)
    three = report.load_background(model, [backdrop], size=3, seed=0)
    assert len(three.files) == 3 and set(three.files) <= set(everything.files)
    assert report.load_background(model, [backdrop], size=3, seed=0).files == three.files
    draws = {tuple(report.load_background(model, [backdrop], 3, seed=s).files) for s in range(6)}
    assert len(draws) > 1  # the seed chooses
    assert three.description == f"background (3 images from {backdrop}, seed 0)"
    with pytest.raises(RequestError, match="none of the 1 background"):
        report.load_background(model, [backdrop / "broken.png"])
    with pytest.raises(FileNotFoundError, match="background not found"):
        report.background_files([backdrop / "missing"])


def test_deepshap_and_gradient_shap_use_the_background(tmp_path, model, data, backdrop):
    image = data / "circle" / "circle_0001.png"
    out = tmp_path / "out"
    args = ["explain", str(image), "--model", "shapes-cnn", "--out", str(out)]
    args += ["--methods", "deeplift,gradient_shap,integrated_gradients", "--save-attributions"]
    args += ["--param", "deeplift.shap=True", "--param", "gradient_shap.n_samples=3"]
    args += ["--param", "integrated_gradients.baseline=mean", "--param", "steps=4"]
    assert main([*args, "--background", str(backdrop), "--background-size", "3"]) == 0
    text = (out / "results.json").read_text()
    assert "tensor(" not in text
    document = json.loads(text)
    drawn = document["background"]
    assert drawn["description"] == f"background (3 images from {backdrop}, seed 0)"
    references = torch.cat([model.preprocess(f) for f in drawn["files"]])
    (entry,) = document["images"]
    arrays = np.load(out / entry["attributions"])
    expected = {
        "deeplift": fresh(model, image, "deeplift", shap=True, baseline=references),
        "gradient_shap": fresh(model, image, "gradient_shap", n_samples=3, baseline=references),
        "integrated_gradients": fresh(
            model, image, "integrated_gradients", steps=4, baseline=references.mean(0, keepdim=True)
        ),
    }
    for method, e in expected.items():
        assert np.allclose(arrays[method], e.attribution[0].numpy(), rtol=1e-5, atol=1e-7), method
    params = {m: entry["methods"][m]["params"]["baseline"] for m in expected}
    assert params == {
        "deeplift": drawn["description"],
        "gradient_shap": drawn["description"],
        "integrated_gradients": f"mean image of the {drawn['description']}",
    }
    assert drawn["files"][0] in (out / "index.html").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "DeepSHAP (deeplift with shap=True) needs a reference set: give --background DIR"),
        (["--background", "missing-folder"], "background not found: missing-folder"),
        (["--background", "BG", "--background-size", "0"], "--background-size must be a positive"),
    ],
)
def test_background_requests_are_checked_before_any_work(
    tmp_path, data, backdrop, capsys, extra, message
):
    out = tmp_path / "out"
    extra = [str(backdrop) if part == "BG" else part for part in extra]
    args = ["explain", str(data / "circle" / "circle_0000.png"), "--model", "shapes-cnn"]
    args += ["--methods", "deeplift", "--param", "deeplift.shap=True", "--out", str(out)]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_a_background_no_method_takes_is_refused_not_ignored(tmp_path, data, backdrop, capsys):
    out = tmp_path / "out"
    args = ["explain", str(data / "circle" / "circle_0000.png"), "--model", "shapes-cnn"]
    args += ["--methods", "gradcam,deeplift", "--background", str(backdrop), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--background: none of the methods (gradcam, deeplift)" in err
    assert not out.exists()
    # baseline=mean takes it: the set's mean image
    assert main([*args, "--param", "deeplift.baseline=mean", "--background-size", "2"]) == 0


def test_a_background_tensor_in_python(model, data, tmp_path):
    references = cl.datasets.shapes(4, seed=9).images
    sources = [("c", data / "circle" / "circle_0000.png")]
    document = report.explain_images(
        model, sources, ["deeplift"], tmp_path / "o", params={"deeplift": {"shap": True}},
        background=references, save_attributions=True, progress=False,
    )  # fmt: skip
    arrays = np.load(tmp_path / "o" / document["images"][0]["attributions"])
    e = fresh(model, sources[0][1], "deeplift", shap=True, baseline=references)
    assert np.allclose(arrays["deeplift"], e.attribution[0].numpy(), rtol=1e-5, atol=1e-7)
    assert document["background"]["description"] == "background (4 images from a tensor)"
    with pytest.raises(RequestError, match="DeepSHAP"):
        report.explain_images(
            model, sources, ["deeplift"], tmp_path / "x", params={"deeplift": {"shap": True}}
        )
    with pytest.raises(RequestError, match="none of the methods \\(gradcam\\) uses a background"):
        report.explain_images(model, sources, ["gradcam"], tmp_path / "y", background=references)
    with pytest.raises(RequestError, match="a background is a tensor"):
        Background(torch.zeros(3, 8, 8))


# -- --save-attributions ----------------------------------------------------------------------


def test_saved_attributions_are_each_methods_attribution(tmp_path, model, data, capsys):
    images = [data / "circle" / "circle_0000.png", data / "triangle" / "triangle_0001.png"]
    out = tmp_path / "out"
    args = ["explain", *map(str, images), "--model", "shapes-cnn", "--methods", "gradcam,saliency"]
    assert main([*args, "--save-attributions", "--out", str(out)]) == 0
    document = json.loads((out / "results.json").read_text())
    page = (out / "index.html").read_text()
    for entry, path in zip(document["images"], images, strict=True):
        assert entry["attributions"].endswith("_attributions.npz")
        assert f'href="{entry["attributions"]}"' in page
        arrays = np.load(out / entry["attributions"])
        assert sorted(arrays) == ["gradcam", "saliency"]
        for method in ("gradcam", "saliency"):
            assert entry["methods"][method]["array"] == method
            e = fresh(model, path, method)
            assert arrays[method].dtype == np.float32
            assert arrays[method].shape == tuple(e.attribution.shape[1:])
            assert np.array_equal(arrays[method], e.attribution[0].numpy())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left
    assert "--save-attributions" in _help(capsys)


def test_a_prediction_only_method_gives_rank_one_and_no_refusal(tmp_path, model, data):
    """contrast_cam explains the prediction only: with top:2 its rank-2 map is not asked of it
    (marked on the card, not counted as a refusal), and its class check does not apply."""
    image = data / "circle" / "circle_0000.png"
    document = report.explain_images(
        model, [(str(image), image)], ["contrast_cam"], tmp_path / "out", target=Top(2),
        progress=False,
    )  # fmt: skip
    assert document["refused"] == []
    entry = document["images"][0]["methods"]["contrast_cam"]
    first, second = entry["top"]
    assert "file" in first and "explains the prediction (rank 1) only" in second["refused"]
    assert entry["class_sensitivity"]["applies"] is False
