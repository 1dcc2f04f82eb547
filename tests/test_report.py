"""The HTML report of `convlens explain`: its numbers, escaping, offline page, skipped images,
atomic files, and a real headless Chromium that loads it, sorts its table and enlarges a picture.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import Chromium, chromium_path
from PIL import Image

import convlens as cl
from convlens import report
from convlens.cli import main
from convlens.datasets import shapes_folder
from convlens.metrics import deletion, insertion

HOSTILE = "<img src=x onerror=alert(1)> & 'quote'"
METHODS = ["gradcam", "saliency", "lime"]


@pytest.fixture(scope="module")
def shapes_model():
    return cl.load_model("shapes-cnn")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A report on the bundled shapes CNN: three images (one with a hostile name), one file
    that is not an image, three methods (one with superpixels) and the features section."""
    root = tmp_path_factory.mktemp("report")
    data = shapes_folder(root / "data", 2, seed=3)
    hostile = root / f"{HOSTILE}.png"
    (data / "circle" / "circle_0000.png").rename(hostile)
    broken = root / "broken.png"
    broken.write_bytes(b"not a png")
    images = [
        hostile,
        broken,
        data / "square" / "square_0000.png",
        data / "triangle" / "triangle_0001.png",
    ]
    out = root / "out"
    args = ["explain", *map(str, images), "--model", "shapes-cnn", "--methods", ",".join(METHODS)]
    args += [
        "--param",
        "lime.n_samples=60",
        "--features",
        "--feature-steps",
        "8",
        "--out",
        str(out),
    ]
    status = main(args)
    return out, status, images


def test_skips_the_unreadable_file_and_writes_the_rest(built):
    out, status, images = built
    results = json.loads((out / "results.json").read_text())
    assert status == 1  # something was skipped
    assert [s["image"] for s in results["skipped"]] == [str(images[1])]
    assert [r["image"] for r in results["images"]] == [
        str(images[0]),
        str(images[2]),
        str(images[3]),
    ]
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temporary files
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "index.html").stat().st_mode & 0o777 == 0o666 & ~umask


def test_every_number_matches_a_fresh_computation(built, shapes_model):
    out, _, _ = built
    results = json.loads((out / "results.json").read_text())
    steps = results["curve_steps"]
    for image in results["images"]:
        x = shapes_model.inputs(image["image"])
        probabilities = shapes_model.predict(x)[0]
        assert image["top5"][0]["class"] == int(probabilities.argmax()) == image["class"]
        for p in image["top5"]:
            assert p["probability"] == pytest.approx(float(probabilities[p["class"]]), abs=1e-6)
        for name in METHODS:
            entry = image["methods"][name]
            params = {"n_samples": 60} if name == "lime" else {}
            e = cl.explain(shapes_model, x, name, progress=False, **params)
            assert entry["target"] == image["class"] and entry["forwards"] == e.forwards
            heat = e.heatmap()
            assert entry["deletion"] == pytest.approx(
                float(deletion(shapes_model, x, heat, steps=steps, progress=False).auc[0]), abs=1e-6
            )
            assert entry["insertion"] == pytest.approx(
                float(insertion(shapes_model, x, heat, steps=steps, progress=False).auc[0]),
                abs=1e-6,
            )
    rows = results["ranking"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["faithfulness"] for r in rows] == sorted(
        (r["faithfulness"] for r in rows), reverse=True
    )
    for row in rows:
        scores = [i["methods"][row["method"]] for i in results["images"]]
        mean_deletion = sum(s["deletion"] for s in scores) / len(scores)
        assert row["deletion"] == pytest.approx(mean_deletion)
        assert row["faithfulness"] == pytest.approx(row["insertion"] - row["deletion"])
    page = (out / "index.html").read_text()
    for row in rows:  # the page shows the same numbers
        assert f"{row['faithfulness']:.3f}" in page and f"{row['insertion']:.3f}" in page


def test_features_name_the_channel_that_contributes_most(built, shapes_model):
    out, _, _ = built
    results = json.loads((out / "results.json").read_text())
    classes = list(dict.fromkeys(i["class"] for i in results["images"]))
    assert [f["class"] for f in results["features"]] == classes
    for entry in results["features"]:
        image = next(i for i in results["images"] if i["class"] == entry["class"])
        contributions = cl.features.channel_contributions(
            shapes_model, image["image"], entry["class"]
        )
        assert entry["channel"] == int(contributions.argmax())
        for key in ("class_model", "patches"):
            with Image.open(out / entry[key]) as picture:
                assert picture.width > 0


def test_user_text_is_escaped_and_nothing_comes_from_the_network(built):
    out, _, _ = built
    page = (out / "index.html").read_text()
    assert "<img src=x onerror" not in page
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &#39;quote&#39;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def test_labels_are_escaped_too(tmp_path):
    document = {
        "model": "<b>model</b>",
        "methods": ["saliency"],
        "curve_steps": 2,
        "seconds": 1.0,
        "skipped": [{"image": "<x>.png", "reason": "<bad>"}],
        "ranking": [],
        "features": [],
        "images": [
            {
                "image": "a.png",
                "input": "a.png",
                "class": 0,
                "label": "<script>alert(1)</script>",
                "probability": 1.0,
                "top5": [{"class": 0, "label": "<script>alert(1)</script>", "probability": 1.0}],
                "methods": {},
            }
        ],
    }
    page = report.render(document)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>model" not in page and "&lt;bad&gt;" in page


def test_report_in_headless_chromium(built, tmp_path):
    """Every picture loads, no console errors, the table sorts, a click enlarges a picture."""
    out, _, _ = built
    executable = chromium_path()
    if executable is None:
        pytest.fail(
            "Chromium is missing: `make test` installs Debian's chromium (apt-get install chromium)"
        )
    results = json.loads((out / "results.json").read_text())
    # per image: the photo, one overlay per method and LIME's superpixel picture
    expected = len(results["images"]) * (1 + len(METHODS) + 1) + 2 * len(results["features"])
    with Chromium(executable) as browser:
        browser.open(out / "index.html")
        loaded = browser.evaluate(
            "Array.from(document.images).filter(i => i.getAttribute('src'))"
            ".map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        )
        assert len(loaded) == expected
        assert all(complete and width > 0 for _, complete, width in loaded), loaded

        def column(index: int) -> list[str]:
            return browser.evaluate(
                "Array.from(document.querySelectorAll('#ranking tbody tr'))"
                f".map(r => r.cells[{index}].dataset.value)"
            )

        def click_header(index: int) -> None:
            browser.evaluate(f"document.querySelectorAll('#ranking th')[{index}].click()")

        ranks = [float(v) for v in column(0)]
        assert ranks == sorted(ranks)
        click_header(4)  # deletion AUC, ascending
        deletion_values = [float(v) for v in column(4)]
        assert deletion_values == sorted(deletion_values)
        click_header(4)  # descending
        assert [float(v) for v in column(4)] == sorted(deletion_values, reverse=True)
        click_header(1)  # method names, alphabetical
        assert column(1) == sorted(METHODS)
        assert (
            browser.evaluate(
                "document.querySelectorAll('#ranking th')[1].getAttribute('aria-sort')"
            )
            == "ascending"
        )

        first = browser.evaluate("document.querySelector('figure img').src")
        browser.evaluate("document.querySelector('figure img').click()")
        assert browser.evaluate("document.getElementById('zoom').open") is True
        assert browser.evaluate("document.querySelector('#zoom img').src") == first
        shots = Path(os.environ.get("CONVLENS_SCREENSHOTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        browser.evaluate("document.getElementById('zoom').close()")
        picture = browser.screenshot(shots / "report.png")
        assert browser.errors() == []
    with Image.open(picture) as shot:
        assert shot.width >= 1000 and shot.height > 1000
        gray = np.asarray(shot.convert("L").resize((64, 64)))
        assert len(np.unique(gray)) > 20  # not a blank page


def test_explain_images_takes_pil_images_and_tensors_without_a_cli(tmp_path, shapes_model):
    pictures = cl.datasets.shapes(2, seed=5).images
    sources = [
        ("first", pictures[0:1]),
        ("second", Image.fromarray((pictures[1].permute(1, 2, 0) * 255).byte().numpy())),
    ]
    document = report.explain_images(shapes_model, sources, ["gradcam"], tmp_path, progress=False)
    assert [i["image"] for i in document["images"]] == ["first", "second"]
    assert torch.isfinite(
        torch.tensor([i["methods"]["gradcam"]["deletion"] for i in document["images"]])
    ).all()
    page = report.write(tmp_path, document)
    assert page.name == "index.html" and (tmp_path / "results.json").exists()
