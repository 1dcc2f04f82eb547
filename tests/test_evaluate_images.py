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
    assert boxes["images_with_boxes"] == 3 and boxes["boxes"] == 4 and boxes["boxes_left"] == 3
    assert boxes["images_all_cropped"] == [] and boxes["protocol"] == "per_class"
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
    owners = [SHAPES.index(labels[i]) for i in range(3)]
    tolerance = 15 * 64 / 224
    for method in METHODS:
        e = cl.explain(model, x, method, progress=False)
        row = next(r for r in document["summary"] if r["method"] == method)
        # per class (Zhang et al. 2016): each image's box against its labelled class's map
        boxed = cl.explain(model, x[:3], method, target=owners, progress=False)
        found = localization(boxed, truth)
        assert row["images"] == 4 and row["images_with_boxes"] == 3 and row["scored"] == 3
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
                (score,) = record["scores"]
                assert score["class"] == owners[i] and score["label"] == labels[i]
                assert score["map_box"] == found.boxes[i].float().tolist()
        # the localisation error from every class's map, the most probable first
        ranked = model.predict(x[:3]).argsort(dim=1, descending=True)
        maps = torch.stack(
            [cl.explain(model, x[:3], method, target=ranked[:, j].tolist(),
                        progress=False).heatmap() for j in range(4)], dim=1
        )  # fmt: skip
        error = localization_error(maps, ranked, truth, [[c] for c in owners], threshold=0.15)
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
    assert (
        "Boxes: 3 box(es) on 3 image(s) after the crop (1 cropped away or outside); "
        "1 image(s) without boxes" in markdown
    )
    assert "Box scores per class, as Zhang et al. 2016" in markdown
    heading = "| method | images | images with boxes | (image, class) pairs | pointing game |"
    assert heading in markdown
    assert sum(line.startswith("| gradcam | 4 | 3 | 3 |") for line in markdown.splitlines()) == 1
    page = (out / "index.html").read_text()
    assert "<th>images with boxes</th>" in page and "Box scores per class" in page
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


# -- which map meets which boxes (Zhang et al. 2016) ---------------------------------------------


@pytest.fixture
def two_images(model, tmp_path):
    """Two copies of one shapes picture; p is the class the model predicts for it, q another."""
    pixels = _pixels(shapes(1, seed=3), 0)
    for name in ("both.png", "wrong.png"):
        Image.fromarray(pixels).save(tmp_path / name)
    p = int(model.predict(model.inputs(tmp_path / "both.png")).argmax())
    sources = [(str(tmp_path / n), tmp_path / n) for n in ("both.png", "wrong.png")]
    return tmp_path, sources, p, (p + 1) % len(SHAPES)


def fixed_maps(monkeypatch):
    """explain's maps replaced: the predicted class's (target None) on the box at (0, 0, 16, 16),
    any other class's at rows 28..36 of the left edge, away from every box; the calls' targets
    are recorded."""
    import dataclasses

    import convlens.api

    real, calls = convlens.api.explain, []

    def explain(model, x, method, target=None, **kwargs):
        calls.append(target)
        e = real(model, x, method, target=target, **kwargs)
        heat = torch.zeros(1, 1, 64, 64)
        if target is None:
            heat[..., 4:12, 4:12] = 1
        else:
            heat[..., 28:36, 0:4] = 1
        return dataclasses.replace(e, attribution=heat)

    monkeypatch.setattr(convlens.api, "explain", explain)
    return calls


def test_boxes_are_scored_per_class_on_each_class_map(model, two_images, monkeypatch):
    """both.png: a box of p (the predicted class) and one of q; wrong.png: p's box labelled q,
    as for a misclassified image. q's map is scored against q's box only: the map of p on
    p's box is no hit for q, and each class is explained once per image."""
    root, sources, p, q = two_images
    (root / "boxes.csv").write_text(
        "image,x0,y0,x1,y1,label\n"
        f"both.png,0,0,16,16,{SHAPES[p]}\n"
        f"both.png,40,40,64,64,{SHAPES[q]}\n"
        f"wrong.png,0,0,16,16,{SHAPES[q]}\n"
    )
    calls = fixed_maps(monkeypatch)
    document = evaluate_images(
        model, sources, ["saliency"], root / "o", boxes=read_boxes(root / "boxes.csv"),
        progress=False, log=lambda _: None,
    )  # fmt: skip
    assert document["boxes"]["protocol"] == "per_class"
    both, wrong = (image["methods"]["saliency"] for image in document["images"])
    assert [(s["class"], s["pointing"], s["energy"]) for s in both["scores"]] == [
        (p, True, 1.0),
        (q, False, 0.0),
    ]
    assert [(s["class"], s["label"], s["pointing"]) for s in wrong["scores"]] == [
        (q, SHAPES[q], False)
    ]
    assert both["shown"]["class"] == p and wrong["shown"] == {"class": q, "label": SHAPES[q]}
    (row,) = document["summary"]
    assert row["images_with_boxes"] == 2 and row["scored"] == 3
    assert row["pointing"] == pytest.approx(1 / 3) and row["energy"] == pytest.approx(1 / 3)
    assert calls == [None, q, None, q]  # q's map serves the box scores and the top-5 error
    assert "(image, class) pairs" in (root / "o" / "evaluation.md").read_text()


def test_unlabelled_boxes_are_scored_class_agnostic_and_say_so(model, two_images, monkeypatch):
    root, sources, _, _ = two_images
    (root / "boxes.csv").write_text(
        "image,x0,y0,x1,y1\nboth.png,0,0,16,16\nboth.png,40,40,64,64\nwrong.png,30,30,40,40\n"
    )
    calls = fixed_maps(monkeypatch)
    said: list[str] = []
    document = evaluate_images(
        model, sources, ["saliency"], root / "o", boxes=read_boxes(root / "boxes.csv"),
        progress=False, log=said.append,
    )  # fmt: skip
    assert document["boxes"]["protocol"] == "class_agnostic"
    both, wrong = (image["methods"]["saliency"] for image in document["images"])
    assert both["scores"] == [
        {"class": None, "label": None, "pointing": True, "energy": 1.0, "iou": 0.25, "hit": False,
         "map_box": [4.0, 4.0, 12.0, 12.0]}
    ]  # fmt: skip
    assert wrong["scores"][0]["pointing"] is False and "shown" not in wrong
    (row,) = document["summary"]
    assert row["scored"] == row["images_with_boxes"] == 2 and row["pointing"] == 0.5
    assert calls == [None, None]
    assert any("class-agnostic" in line for line in said)
    markdown = (root / "o" / "evaluation.md").read_text()
    assert "Box scores are class-agnostic: the predicted class's map" in markdown
    assert "| method | images | images with boxes | pointing game |" in markdown
    assert "Box scores are class-agnostic" in (root / "o" / "index.html").read_text()


def test_an_image_with_every_box_cropped_away_is_not_counted_as_with_boxes(model, tmp_path):
    """A 64 x 96 picture loses 16 pixels each side to the crop: a box inside that margin is
    dropped, and the image has no boxes left to score."""
    pixels = _pixels(shapes(1, seed=3), 0)
    Image.fromarray(pixels).save(tmp_path / "kept.png")
    wide = np.pad(pixels, ((0, 0), (16, 16), (0, 0)), constant_values=128)
    Image.fromarray(wide).save(tmp_path / "cut.png")
    boxes = {"kept.png": [Box(0, 0, 16, 16)], "cut.png": [Box(1, 1, 12, 12)]}
    sources = [(str(tmp_path / n), tmp_path / n) for n in ("kept.png", "cut.png")]
    out = tmp_path / "o"
    document = evaluate_images(
        model, sources, ["gradcam"], out, boxes=boxes, progress=False, log=lambda _: None
    )
    summary = document["boxes"]
    assert summary["images_with_boxes"] == 1 and summary["boxes_left"] == 1
    assert summary["boxes"] == 2 and summary["images_all_cropped"] == [str(tmp_path / "cut.png")]
    (row,) = document["summary"]
    assert row["images"] == 2 and row["images_with_boxes"] == 1
    markdown = (out / "evaluation.md").read_text()
    assert (
        "Boxes: 1 box(es) on 1 image(s) after the crop (1 cropped away or outside; every box "
        "of 1 image(s))" in markdown
    )
    assert "| gradcam | 2 | 1 |" in markdown
    page = (out / "index.html").read_text()
    assert "<th>images</th><th>images with boxes</th>" in page
    assert "1 box(es) on 1 image(s) after the crop" in page


# -- refused before any work: sizes the box file states, an image given twice ---------------------


def _coco(name, width, height):
    return json.dumps({
        "images": [{"id": 1, "file_name": name, "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [1, 1, 10, 10]}],
    })  # fmt: skip


def test_a_picture_of_another_size_than_the_box_file_states_is_refused(model, tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    sources = [("a.png", tmp_path / "a.png")]
    cases = [
        (30, 40, r"image a\.png is 40x30 pixels but the box file gives 30x40 for \./a\.png: "
                 r"probably an EXIF orientation tag.*without EXIF rotation"),
        (80, 60, r"is 40x30 pixels but the box file gives 80x60 .*a resized copy"),
    ]  # fmt: skip
    for width, height, message in cases:
        (tmp_path / "c.json").write_text(_coco("./a.png", width, height))
        with pytest.raises(RequestError, match=message) as caught:
            check_evaluation(model, sources, ["gradcam"], None, read_boxes(tmp_path / "c.json"))
        assert "\n" not in str(caught.value)
    (tmp_path / "c.json").write_text(_coco("a.png", 40, 30))  # the right size
    plan = check_evaluation(model, sources, ["gradcam"], None, read_boxes(tmp_path / "c.json"))
    assert plan.boxes == [[Box(1, 1, 11, 11)]]


def test_the_cli_refuses_a_picture_of_another_size_in_one_line(model, tmp_path, capsys):
    from convlens.cli import main

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    folder = tmp_path / "voc"
    folder.mkdir()
    (folder / "a.xml").write_text(
        "<annotation><filename>a.png</filename><size><width>400</width><height>300</height>"
        "</size><object><name>x</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax>"
        "<ymax>9</ymax></bndbox></object></annotation>"
    )
    out = tmp_path / "o"
    args = ["evaluate", str(tmp_path / "a.png"), "--model", "shapes-cnn", "--boxes", str(folder)]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "400x300" in err and "resized copy" in err, err
    assert not out.exists()


def test_an_image_given_twice_is_refused(model, dataset, tmp_path):
    root = dataset[0]
    twice = [("plain.png", root / "plain.png"), ("./again", root / "." / "plain.png")]
    with pytest.raises(RequestError, match=r"image \./again is given twice \(also as plain\.png\)"):
        check_evaluation(model, twice, ["gradcam"], None, None)
    (tmp_path / "link.png").symlink_to(root / "plain.png")
    linked = [("plain.png", root / "plain.png"), ("link.png", str(tmp_path / "link.png"))]
    with pytest.raises(RequestError, match=r"link\.png is given twice"):
        evaluate_images(model, linked, ["gradcam"], tmp_path / "o", progress=False)
    picture = Image.open(root / "plain.png")  # pictures in memory are not compared
    check_evaluation(model, [("a", picture), ("b", picture)], ["gradcam"], None, None)
