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
from convlens.report.checks import bootstrap_interval

HOSTILE = "<img src=x onerror=alert(1)> & 'quote'"
METHODS = ["gradcam", "saliency", "lime", "integrated_gradients"]


@pytest.fixture(scope="module")
def shapes_model():
    return cl.load_model("shapes-cnn")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A report on the bundled shapes CNN: three images (one with a hostile name), one file
    that is not an image, four methods (one with superpixels, one speckled, two with raw
    gradient pictures), the model randomisation test and the features section."""
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
        "--sanity",
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
    assert sorted(results["sanity"]) == sorted(METHODS)  # --sanity: one record per method
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
    assert [r["rank"] for r in rows] == list(range(1, len(METHODS) + 1))
    assert [r["faithfulness"] for r in rows] == sorted(
        (r["faithfulness"] for r in rows), reverse=True
    )
    for row in rows:  # constant maps (LIME on a saturated prediction) are left out
        made = [i["methods"][row["method"]] for i in results["images"]]
        scores = [s for s in made if not s.get("constant")]
        assert row["constant"] == len(made) - len(scores)
        mean_deletion = sum(s["deletion"] for s in scores) / len(scores)
        assert row["deletion"] == pytest.approx(mean_deletion)
        faithfulness = [s["insertion"] - s["deletion"] for s in scores]
        assert [p["faithfulness"] for p in row["per_image"]] == pytest.approx(faithfulness)
        interval = bootstrap_interval(faithfulness, seed=0)  # None for a single image
        assert row["interval"] == (None if interval is None else pytest.approx(list(interval)))
        assert row["n"] == len(scores)
        assert row["faithfulness"] == pytest.approx(row["insertion"] - row["deletion"])
    page = (out / "index.html").read_text()
    for row in rows:  # the page shows the same numbers
        assert f"{row['faithfulness']:.3f}" in page and f"{row['insertion']:.3f}" in page
        if row["interval"] is not None:
            low, high = row["interval"]
            assert f"{low:.3f} to {high:.3f}" in page
    assert any(row["interval"] is None for row in rows) == ("no interval (1 image)" in page)


def test_features_name_the_channel_that_contributes_most(built, shapes_model):
    out, _, _ = built
    results = json.loads((out / "results.json").read_text())
    classes = list(dict.fromkeys(i["class"] for i in results["images"]))
    assert [f["class"] for f in results["features"]] == classes
    for entry in results["features"]:
        image = next(i for i in results["images"] if i["class"] == entry["class"])
        contributions = cl.features.channel_contributions(
            shapes_model, image["image"], entry["class"], entry["layer"]
        )
        assert entry["channel"] == int(contributions.argmax())
        for key in ("class_model", "dream", "patches"):
            with Image.open(out / entry[key]) as picture:
                assert picture.width > 0


def test_results_hold_numbers_and_large_arrays_in_files(built, shapes_model):
    """No "tensor(...)" text: LIME's segments and samples are in each image's extras file,
    referenced from results.json by file and key, and equal a fresh computation."""
    out, _, _ = built
    text = (out / "results.json").read_text()
    assert "tensor(" not in text
    results = json.loads(text)
    for image in results["images"]:
        info = image["methods"]["lime"]["extras"]["superpixels"][0]
        reference = info["segments"]
        assert reference["npz"] == image["extras"] and reference["shape"] == [64, 64]
        with np.load(out / reference["npz"]) as arrays:
            segments = arrays[reference["key"]]
            samples = arrays[info["samples"]["key"]]
        fresh = cl.explain(shapes_model, image["image"], "lime", n_samples=60, progress=False)
        expected = fresh.extras["superpixels"][0]
        assert np.array_equal(segments, np.asarray(expected["segments"]))
        assert np.array_equal(samples, np.asarray(expected["samples"]))
        assert info["weights"] == pytest.approx(np.asarray(expected["weights"]).tolist())


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
    """Every picture loads, no console errors, the table sorts, a click enlarges a picture;
    every card names its class and has its colour bar and curves, a speckled card switches
    views, and at 700 px nothing overflows the page."""
    out, _, _ = built
    executable = chromium_path()
    if executable is None:
        pytest.fail(
            "Chromium is missing: `make test` installs Debian's chromium (apt-get install chromium)"
        )
    results = json.loads((out / "results.json").read_text())
    cards = [image["methods"][name] for image in results["images"] for name in METHODS]
    # per image: the photo, one overlay per method, the raw pictures of 3-channel maps and
    # LIME's superpixels; per predicted class: class model, DeepDream and top patches
    expected = len(results["images"]) + sum(1 + ("raw" in c) + ("superpixels" in c) for c in cards)
    expected += 3 * len(results["features"])
    shots = Path(os.environ.get("CONVLENS_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
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
                "Array.from(document.querySelectorAll('#ranking > tbody > tr'))"
                f".map(r => r.cells[{index}].dataset.value)"
            )

        def click_header(index: int) -> None:
            browser.evaluate(f"document.querySelectorAll('#ranking > thead th')[{index}].click()")

        ranks = [float(v) for v in column(0)]
        assert ranks == sorted(ranks)
        click_header(6)  # deletion AUC, ascending
        deletion_values = [float(v) for v in column(6)]
        assert deletion_values == sorted(deletion_values)
        click_header(6)  # descending
        assert [float(v) for v in column(6)] == sorted(deletion_values, reverse=True)
        click_header(1)  # method names, alphabetical
        assert column(1) == sorted(METHODS)
        assert (
            browser.evaluate(
                "document.querySelectorAll('#ranking > thead th')[1].getAttribute('aria-sort')"
            )
            == "ascending"
        )
        assert "blur" in browser.evaluate("document.getElementById('ranking-note').innerText")

        # every card: the class it explains, its colour bar with numbers, its two curves
        seen = browser.evaluate(
            """Array.from(document.querySelectorAll('figure.card')).map(card => {
                 const bar = card.querySelector('.legend .cbar');
                 const curve = kind => card.querySelector('svg.curves polyline.' + kind);
                 const box = kind => curve(kind) ? curve(kind).getBoundingClientRect() : null;
                 return {
                   method: card.dataset.method,
                   label: card.querySelector('.explains .class-name').textContent,
                   bar: bar ? getComputedStyle(bar).backgroundImage : '',
                   barWidth: bar ? bar.getBoundingClientRect().width : 0,
                   low: card.querySelector('.legend .low').textContent,
                   high: card.querySelector('.legend .high').textContent,
                   meaning: card.querySelector('.legend .meaning').textContent,
                   note: (card.querySelector('.note') || {}).textContent || '',
                   points: ['deletion', 'insertion'].map(
                     k => curve(k) ? curve(k).points.numberOfItems : 0),
                   widths: ['deletion', 'insertion'].map(k => box(k) ? box(k).width : 0),
                 };
               })"""
        )
        assert [(c["method"], c["label"]) for c in seen] == [
            (name, image["methods"][name]["label"])
            for image in results["images"]
            for name in METHODS
        ]
        for card in seen:
            assert card["bar"].startswith("linear-gradient") and card["barWidth"] > 100, card
            assert card["label"] in card["meaning"] and card["meaning"].startswith("red:"), card
            # the ends differ (an all-negative unsigned map runs from its maximum down)
            assert float(card["low"]) != float(card["high"]) or "constant map" in card["note"]
            assert card["points"] == [results["curve_steps"] + 1] * 2, card
            assert min(card["widths"]) > 100, card

        # a speckled map (integrated gradients) switches to |map| and back
        switch = """(() => {
            const card = document.querySelector('figure.card[data-method="integrated_gradients"]');
            card.querySelectorAll('.views button')[%d].click();
            return [card.querySelector('img.map').getAttribute('src'),
                    card.querySelector('.legend .meaning').textContent,
                    getComputedStyle(card.querySelector('.legend .cbar')).backgroundImage];
          })()"""
        signed = browser.evaluate(switch % 0)
        magnitude = browser.evaluate(switch % 1)
        assert magnitude[0].endswith("_integrated_gradients_abs.png") and "|map|" in magnitude[1]
        assert magnitude[2] != signed[2]  # the sequential colour map, not the diverging one
        assert browser.evaluate(switch % 0) == signed

        first = browser.evaluate("document.querySelector('figure img').src")
        browser.evaluate("document.querySelector('figure img').click()")
        assert browser.evaluate("document.getElementById('zoom').open") is True
        assert browser.evaluate("document.querySelector('#zoom img').src") == first
        browser.evaluate("document.getElementById('zoom').close()")
        picture = browser.screenshot(shots / "report.png")

        # a 700 px window: the page does not scroll sideways; the table scrolls in its box
        browser.set_width(700)
        assert browser.evaluate("window.innerWidth") == 700
        assert browser.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (
            browser.evaluate("document.documentElement.scrollWidth")
        )
        wide = browser.evaluate(
            "Array.from(document.body.querySelectorAll('*'))"
            ".filter(e => !e.closest('.scroll') && e.getBoundingClientRect().right > 701)"
            ".map(e => e.tagName + '.' + e.className)"
        )
        assert wide == []
        browser.screenshot(shots / "report-700.png")
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
