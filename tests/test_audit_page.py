"""The audit's page ``index.html`` (issue 19): written by ``convlens.audit.run`` and the command,
escaped, offline, its numbers those of ``results.parquet``; it loads in a headless Chromium;
and on the Clever-Hans data it shows the shortcut: a SpRAy cluster of the tagged class whose
mean map sits on the tag."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import Chromium, chromium_path
from PIL import Image

import convlens as cl
from convlens.audit.page import EXAMPLES, evidence_window, write_page
from convlens.checks import RequestError
from convlens.cli import main
from convlens.datasets import SHAPES, clever_hans, shapes_folder, tag_box

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

HOSTILE = "bad<script>alert(1).png"  # an unreadable image whose name is markup


class Elements(HTMLParser):
    """Every start tag of a page: (tag, attributes), attribute values unescaped."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, Any]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))

    def having(self, tag: str, attribute: str) -> list[dict[str, Any]]:
        return [a for t, a in self.found if t == tag and attribute in a]


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An audit of 15 shapes (a circle filed as a square: one mistake) and one unreadable
    file, SpRAy on Grad-CAM, the page written by ``run``."""
    root = tmp_path_factory.mktemp("page")
    data = shapes_folder(root / "data", 5, seed=4)
    (data / "circle" / "circle_0000.png").rename(data / "square" / "circle_0000.png")
    (data / "square" / HOSTILE).write_bytes(b"not a picture")
    out = root / "out"
    methods = ["gradcam", "saliency"]
    cl.audit.run("shapes-cnn", data, methods, out, steps=5, spray="gradcam", progress=False)
    return out


def test_the_page_is_written_escaped_offline_and_counts_what_the_results_hold(audited):
    page = (audited / "index.html").read_text()
    rows = pd.read_parquet(audited / "results.parquet")
    # escaped: the hostile name shows as text, never as a tag; the page has no script at all
    assert "<script" not in page and html.escape(HOSTILE) in page
    # offline: every picture inline, no address on the network
    elements = Elements(page)
    sources = [a["src"] for a in elements.having("img", "src")]
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    links = [a.get("href") or a.get("src") for _, a in elements.found]
    assert not [v for v in links if v and re.match(r"\s*(https?:)?//", v)]
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page)
    # the confusion matrix: each cell the count pandas finds (one row per image)
    images = rows[rows["method"] == "gradcam"].dropna(subset=["label", "predicted_label"])
    expected = pd.crosstab(images["label"], images["predicted_label"])
    cells = elements.having("td", "data-count")
    assert cells and sum(int(c["data-count"]) for c in cells) == len(images) == 15
    for cell in cells:
        t, p = cell["data-true"], cell["data-predicted"]
        known = t in expected.index and p in expected.columns
        assert int(cell["data-count"]) == (int(expected.loc[t, p]) if known else 0), cell
    assert (expected.loc["square", "circle"], expected.loc["circle", "square"]) == (1, 0)
    overall = float(re.search(r'id="overall-accuracy" data-value="([^"]+)"', page).group(1))
    assert overall == pytest.approx(float((images["label"] == images["predicted_label"]).mean()))
    # the ranking: each method's mean faithfulness over every image, its interval around it
    ranked = {
        a["data-method"]: float(a["data-faithfulness"])
        for a in elements.having("tr", "data-method")
    }
    scored = rows.dropna(subset=["deletion_auc"])
    truth = (scored["insertion_auc"] - scored["deletion_auc"]).groupby(scored["method"]).mean()
    assert ranked == pytest.approx(truth.to_dict())
    assert list(ranked) == list(truth.sort_values(ascending=False).index)
    # the mistake is the first worst case, named with its true and predicted class
    wrong = Elements(page[page.index('id="misclassified"') :]).having("figure", "data-image")
    assert wrong[0]["data-image"] == "square/circle_0000.png"
    # the errors: the unreadable file's rows, counted and shown
    count = int(re.search(r'id="error-count" data-count="(\d+)"', page).group(1))
    assert count == int(rows["error"].notna().sum()) == 2
    assert page.count(f"square/{html.escape(HOSTILE)}</td>") == 2
    # strategies: each cluster's size that of the cluster column, few examples each
    clusters = elements.having("figure", "data-cluster")
    gradcam = rows[(rows["method"] == "gradcam") & (rows["cluster"] >= 0)]
    sizes = gradcam.groupby(["target_label", "cluster"]).size().to_dict()
    assert {
        (c["data-class"], int(c["data-cluster"])): int(c["data-size"]) for c in clusters
    } == sizes
    assert page.count('class="case"') <= EXAMPLES * len(clusters) + 16


def test_the_command_writes_the_page_and_run_refuses_a_spray_method_it_does_not_run(tmp_path):
    data = shapes_folder(tmp_path / "data", 2, seed=1)
    out = tmp_path / "out"
    args = ["audit", str(data), "--model", "shapes-cnn", "--methods", "saliency"]
    assert main([*args, "--curve-steps", "0", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "SpRAy" in page and 'id="ranking"' not in page  # no AUC: no ranking table
    (out / "index.html").unlink()
    assert write_page(out) == out / "index.html" and (out / "index.html").read_text() == page
    with pytest.raises(RequestError, match="spray='gradcam': not one of the methods"):
        cl.audit.run("shapes-cnn", data, ["saliency"], tmp_path / "other", spray="gradcam")
    with pytest.raises(RequestError, match=r"no results\.parquet"):
        write_page(tmp_path / "data")


def test_evidence_window_finds_where_a_map_concentrates():
    heat = np.zeros((32, 32))
    heat[1:4, 1:4] = 1.0  # the tag's cells
    heat[20, 20] = -5.0  # evidence against: not counted
    found = evidence_window(heat)
    assert found["share"] == 1.0 and found["where"] == "top left" and found["concentrated"]
    x0, y0, x1, y1 = found["box"]
    assert x0 <= 1 / 32 and y0 <= 1 / 32 and x1 >= 4 / 32 and y1 >= 4 / 32 and x1 - x0 == 0.25
    even = evidence_window(np.ones((32, 32)))
    assert even["share"] == pytest.approx(1 / 16) and not even["concentrated"]
    heat = np.zeros((32, 32))
    heat[24:30, 13:17] = 2.0
    heat[0, 0] = 1.0
    found = evidence_window(heat)
    assert found["share"] == pytest.approx(48 / 49) and found["where"] == "bottom"
    assert evidence_window(-np.ones((8, 8)))["share"] == 0.0


def test_the_page_in_headless_chromium(audited):
    executable = chromium_path()
    if executable is None:
        pytest.skip("Chromium is missing (apt-get install chromium)")
    with Chromium(executable) as browser:
        browser.open(audited / "index.html")
        assert browser.errors() == []
        ids = ["accuracy-section", "confusion", "strategies-section", "ranking", "worst-section"]
        ids += ["errors-section", "error-rows"]
        present = browser.evaluate(f"{ids!r}.map(i => !!document.getElementById(i))")
        assert present == [True] * len(ids)
        loaded = browser.evaluate(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert len(loaded) > 10 and all(c and w > 0 and h > 0 for c, w, h in loaded), loaded
        decoded = browser.evaluate(
            "Promise.all(Array.from(document.images).map(i => i.decode().then(() => true, "
            "() => false)))"
        )
        assert decoded == [True] * len(loaded)
        width = browser.evaluate("document.documentElement.scrollWidth")
        assert width <= 1400


def test_the_page_shows_the_clever_hans_shortcut(tmp_path):
    """40 circles (about half tagged) and 8 other shapes, audited with Grad-CAM on the model
    that answers "circle" from the tag: a SpRAy cluster of "circle" has its mean map on the tag
    (read from the page's cluster data, the share computed here), it holds tagged circles
    only, and the untagged circles' clusters lie elsewhere."""
    data = clever_hans(240, seed=21)
    circle = SHAPES.index("circle")
    kept = [i for i in range(240) if int(data.labels[i]) == circle][:40]
    kept += [i for i in range(240) if int(data.labels[i]) != circle][:8]
    for i in kept:
        folder = tmp_path / "data" / SHAPES[int(data.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (data.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        name = "tagged" if bool(data.tagged[i]) else "plain"
        Image.fromarray(pixels).save(folder / f"{name}_{i:04d}.png")
    model = cl.load_model("clever-hans-cnn")
    out = tmp_path / "out"
    cl.audit.run(model, tmp_path / "data", ["gradcam"], out, steps=0, spray="gradcam")
    page = (out / "index.html").read_text()
    clusters = [c for c in Elements(page).having("figure", "data-cluster")]
    circles = [c for c in clusters if c["data-class"] == "circle"]
    assert len(circles) >= 2
    x0, y0, x1, y1 = tag_box(64)
    rows = pd.read_parquet(out / "results.parquet")
    rows = rows[rows["target_label"] == "circle"]
    tagged = rows["image"].str.contains("tagged")
    on_tag, elsewhere = [], []
    for cluster in circles:
        side = int(cluster["data-side"])
        mean = np.array(cluster["data-mean"].split(), dtype=float).reshape(side, side)
        positive = np.clip(mean, 0, None)
        scale = side / 64
        box = positive[round(y0 * scale) : round(y1 * scale), round(x0 * scale) : round(x1 * scale)]
        share, area = box.sum() / positive.sum(), box.size / positive.size  # area: 9/1024
        members = rows["cluster"] == int(cluster["data-cluster"])
        assert int(cluster["data-size"]) == int(members.sum())
        # measured: 13% of the tagged circles' clusters' mean Grad-CAM in the tag's 0.9% of
        # the image (Grad-CAM's coarse layer spreads it around the tag), 0-0.2% for the others
        if share > 10 * area:
            on_tag.append(cluster)
            assert tagged[members].all()  # a cluster on the tag holds tagged circles only
            # the page says so in words, from its own window
            wx0, wy0, _, _ = (float(v) for v in cluster["data-window"].split())
            assert wx0 <= x0 / 64 and wy0 <= y0 / 64 and float(cluster["data-share"]) > 0.5
            assert "hot" in cluster["class"].split()
        else:
            elsewhere.append(cluster)
            assert share < 2 * area and "hot" not in cluster["class"].split()
    assert on_tag and elsewhere
    found = sum(int(c["data-size"]) for c in on_tag)
    assert found >= 0.8 * int(tagged.sum())  # the tagged circles are found, most of them
    assert "evidence (the positive part of the mean map) lies in\nthe top left square" in page


def test_a_list_of_files_is_named_on_the_page(tmp_path):
    folder = shapes_folder(tmp_path / "data", 1, size=64, seed=3)
    files = sorted(str(f) for f in folder.rglob("*.png"))[:2]
    out = tmp_path / "out"
    cl.audit.run("shapes-cnn", files, ["saliency"], out, steps=0, progress=False)
    assert "data <b>a list of 2 image files</b>" in (out / "index.html").read_text()
