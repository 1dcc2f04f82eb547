"""Ground-truth boxes: CSV, COCO and Pascal VOC files read with their conventions, every
malformed input refused in one line naming the place, images matched by path or name, and
boxes mapped into model-input pixels exactly as ``Model.preprocess`` moves the pixels."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convlens as cl
from convlens.boxes import Box, image_key, image_size, map_boxes, match_image, read_boxes
from convlens.checks import RequestError
from convlens.model import as_model


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# -- CSV ------------------------------------------------------------------------------------------


def test_csv_with_and_without_labels(tmp_path):
    labelled = write(
        tmp_path / "b.csv",
        "\ufeffimage,x0,y0,x1,y1,label\n"
        "cat.jpg,10,20,200,180,tabby cat\n"
        "\n"
        "cat.jpg, 1.5 ,2,3,4,\n"
        '"photos/a, b.png",0,0,5,6,dog\n',
    )
    assert read_boxes(labelled) == {
        "cat.jpg": [Box(10, 20, 200, 180, "tabby cat"), Box(1.5, 2, 3, 4, None)],
        "photos/a, b.png": [Box(0, 0, 5, 6, "dog")],
    }
    plain = write(tmp_path / "c.csv", "x1,y1,image,x0,y0\n7,8,a.png,1,2\n")  # any column order
    assert read_boxes(plain) == {"a.png": [Box(1, 2, 7, 8, None)]}
    assert read_boxes(plain).sizes == {}  # a CSV file states no sizes


def test_csv_rows_of_one_image_spelled_two_ways_are_merged(tmp_path):
    path = write(
        tmp_path / "b.csv",
        "image,x0,y0,x1,y1\n./sq.png,0,0,5,5\nsq.png,1,1,6,6\n"
        "d\\x.png,0,0,2,2\nd/x.png,1,1,3,3\n./d/./x.png,2,2,4,4\n",
    )
    boxes = read_boxes(path)
    assert boxes == {
        "./sq.png": [Box(0, 0, 5, 5), Box(1, 1, 6, 6)],
        "d\\x.png": [Box(0, 0, 2, 2), Box(1, 1, 3, 3), Box(2, 2, 4, 4)],
    }
    assert match_image(boxes, "sq.png") == "./sq.png" and match_image(boxes, "d/x.png") == (
        "d\\x.png"
    )
    assert image_key("./d\\x.png") == image_key("d/x.png") == "d/x.png"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.png,1,2,3,4\n", "b.csv: line 1: the first line must be the header image,x0,y0,x1,y1"),
        ("image,x0,y0,x1\na.png,1,2,3\n", "line 1: .* missing column\\(s\\) y1"),
        ("image,x0,y0,x1,y1,lable\n", "line 1: unknown column\\(s\\) 'lable'"),
        ("image,x0,y0,x1,y1\na.png,1,2,3,4\nb.png,one,2,3,4\n", "line 3: x0 is not a number"),
        ("image,x0,y0,x1,y1\na.png,1,2,3,nan\n", "line 2: y1 must be a finite number"),
        (
            "image,x0,y0,x1,y1\na.png,5,2,3,4\n",
            r"line 2: x1 \(3\) must be greater than x0 \(5\)",
        ),
        (
            "image,x0,y0,x1,y1\na.png,1,4,3,4\n",
            r"line 2: y1 \(4\) must be greater than y0 \(4\)",
        ),
        ("image,x0,y0,x1,y1\na.png,1,2,3\n", "line 2: 4 fields, the header has 5"),
        ("image,x0,y0,x1,y1\n,1,2,3,4\n", "line 2: the image name is empty"),
        ("image,x0,y0,x1,y1\n", "has a header but no boxes"),
        ("", "is empty; a CSV file needs the header"),
    ],
)
def test_csv_errors_name_the_line(tmp_path, text, message):
    path = write(tmp_path / "b.csv", text)
    with pytest.raises(RequestError, match=message) as caught:
        read_boxes(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


# -- COCO -----------------------------------------------------------------------------------------

COCO = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
        {"id": 2, "file_name": "val/b.jpg", "width": 50, "height": 50},
        {"id": 3, "file_name": "empty.jpg"},
    ],
    "annotations": [
        {"id": 10, "image_id": 1, "bbox": [10, 20, 30.5, 40], "category_id": 7},
        {"id": 11, "image_id": 2, "bbox": [0, 0, 5, 5], "category_id": 8, "iscrowd": 1},
        {"id": 12, "image_id": 1, "bbox": [1, 1, 2, 2], "category_id": 8},
    ],
    "categories": [{"id": 7, "name": "goldfish"}, {"id": 8, "name": "tench"}],
}


def test_coco(tmp_path):
    path = write(tmp_path / "instances.json", json.dumps(COCO))
    assert read_boxes(path) == {
        "a.jpg": [Box(10, 20, 40.5, 60, "goldfish"), Box(1, 1, 3, 3, "tench")],
        "val/b.jpg": [Box(0, 0, 5, 5, "tench")],  # crowd regions are kept
        "empty.jpg": [],  # an image without annotations: listed, with no boxes
    }
    assert read_boxes(path).sizes == {"a.jpg": (80, 100), "val/b.jpg": (50, 50)}  # (h, w)
    no_categories = {k: v for k, v in COCO.items() if k != "categories"}
    path = write(tmp_path / "plain.json", json.dumps(no_categories))
    assert read_boxes(path)["a.jpg"][0] == Box(10, 20, 40.5, 60, None)


def test_coco_sizes_and_images_spelled_two_ways(tmp_path):
    data = {
        "images": [
            {"id": 1, "file_name": "./a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "a.jpg"},  # the same image, its size not stated again
            {"id": 3, "file_name": "b.jpg", "width": 0, "height": 0},  # 0: unknown
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [0, 0, 5, 5]},
            {"id": 2, "image_id": 2, "bbox": [1, 1, 5, 5]},
        ],
    }
    boxes = read_boxes(write(tmp_path / "c.json", json.dumps(data)))
    assert boxes == {"./a.jpg": [Box(0, 0, 5, 5), Box(1, 1, 6, 6)], "b.jpg": []}
    assert boxes.sizes == {"./a.jpg": (80, 100)}
    data["images"][1] |= {"width": 80, "height": 100}
    with pytest.raises(RequestError, match=r"images\[1\] \(id 2\): image 'a\.jpg' is 80x100 here "
                       r"but 100x80 earlier in the file"):  # fmt: skip
        read_boxes(write(tmp_path / "c.json", json.dumps(data)))
    for width, shown in ((-3, "-3"), (12.5, "12.5"), ("wide", "'wide'")):
        data["images"][1] |= {"width": width}
        with pytest.raises(RequestError, match=rf"images\[1\] \(id 2\): width.*{re.escape(shown)}"):
            read_boxes(write(tmp_path / "c.json", json.dumps(data)))


def _coco_with(change):
    data = json.loads(json.dumps(COCO))
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"images": [1,}', "c.json: malformed JSON: .*line 1, column 15"),
        ('{"images": []}', "needs 'images' and 'annotations' lists"),
        (
            _coco_with(lambda d: d["annotations"][1].update(image_id=9)),
            "annotations\\[1\\] \\(id 11\\): image_id 9 is not among the images",
        ),
        (
            _coco_with(lambda d: d["annotations"][1].update(image_id=[1])),
            r"annotations\[1\] \(id 11\): image_id \[1\] is not among the images",
        ),
        (
            _coco_with(lambda d: d["annotations"][0].update(bbox=[1, 2, 0, 4])),
            "annotations\\[0\\] \\(id 10\\): the bbox width must be positive, not 0",
        ),
        (
            _coco_with(lambda d: d["annotations"][2].update(bbox=[1, 2, "x", 4])),
            "annotations\\[2\\] \\(id 12\\): width is not a number",
        ),
        (
            _coco_with(lambda d: d["annotations"][0].pop("bbox")),
            "annotations\\[0\\] \\(id 10\\): 'bbox' must be \\[x, y, width, height\\]",
        ),
        (
            _coco_with(lambda d: d["annotations"][0].update(category_id=99)),
            "category_id 99 is not in 'categories'",
        ),
        (_coco_with(lambda d: d["images"][1].pop("file_name")), "images\\[1\\] \\(id 2\\)"),
    ],
)
def test_coco_errors_name_the_annotation(tmp_path, text, message):
    path = write(tmp_path / "c.json", text)
    with pytest.raises(RequestError, match=message) as caught:
        read_boxes(path)
    assert "\n" not in str(caught.value)


# -- Pascal VOC ----------------------------------------------------------------------------------


def voc(filename, *objects):
    parts = [f"<annotation><filename>{filename}</filename><size><width>99</width></size>"]
    for name, box in objects:
        coords = "".join(
            f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
        )
        parts.append(
            f"<object><name>{name}</name><difficult>1</difficult><bndbox>{coords}</bndbox>"
            "<part><name>head</name><bndbox><xmin>0</xmin></bndbox></part></object>"
        )
    return "".join(parts) + "</annotation>"


def test_voc_folder_is_one_based_inclusive(tmp_path):
    folder = tmp_path / "Annotations"
    folder.mkdir()
    write(folder / "1.xml", voc("1.jpg", ("dog", (1, 1, 10, 20)), ("cat", (5, 6, 5, 6))))
    write(folder / "2.xml", voc("ILSVRC2012_val_00000002"))
    write(folder / "notes.txt", "not an annotation")
    # pixels 1..10 (1-based, inclusive) are [0, 10) from 0; a one-pixel box is one wide
    assert read_boxes(folder) == {
        "1.jpg": [Box(0, 0, 10, 20, "dog"), Box(4, 5, 5, 6, "cat")],
        "ILSVRC2012_val_00000002": [],
    }
    assert read_boxes(folder / "1.xml") == {"1.jpg": read_boxes(folder)["1.jpg"]}
    assert read_boxes(folder).sizes == {}  # <size> without a <height>: not checked


def test_voc_sizes(tmp_path):
    size = "<size><width>{}</width><height>{}</height><depth>3</depth></size>"
    write(tmp_path / "a.xml", f"<annotation><filename>a.jpg</filename>{size.format(64, 48)}"
                              "</annotation>")  # fmt: skip
    write(tmp_path / "b.xml", f"<annotation><filename>b.jpg</filename>{size.format(0, 0)}"
                              "</annotation>")  # fmt: skip
    assert read_boxes(tmp_path).sizes == {"a.jpg": (48, 64)}
    write(tmp_path / "b.xml", f"<annotation><filename>b.jpg</filename>{size.format(9, 'x')}"
                              "</annotation>")  # fmt: skip
    with pytest.raises(RequestError, match=r"b\.xml: <height> is not a number: 'x'"):
        read_boxes(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<annotation><filename>a.jpg</filename>", "a.xml: malformed XML: .*line 1"),
        ("<root/>", "a.xml: not a Pascal VOC file \\(its root is <root>\\)"),
        ("<annotation><object/></annotation>", "a.xml: no <filename>"),
        (voc("a.jpg", ("dog", (5, 1, 4, 3))), "object 1: xmax \\(4\\) must be greater than xmin"),
        (voc("a.jpg", ("dog", (1, 1, 4, "big"))), "object 1: <ymax> is not a number: 'big'"),
        (
            "<annotation><filename>a.jpg</filename><object><name>x</name></object></annotation>",
            "a.xml: object 1 has no <bndbox>",
        ),
        (
            "<annotation><filename>a.jpg</filename><object><bndbox><xmin>1</xmin></bndbox>"
            "</object></annotation>",
            "object 1: <bndbox> has no <ymin>",
        ),
    ],
)
def test_voc_errors_name_the_file_and_object(tmp_path, text, message):
    folder = tmp_path / "voc"
    folder.mkdir()
    write(folder / "a.xml", text)
    with pytest.raises(RequestError, match=message) as caught:
        read_boxes(folder)
    assert "\n" not in str(caught.value)


def test_voc_refuses_two_files_for_one_image_and_an_empty_folder(tmp_path):
    write(tmp_path / "a.xml", voc("x.jpg", ("dog", (1, 1, 2, 2))))
    write(tmp_path / "b.xml", voc("x.jpg", ("dog", (1, 1, 2, 2))))
    with pytest.raises(RequestError, match=r"b\.xml: image 'x\.jpg' is also described by .*a\.xml"):
        read_boxes(tmp_path)
    write(tmp_path / "b.xml", voc("./x.jpg", ("dog", (1, 1, 2, 2))))  # the same image
    with pytest.raises(RequestError, match=r"b\.xml: image '\./x\.jpg' is also described by"):
        read_boxes(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RequestError, match=r"holds no \.xml files"):
        read_boxes(tmp_path / "empty")


def test_unknown_or_missing_files(tmp_path):
    with pytest.raises(RequestError, match="box file not found"):
        read_boxes(tmp_path / "none.csv")
    with pytest.raises(RequestError, match=r"give boxes as a \.csv file"):
        read_boxes(write(tmp_path / "boxes.yaml", "a: 1"))


# -- matching -------------------------------------------------------------------------------------


def test_images_match_by_path_then_file_name_then_stem():
    boxes = {"photos/cat.jpg": [], "dog.png": [], "ILSVRC2012_val_00000001": [], "a/x.png": []}
    boxes |= {"b/x.png": []}
    assert match_image(boxes, "photos/cat.jpg") == "photos/cat.jpg"
    assert match_image(boxes, "./photos/cat.jpg") == "photos/cat.jpg"
    assert match_image(boxes, "/elsewhere/cat.jpg") == "photos/cat.jpg"
    assert match_image(boxes, "data\\dog.png") == "dog.png"
    assert match_image(boxes, "val/ILSVRC2012_val_00000001.JPEG") == "ILSVRC2012_val_00000001"
    assert match_image(boxes, "a/x.png") == "a/x.png"
    assert match_image(boxes, "bird.png") is None
    with pytest.raises(RequestError, match="matches several images of the box file"):
        match_image(boxes, "c/x.png")
    # a mapping built by hand with one image under two spellings: refused, not half-read
    twice = {"./sq.png": [Box(0, 0, 1, 1)], "sq.png": [Box(1, 1, 2, 2)]}
    with pytest.raises(RequestError, match=r"sq\.png has boxes under several spellings"):
        match_image(twice, "sq.png")


def test_a_targets_file_matches_paths_as_box_files_do(tmp_path):
    from convlens.cli.requests import UsageError, read_targets_file

    table = write(tmp_path / "t.csv", "image,target\n./a/c.png,1\nd\\e.png,2\n")
    names = ["a/c.png", "b/c.png", "./d/e.png"]
    assert read_targets_file(str(table), names) == {"a/c.png": (2, 1), "./d/e.png": (3, 2)}
    write(table, "image,target\n./c.png,1\n")
    assert read_targets_file(str(table), ["c.png"]) == {"c.png": (2, 1)}
    write(table, "image,target\nc.png,1\n./c.png,2\n")
    with pytest.raises(UsageError, match=r"line 3: '\./c\.png' already has a target \(line 2\)"):
        read_targets_file(str(table), ["c.png"])
    with pytest.raises(UsageError, match=r"'c\.png' is the path of 2 given images"):
        read_targets_file(str(table), ["c.png", "./c.png"])


# -- mapping through the preprocessing -----------------------------------------------------------


def plain_model(input_size, crop):
    """A model whose preprocessing only resizes and crops (no normalisation)."""
    return cl.wrap(nn.Identity(), input_size=input_size, mean=(0, 0, 0), std=(1, 1, 1), crop=crop)


def painted_extent(model, picture):
    """The box of the dark pixels of the preprocessed picture, or None."""
    x = model.preprocess(picture)[0, 0]
    rows, cols = torch.nonzero(x < 0.5, as_tuple=True)
    if len(rows) == 0:
        return None
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def paint(height, width, box):
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 0
    return Image.fromarray(pixels)


CASES = [  # (picture height, width), model input (H, W), crop, boxes (x0, y0, x1, y1)
    ((120, 200), (64, 64), 0.875, [(80, 30, 130, 90), (0, 10, 70, 50), (150, 60, 199, 119)]),
    ((200, 120), (64, 64), 0.875, [(20, 80, 100, 150), (10, 0, 60, 40)]),
    ((50, 40), (64, 64), 1.0, [(5, 7, 30, 44), (0, 0, 40, 9)]),
    ((90, 160), (48, 80), 0.9, [(20, 20, 140, 70), (3, 30, 17, 60)]),
    ((77, 131), (32, 48), 0.6, [(40, 25, 90, 50), (0, 0, 30, 77)]),
    ((800, 1200), (64, 64), 0.875, [(400, 200, 800, 600)]),  # decoded reduced (reduce)
]


@pytest.mark.parametrize(("picture", "size", "crop", "given"), CASES)
def test_mapped_boxes_match_the_painted_pixels(picture, size, crop, given):
    model = plain_model(size, crop)
    boxes = [Box(*map(float, box)) for box in given]
    mapped, dropped = map_boxes(model, boxes, picture)
    gone = {d.index for d in dropped}
    kept = [i for i in range(len(boxes)) if i not in gone]
    assert len(mapped) == len(kept)
    for i, row in zip(kept, mapped.tolist(), strict=True):
        extent = painted_extent(model, paint(*picture, given[i]))
        assert extent is not None
        assert np.abs(np.array(row) - np.array(extent)).max() <= 0.6, (given[i], row, extent)
    for d in dropped:  # cropped away: not a pixel of it reaches the input
        assert painted_extent(model, paint(*picture, given[d.index])) is None
        assert d.reason == "cropped away by the centre crop"


def test_the_crop_clips_and_drops_boxes():
    # 100 x 200 picture, 64 x 64 input, crop 1: scaled by 0.64 to 64 x 128, 32 pixels cut left
    model = plain_model((64, 64), 1.0)
    boxes = [
        Box(50, 0, 100, 100, "cut"),  # 50..100 -> 32..64 -> 0..32 after the crop
        Box(0, 10, 40, 20, "gone"),  # 0..40 -> 0..25.6, all left of the crop
        Box(-30, -5, 125, 50, "beyond"),  # beyond the picture: clipped to it first
        Box(300, 0, 310, 5, "outside"),
    ]
    mapped, dropped = map_boxes(model, boxes, (100, 200))
    assert np.allclose(mapped.numpy(), [[0, 0, 32, 64], [0, 0, 48, 32]], atol=1e-5)
    assert [(d.index, d.box.label, d.reason) for d in dropped] == [
        (1, "gone", "cropped away by the centre crop"),
        (3, "outside", "outside the 200x100 picture"),
    ]
    empty, none = map_boxes(model, [], (100, 200))
    assert empty.shape == (0, 4) and none == []


def test_identity_preprocessing_maps_exactly():
    model = cl.load_model("shapes-cnn")  # 64 x 64, crop 1
    mapped, dropped = map_boxes(model, [Box(3, 4, 20, 33)], (64, 64))
    assert mapped.tolist() == [[3, 4, 20, 33]] and dropped == []


def test_a_bare_model_has_no_preprocessing_to_map_by():
    with pytest.raises(RequestError, match="no preprocessing"):
        map_boxes(as_model(nn.Identity()), [Box(0, 0, 1, 1)], (4, 4))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_size_reads_pixels_as_stored_like_load_image(tmp_path, suffix):
    """A file with an EXIF orientation tag: image_size and load_image agree (no rotation)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / f"rotated{suffix}"
    paint(30, 40, (0, 0, 10, 10)).save(path, exif=exif)
    loaded = cl.load_image(path)
    assert image_size(path) == (loaded.height, loaded.width) == (30, 40)
    assert image_size(loaded) == (30, 40)
    assert image_size(np.zeros((5, 7, 3), dtype=np.uint8)) == (5, 7)


def test_large_jpeg_decoded_at_a_reduced_size_maps_within_a_pixel(tmp_path):
    model = plain_model((64, 64), 0.875)
    path = tmp_path / "big.jpg"
    paint(900, 1300, (500, 300, 900, 700)).save(path, quality=95)
    mapped, _ = map_boxes(model, [Box(500, 300, 900, 700)], image_size(path))
    extent = painted_extent(model, path)
    assert np.abs(np.array(mapped[0].tolist()) - np.array(extent)).max() <= 1.0
