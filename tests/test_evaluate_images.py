"""Evaluating methods on your own images (``report.evaluate_images``): its numbers are those
of the metrics called directly, boxes are mapped and dropped as the preprocessing says, the
ILSVRC localisation error (Zhou et al. 2016) on a case worked by hand, the HTML page escapes
names, and a run without boxes reports the curves only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import convlens as cl
from convlens.boxes import Box, read_boxes
from convlens.checks import RequestError
from convlens.datasets import SHAPES, shapes
from convlens.metrics import (
    deletion,
    energy_pointing_game,
    insertion,
    localization,
    pointing_game,
)
from convlens.metrics.localization import localization_error
from convlens.report.evaluation import (
    check_evaluation,
    check_evaluation_folder,
    draw_boxes,
    evaluate_images,
)

HOSTILE = "<img src=x onerror=alert(1)> & 'q'"
METHODS = ["gradcam", "saliency"]


@pytest.fixture(scope="module")
def model():
    return cl.load_model("shapes-cnn")


def _pixels(data, i):
    return (data.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four shapes images: one with a hostile name, one widened by 16 grey pixels each side
    (the 64 x 64 centre crop then cuts exactly those: its boxes map back by -16 px) with a
    second box in the cut margin, one with no boxes, and a file that is not an image."""
    root = tmp_path_factory.mktemp("evaluate")
    data = shapes(4, seed=11)
    names = [f"{HOSTILE}.png", "wide.png", "plain.png", "nobox.png"]
    rows = ["image,x0,y0,x1,y1,label"]
    labels: list[str] = []
    for i, name in enumerate(names):
        pixels = _pixels(data, i)
        x0, y0, x1, y1 = data.boxes[i].tolist()
        # plain.png's box is labelled with a class the model ranks lower: top-1 is wrong for
        # the class, and top-5 needs the map of that class
        label = SHAPES[(int(data.labels[i]) + (name == "plain.png")) % len(SHAPES)]
        labels.append(label)
        if name == "wide.png":
            pixels = np.pad(pixels, ((0, 0), (16, 16), (0, 0)), constant_values=128)
            rows.append(f"wide.png,{x0 + 16},{y0},{x1 + 16},{y1},{label}")
            rows.append(f"wide.png,1,1,12,12,{label}")  # in the cut margin: dropped
        elif name != "nobox.png":
            rows.append(f'"{name}",{x0},{y0},{x1},{y1},{label}')
        Image.fromarray(pixels).save(root / name)
    (root / "broken.png").write_bytes(b"not a png")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    sources = [(str(root / n), root / n) for n in [*names[:2], "broken.png", *names[2:]]]
    return root, data, sources, labels


@pytest.fixture(scope="module")
def evaluated(model, dataset):
    root, _, sources, _ = dataset
    boxes = read_boxes(root / "boxes.csv")
    said: list[str] = []
    document = evaluate_images(
        model, sources, METHODS, root / "out", boxes=boxes, progress=False, log=said.append
    )
    return document, said


def test_boxes_mapped_dropped_and_missing_are_reported(evaluated, dataset):
    document, said = evaluated
    root, data, _, labels = dataset
    on_disk = json.loads((root / "out" / "evaluation.json").read_text())
    assert on_disk == json.loads(json.dumps(document))  # numbers only: JSON round-trips
    assert [s["image"] for s in document["skipped"]] == [str(root / "broken.png")]
    boxes = document["boxes"]
    assert boxes["images_with_boxes"] == 3 and boxes["boxes"] == 4
    assert boxes["without_boxes"] == [
        {"image": str(root / "nobox.png"), "reason": "not in the box file"}
    ]
    wide = next(image for image in document["images"] if image["image"].endswith("wide.png"))
    assert wide["size"] == [64, 96]
    assert wide["boxes"] == [{"box": data.boxes[1].float().tolist(), "label": labels[1]}]
    assert wide["dropped"] == [
        {"box": [1.0, 1.0, 12.0, 12.0], "label": labels[1], "reason": "cropped away by the "
         "centre crop"}
    ]  # fmt: skip
    assert any("cropped away" in line for line in said)
    assert any("no boxes for" in line and "nobox.png" in line for line in said)
    assert boxes["localization_error"] == {"computed": True, "reason": None, "k": 4}


def test_numbers_agree_with_the_metrics_called_directly(evaluated, dataset, model):
    document, _ = evaluated
    _, data, sources, labels = dataset
    readable = [s for s in sources if not s[0].endswith("broken.png")]
    x = torch.cat([model.inputs(path) for _, path in readable])
    truth = [data.boxes[i][None].float() for i in range(3)]  # the first three have boxes
    tolerance = 15 * 64 / 224
    for method in METHODS:
        e = cl.explain(model, x, method, progress=False)
        row = next(r for r in document["summary"] if r["method"] == method)
        boxed = cl.explain(model, x[:3], method, progress=False)
        found = localization(boxed, truth)
        assert row["images"] == 4 and row["images_with_boxes"] == 3
        assert row["pointing"] == pytest.approx(
            float(pointing_game(boxed, truth, tolerance).double().mean())
        )
        assert row["energy"] == pytest.approx(float(energy_pointing_game(boxed, truth).mean()))
        assert row["iou"] == pytest.approx(float(found.iou.mean()))
        assert row["hit_rate"] == pytest.approx(found.hit_rate)
        assert row["threshold"] == 0.15
        removed = deletion(model, x, e, steps=20, progress=False).auc
        added = insertion(model, x, e, steps=20, progress=False).auc
        assert row["deletion"] == pytest.approx(float(removed.mean()), abs=1e-5)
        assert row["insertion"] == pytest.approx(float(added.mean()), abs=1e-5)
        for i, image in enumerate(document["images"]):
            record = image["methods"][method]
            assert record["target"] == e.targets[i]
            assert record["deletion"] == pytest.approx(float(removed[i]), abs=1e-5)
            if i < 3:
                assert record["map_box"] == found.boxes[i].float().tolist()
        # the localisation error from every class's map, the most probable first
        ranked = model.predict(x[:3]).argsort(dim=1, descending=True)
        maps = torch.stack(
            [cl.explain(model, x[:3], method, target=ranked[:, j].tolist(),
                        progress=False).heatmap() for j in range(4)], dim=1
        )  # fmt: skip
        owners = [[SHAPES.index(labels[i])] for i in range(3)]
        error = localization_error(maps, ranked, truth, owners, threshold=0.15)
        assert row["top1_error"] == pytest.approx(error.top1)
        assert row["top5_error"] == pytest.approx(error.top5)
        for i, image in enumerate(document["images"][:3]):  # each class's IoU, as ranked
            assert image["methods"][method]["class_iou"] == pytest.approx(error.iou[i].tolist())
            assert image["methods"][method]["top5_correct"] == bool(error.correct[i].any())
    # plain.png's labelled class is ranked third: saliency's map of it was computed
    iou = document["images"][2]["methods"]["saliency"]["class_iou"]
    assert iou[:2] == [0.0, 0.0] and iou[2] > 0


def test_markdown_and_html(evaluated, dataset):
    root, _, _, _ = dataset
    out = root / "out"
    markdown = (out / "evaluation.md").read_text()
    assert "Model **shapes-cnn** (input 64x64, crop 1), 4 image(s), 1 skipped" in markdown
    assert "Boxes: 4 on 3 image(s), 1 cropped away or outside; 1 image(s) without boxes" in (
        markdown
    )
    assert "| method | images | pointing game | energy in boxes | box IoU |" in markdown
    assert sum(line.startswith("| gradcam | 4 |") for line in markdown.splitlines()) == 1
    page = (out / "index.html").read_text()
    assert HOSTILE not in page and "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &#39;q&#39;" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    sources = [s for s in page.split('src="')[1:]]
    files = {s.split('"')[0] for s in sources}
    assert len(files) == 4 * (1 + len(METHODS))
    assert all((out / f).is_file() for f in files)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_the_pictures_show_the_boxes():
    picture = Image.new("RGB", (32, 32), (0, 128, 0))
    shown = np.asarray(
        draw_boxes(picture, torch.tensor([[4.0, 4.0, 12.0, 12.0]]), [16, 16, 32, 32])
    )
    assert shown.shape == (224, 224, 3)  # enlarged 7 times
    assert tuple(shown[28, 40]) == (255, 255, 255)  # the box's top edge, at 4 * 7
    assert tuple(shown[27, 40]) == (0, 0, 0)  # its black outline, outside
    assert tuple(shown[50, 50]) == (0, 128, 0)  # inside: the picture
    assert tuple(shown[112, 150]) == (255, 0, 255)  # the map's own box
    assert tuple(np.asarray(draw_boxes(picture, None))[50, 50]) == (0, 128, 0)


def test_without_boxes_only_the_curves(model, dataset, tmp_path):
    _, _, sources, _ = dataset
    document = evaluate_images(model, sources[:2], ["gradcam"], tmp_path / "o", progress=False)
    assert document["boxes"] is None
    (row,) = document["summary"]
    assert set(row) == {"method", "images", "deletion", "insertion", "seconds"}
    assert "pointing" not in document["images"][0]["methods"]["gradcam"]
    markdown = (tmp_path / "o" / "evaluation.md").read_text()
    assert "Boxes: none given" in markdown and "pointing" not in markdown
    assert "deletion AUC" in (tmp_path / "o" / "index.html").read_text()
    again = evaluate_images(model, sources[:1], ["saliency"], tmp_path / "o", progress=False)
    assert again["methods"] == ["saliency"]  # an earlier evaluation is replaced


def test_localization_error_by_hand():
    """Four images, three classes, 16 x 16 maps; CAM's threshold (20% of the maximum)."""
    maps = torch.zeros(4, 3, 16, 16)
    maps[0, 0, 2:8, 2:8] = 1  # image 0: class 2 first, its map on its box: right
    maps[0, 0, 12:16, 12:16] = 0.1  # below 20%: not part of the box
    maps[1, 0, 0:4, 0:4] = 1  # image 1: class 0 first, not its class: top-1 wrong
    maps[1, 1, 8:16, 8:16] = 1  # ... class 1 second, on its box: top-5 right
    maps[1, 1, 0:2, 0:2] = 0.9  # a smaller region: the largest one is boxed
    maps[2, 0, 8:16, 8:16] = 1  # image 2: its class first but the map elsewhere: wrong
    maps[3, 0, 0:16, 0:8] = 1  # image 3: IoU exactly 0.5 with its box: right
    predicted = [[2, 0, 1], [0, 1, 2], [1, 2, 0], [0, 1, 2]]
    boxes = [[[2, 2, 8, 8]], [[8, 8, 16, 16], [0, 0, 16, 16]], [[0, 0, 8, 8]], [[0, 0, 8, 8]]]
    classes = [[2], [1, 0], [1], [0]]  # image 1 holds class 1 and a big class-0 box
    error = localization_error(maps, predicted, boxes, classes)
    assert error.correct.tolist() == [
        [True, False, False],
        [False, True, False],  # class 0's map (0:4) has IoU 1/16 with the 16 x 16 box
        [False, False, False],
        [True, False, False],
    ]
    assert error.iou[1, 0].item() == pytest.approx(16 / 256)
    assert error.iou[3, 0].item() == 0.5
    assert error.top1 == 0.5 and error.top5 == 0.25
    assert error.k == 3 and error.threshold == 0.2
    top1_only = localization_error(maps, predicted, boxes, classes, k=1)
    assert top1_only.top5 == top1_only.top1 == 0.5
    # maps of classes that are not the image's are not needed
    sparse = [[maps[b, j] if predicted[b][j] in classes[b] else None for j in range(3)]
              for b in range(4)]  # fmt: skip
    assert localization_error(sparse, predicted, boxes, classes).correct.equal(error.correct)
    sparse[0][0] = None
    with pytest.raises(RequestError, match="image 0 needs the map of its class 2"):
        localization_error(sparse, predicted, boxes, classes)


def test_check_before_any_forward_pass(model, dataset, tmp_path, monkeypatch):
    _, _, sources, _ = dataset

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass before the request was checked")

    monkeypatch.setattr(model.module, "forward", no_forward)
    with pytest.raises(RequestError, match="unknown method"):
        evaluate_images(model, sources, ["gradcm"], tmp_path / "a", progress=False)
    with pytest.raises(RequestError, match="not selected"):
        check_evaluation(model, sources, ["gradcam"], {"saliency": {}}, None)
    with pytest.raises(RequestError, match="no images given"):
        check_evaluation(model, [], ["gradcam"], None, None)
    foreign = {"a.png": [Box(0, 0, 4, 4, "goldfish")], "b.png": [Box(0, 0, 4, 4, "circel")]}
    plan = check_evaluation(model, [("a.png", None), ("b.png", None)], ["gradcam"], None, foreign)
    assert not plan.labelled
    assert plan.reason == (
        "box labels that are not labels of the model: 'goldfish', 'circel' (close: 'circle')"
    )
    unlabelled = {"a.png": [Box(0, 0, 4, 4)], "c.png": []}
    plan = check_evaluation(
        model, [("x/a.png", None), ("c.png", None)], ["gradcam"], None, unlabelled
    )
    assert plan.boxes == [[Box(0, 0, 4, 4)], None]
    assert plan.without_boxes == [{"image": "c.png", "reason": "no boxes in the box file"}]
    assert plan.reason.startswith("some boxes have no label")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    with pytest.raises(RequestError, match="not a convlens evaluation"):
        check_evaluation_folder(tmp_path / "mine")


def test_a_refusing_method_is_recorded_and_the_rest_go_on(model, dataset, tmp_path, monkeypatch):
    import convlens.api

    _, _, sources, _ = dataset
    real = convlens.api.explain
    calls = {"saliency": 0}

    def explain(model, x, method, **kwargs):
        if method == "saliency":
            calls["saliency"] += 1
            if calls["saliency"] == 2:
                raise RequestError("too few superpixels")
        return real(model, x, method, **kwargs)

    monkeypatch.setattr(convlens.api, "explain", explain)
    boxes = read_boxes(dataset[0] / "boxes.csv")
    document = evaluate_images(
        model, sources[:2], METHODS, tmp_path / "r", boxes=boxes, progress=False, log=print
    )
    assert document["refused"] == [
        {"image": sources[1][0], "method": "saliency", "reason": "too few superpixels"}
    ]
    rows = {row["method"]: row for row in document["summary"]}
    assert rows["saliency"]["images"] == 1 and rows["gradcam"]["images"] == 2
    assert "too few superpixels" in (tmp_path / "r" / "index.html").read_text()


# -- the command line: convlens evaluate IMAGE... [--boxes FILE] ----------------------------------


def test_the_cli_evaluates_images_with_boxes_and_exits_1_for_a_skipped_image(dataset, tmp_path):
    from convlens.cli import main

    root, _, sources, _ = dataset
    out = tmp_path / "evaluation"
    images = [str(path) for _, path in sources]
    args = ["evaluate", *images, "--model", "shapes-cnn", "--boxes", str(root / "boxes.csv")]
    assert main([*args, "--methods", "gradcam", "--out", str(out)]) == 1  # broken.png skipped
    document = json.loads((out / "evaluation.json").read_text())
    assert [s["image"] for s in document["skipped"]] == [str(root / "broken.png")]
    assert document["summary"][0]["method"] == "gradcam"
    assert document["summary"][0]["pointing"] is not None
    assert (out / "evaluation.md").is_file() and (out / "index.html").is_file()


def test_the_cli_without_boxes_reports_the_curves(dataset, tmp_path):
    from convlens.cli import main

    _, _, sources, _ = dataset
    out = tmp_path / "curves"
    args = ["evaluate", str(sources[0][1]), "--model", "shapes-cnn", "--methods", "saliency"]
    assert main([*args, "--out", str(out)]) == 0
    row = json.loads((out / "evaluation.json").read_text())["summary"][0]
    assert "pointing" not in row and 0 <= row["deletion"] <= 1 and 0 <= row["insertion"] <= 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shapes", "4"], "give image files or --shapes N, not both"),
        (["--boxes", "{root}/missing.csv"], "missing.csv"),
        (["--boxes", "{root}/bad.csv"], "bad.csv"),
        (["--methods", "gradcam", "--param", "steps=3"], "no selected method takes"),
    ],
)
def test_the_cli_refuses_a_bad_evaluation_in_one_line_and_writes_nothing(
    dataset, tmp_path, capsys, extra, message
):
    from convlens.cli import main

    root, _, sources, _ = dataset
    (root / "bad.csv").write_text("image,x0,y0,x1,y1\nplain.png,1,2,x,4\n")
    out = tmp_path / "refused"
    args = ["evaluate", str(sources[0][1]), "--model", "shapes-cnn", "--out", str(out)]
    assert main([*args, *(e.format(root=root) for e in extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_boxes_go_with_images(capsys, tmp_path):
    from convlens.cli import main

    assert main(["evaluate", "--boxes", "b.csv", "--out", str(tmp_path / "x")]) == 2
    assert "--boxes goes with image files" in capsys.readouterr().err
