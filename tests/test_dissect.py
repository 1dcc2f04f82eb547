"""Network dissection as Bau et al. (2017) define it: the pooled top quantile, bilinear
upsampling, the detector rule (IoU > 0.04), the count of unique detectors, IoU summed only over
the images labelled in the concept's category; and the Broden folder reader."""

from __future__ import annotations

import csv
import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convlens as cl
from convlens import features
from convlens.checks import RequestError
from convlens.datasets import Broden, BrodenFolder, read_broden, shapes
from convlens.features.dissect import broden_inputs

GREY, RED, GREEN = (128, 128, 128), (255, 0, 0), (0, 255, 0)
CATEGORIES = ("color", "object", "material", "part", "scene", "texture")
LABELS = {2: "tile", 9: "sky", 300: "grass", 7: "beach"}  # 300 = 44 + 256 * 1: red 44, green 1


class ColourUnits(nn.Module):
    """2x2 average pooling, then four 1x1 units with ReLU: unit 0 = R - G - B (fires exactly on
    pure red), unit 1 = G - R - B (on pure green), unit 2 = unit 0 again, unit 3 always 0."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.conv = nn.Conv2d(3, 4, 1)
        self.units = nn.ReLU()
        with torch.no_grad():
            weight = [[1, -1, -1], [-1, 1, -1], [1, -1, -1], [0, 0, 0]]
            self.conv.weight.copy_(torch.tensor(weight, dtype=torch.float32).view(4, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(self.conv(self.pool(x))).mean(dim=(2, 3))


def colour_model() -> cl.Model:
    return cl.wrap(ColourUnits(), input_size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1))


def write_png(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def label_png(path, regions: list[tuple[int, slice, slice]]) -> str:
    """A 16x16 segmentation PNG with label ``code`` in each region, as red + 256 * green."""
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    for code, rows, cols in regions:
        pixels[rows, cols, 0], pixels[rows, cols, 1] = code % 256, code // 256
    write_png(path, pixels)
    return path.relative_to(path.parents[1]).as_posix()


def square(rows: slice, cols: slice) -> tuple[slice, slice]:
    """A square of the 16x16 masks, and the same square of the 32x32 images."""
    return (rows, cols), (
        slice(2 * rows.start, 2 * rows.stop),
        slice(2 * cols.start, 2 * cols.stop),
    )


# mask coordinates (16x16) of each image's red and green squares
SQUARES = {
    0: {"red": (slice(2, 6), slice(2, 6))},
    1: {"green": (slice(8, 12), slice(8, 12))},
    2: {"red": (slice(10, 14), slice(2, 6)), "green": (slice(2, 6), slice(10, 14))},
}


@pytest.fixture
def broden(tmp_path):
    """A Broden-style folder of three 32x32 images with 16x16 masks: ``tile`` (object) on the
    red squares; ``sky`` (object) on the top two rows; ``grass`` (material, label 300, which
    needs the green channel) on image 1's green square only, image 2 has no material labels;
    ``beach`` (scene) a whole-image label of image 0."""
    root = tmp_path / "broden"
    rows = []
    for i, squares in SQUARES.items():
        pixels = np.full((32, 32, 3), GREY)
        objects = [(9, slice(0, 2), slice(0, 16))]
        for colour, place in squares.items():
            _, (r, c) = square(*place)
            pixels[r, c] = RED if colour == "red" else GREEN
            if colour == "red":
                objects.append((2, *place))
        write_png(root / "images" / "shapes" / f"{i}.png", pixels)
        cells = dict.fromkeys(CATEGORIES, "")
        cells["object"] = label_png(root / "images" / "shapes" / f"{i}_object.png", objects)
        if i == 1:
            grass = [(300, *squares["green"])]
            cells["material"] = label_png(root / "images" / "shapes" / f"{i}_mat.png", grass)
        if i == 0:
            cells["scene"] = "7"
        rows.append({"image": f"shapes/{i}.png", "split": "train", "ih": 32, "iw": 32,
                     "sh": 16, "sw": 16, **cells})  # fmt: skip
    with (root / "index.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, ["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES])
        writer.writeheader()
        writer.writerows(rows)
    with (root / "label.csv").open("w", newline="") as file:
        file.write("number,name,category,frequency,coverage,syns\n")
        for number, name in LABELS.items():
            file.write(f"{number},{name},x(1),1,1.0,\n")
    return root


def test_read_broden_decodes_the_masks_and_whole_image_labels(broden):
    data = read_broden(broden)
    assert data.images.shape == (3, 3, 32, 32) and len(data) == 3
    assert torch.allclose(data.images[0, :, 4, 4], torch.tensor([1.0, 0.0, 0.0]))
    assert sorted(data.masks) == ["beach", "grass", "sky", "tile"]
    expected = torch.zeros(3, 16, 16, dtype=torch.bool)
    expected[1, 8:12, 8:12] = True  # label 300: red 44 + 256 * green 1
    assert torch.equal(data.masks["grass"], expected)
    tile = torch.zeros(3, 16, 16, dtype=torch.bool)
    tile[0, 2:6, 2:6] = tile[2, 10:14, 2:6] = True
    assert torch.equal(data.masks["tile"], tile)
    assert data.masks["beach"][0].all() and not data.masks["beach"][1:].any()
    assert data.categories == {
        "beach": ("scene",), "grass": ("material",), "sky": ("object",), "tile": ("object",)
    }  # fmt: skip
    assert data.annotated["grass"].tolist() == [False, True, False]
    assert data.annotated["beach"].tolist() == [True, False, False]
    assert data.annotated["tile"].tolist() == [True, True, True]


def test_read_broden_limits_and_selects(broden):
    two = read_broden(broden, limit=2)
    assert len(two) == 2 and two.masks["tile"].shape == (2, 16, 16)
    objects = read_broden(broden, categories=["object"])
    assert sorted(objects.masks) == ["sky", "tile"]
    resized = read_broden(broden, size=(8, 8))
    assert resized.images.shape == (3, 3, 8, 8) and resized.masks["tile"].shape == (3, 8, 8)
    with pytest.raises(RequestError, match="unknown categories"):
        read_broden(broden, categories=["smell"])
    with pytest.raises(RequestError, match="no images in split"):
        read_broden(broden, split="val")
    (broden / "label.csv").write_text("number,name\n2,tile\n")
    with pytest.raises(RequestError, match=r"label 9 is not in label\.csv"):
        read_broden(broden)


def test_a_label_in_two_categories_is_one_concept_the_union_of_its_masks(broden):
    """Image 0 also carries ``tile`` (label 2) as a material, on a square of its own."""
    label_png(broden / "images" / "shapes" / "0_mat.png", [(2, slice(12, 14), slice(12, 14))])
    rows = list(csv.DictReader((broden / "index.csv").open(newline="")))
    rows[0]["material"] = "shapes/0_mat.png"
    with (broden / "index.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    expected = torch.zeros(3, 16, 16, dtype=torch.bool)
    expected[0, 2:6, 2:6] = expected[0, 12:14, 12:14] = expected[2, 10:14, 2:6] = True
    for record in (read_broden(broden), read_broden(broden, lazy=True).load()):
        assert torch.equal(record.masks["tile"], expected)
        assert record.categories["tile"] == ("material", "object")
        assert record.annotated["grass"].tolist() == [True, True, False]


def test_dissect_on_a_broden_folder_finds_the_planted_detectors(broden):
    model = colour_model()
    data = read_broden(broden)
    x = broden_inputs(model, data)
    # quantile 0.1 exceeds every unit's firing share (32 of 768 places): T_k = 0, M_k = firing
    found = features.dissect(model, x, data, "units", quantile=0.1)
    names = found.info["concepts"]
    assert found.data["detector"].tolist() == [True, True, True, False]
    assert int(found.data["unique_detectors"]) == 2 and found.info["unique_detectors"] == 2
    assert found.info["detectors"] == {"tile": [0, 2], "grass": [1]}
    # by hand: unit 1 fires on image 1's and image 2's green squares (16 places each); only
    # image 1 carries material labels, so IoU = 16 / 16; counting image 2 too, 16 / 32
    assert found.data["iou"][1, names.index("grass")] == pytest.approx(1.0)
    everywhere = features.dissect(model, x, data.masks, "units", quantile=0.1)
    assert everywhere.data["iou"][1, names.index("grass")] == pytest.approx(0.5)
    # beach, image 0 only: unit 0 fires on 16 of its 256 places: 16 / 256 = 0.0625 > 0.04
    assert found.data["iou"][0, names.index("beach")] == pytest.approx(16 / 256)
    # the rule is IoU > detector_iou: at 0.5, unit 1 (0.5 for grass when all images count)
    # is no detector, and one concept is left
    strict = features.dissect(model, x, data.masks, "units", quantile=0.1, detector_iou=0.5)
    assert strict.data["detector"].tolist() == [True, False, True, False]
    assert strict.info["detectors"] == {"tile": [0, 2]} and strict.info["unique_detectors"] == 1


class Ramp(nn.Module):
    """One unit whose map is given: image i's 4x4 map is 100 i + 0..15 (all values distinct)."""

    def __init__(self) -> None:
        super().__init__()
        self.units = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.arange(16.0).view(1, 1, 4, 4) + 100 * torch.arange(len(x)).view(-1, 1, 1, 1)
        return self.units(ramp + 0 * x[:, :1, :4, :4]).mean(dim=(2, 3))


def test_threshold_is_the_top_quantile_over_all_places_of_all_images():
    x = torch.zeros(10, 3, 8, 8)
    masks = {"all": torch.ones(10, 8, 8, dtype=torch.bool)}
    for quantile in (0.005, 0.05, 0.3):
        found = features.dissect(Ramp(), x, masks, "units", quantile=quantile)
        values = torch.arange(16.0).view(1, 16) + 100 * torch.arange(10.0).view(-1, 1)
        # P(a > T) = quantile over the 160 places of all images together
        assert int((values > found.data["thresholds"][0]).sum()) == max(1, round(quantile * 160))


class Corner(nn.Module):
    """One unit with a 2x2 map that is 1 at the top left place and 0 elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.units = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = torch.zeros(len(x), 1, 2, 2)
        corner[:, :, 0, 0] = 1.0
        return self.units(corner + 0 * x[:, :1, :2, :2]).mean(dim=(2, 3))


def test_maps_are_upsampled_bilinearly_to_the_masks():
    """By hand: bilinear scaling of (1, 0) from 2 to 4 places, interpolants anchored at the
    cells' centres, gives (1, 0.75, 0.25, 0), positive on 3 of 4 places a side: 9 of 16
    pixels (nearest-neighbour scaling would give 4)."""
    x = torch.zeros(1, 3, 4, 4)
    nine = torch.zeros(1, 4, 4, dtype=torch.bool)
    nine[0, :3, :3] = True
    four = torch.zeros(1, 4, 4, dtype=torch.bool)
    four[0, :2, :2] = True
    found = features.dissect(Corner(), x, {"nine": nine, "four": four}, "units", quantile=0.3)
    assert found.data["iou"][0].tolist() == pytest.approx([1.0, 4 / 9])


def test_dissect_refuses_bad_annotation_and_threshold():
    x = torch.zeros(2, 3, 4, 4)
    masks = {"a": torch.ones(2, 4, 4, dtype=torch.bool)}
    with pytest.raises(RequestError, match="annotated"):
        features.dissect(Corner(), x, masks, "units", annotated={"b": torch.ones(2).bool()})
    with pytest.raises(RequestError, match=r"annotated\['a'\]"):
        features.dissect(Corner(), x, masks, "units", annotated={"a": torch.ones(3).bool()})
    with pytest.raises(RequestError, match="detector_iou"):
        features.dissect(Corner(), x, masks, "units", detector_iou=1.5)


def shapes_folder(root, n: int):
    """A Broden-style folder of ``n`` shapes images (64x64), each shape's mask a concept."""
    data = shapes(n, seed=3)
    rows = ["image,split,ih,iw,sh,sw,object"]
    for i in range(n):
        picture = (data.images[i].permute(1, 2, 0).numpy() * 255).round()
        write_png(root / "images" / f"{i}.png", picture)
        codes = np.zeros((64, 64, 3))
        codes[data.masks[i].numpy(), 0] = 1 + int(data.labels[i])
        write_png(root / "images" / f"{i}_object.png", codes)
        rows.append(f"{i}.png,train,64,64,64,64,{i}_object.png")
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    names = "\n".join(f"{k + 1},{name}" for k, name in enumerate(data.classes))
    (root / "label.csv").write_text(f"number,name\n{names}\n")
    return data


def test_features_dissect_command_reads_a_broden_folder(tmp_path, capsys):
    """``convlens features dissect --concepts FOLDER``: the folder's images and masks."""
    from convlens.cli import main

    root = tmp_path / "broden"
    data = shapes_folder(root, 4)
    out = tmp_path / "out"
    command = ["features", "dissect", "--model", "shapes-cnn", "--concepts", str(root)]
    assert main([*command, "--out", str(out)]) == 0
    summary = json.loads((out / "dissect.json").read_text())
    assert sorted(summary["concepts"]) == sorted(data.classes)
    assert summary["unique_detectors"] == len(summary["detectors"])
    assert main([*command, "--shapes", "2", "--out", str(tmp_path / "again")]) == 2
    assert "brings its own images" in capsys.readouterr().err


def test_features_dissect_command_draws_limit_images(tmp_path, capsys, monkeypatch):
    """``--limit N`` images of the folder, drawn with ``--seed``, read lazily; a bad limit is
    a one-line usage error."""
    from convlens import datasets
    from convlens.cli import main

    root = tmp_path / "broden"
    shapes_folder(root, 6)
    read = datasets.read_broden
    records = []

    def spy(*args, **kwargs):
        records.append(read(*args, **kwargs))
        return records[-1]

    monkeypatch.setattr(datasets, "read_broden", spy)
    command = ["features", "dissect", "--model", "shapes-cnn", "--concepts", str(root)]
    assert main([*command, "--limit", "3", "--seed", "1", "--out", str(tmp_path / "a")]) == 0
    assert isinstance(records[-1], BrodenFolder) and len(records[-1]) == 3
    assert records[-1].files == read(root, limit=3, seed=1).files
    assert main([*command, "--limit", "0", "--out", str(tmp_path / "b")]) == 2
    assert "--limit must be a positive integer" in capsys.readouterr().err


def test_read_broden_draws_its_sample_from_the_whole_index_with_a_seed(broden):
    full = read_broden(broden)
    drawn = [read_broden(broden, limit=2, seed=seed) for seed in range(8)]
    # every image is drawn by some seed (not always the index's first rows), in index order
    assert {name for record in drawn for name in record.files} == set(full.files)
    for record in drawn:
        rows = [full.files.index(name) for name in record.files]
        assert rows == sorted(rows) and len(rows) == 2
        for concept, masks in record.masks.items():
            assert torch.equal(masks, full.masks[concept][rows])
            assert torch.equal(record.annotated[concept], full.annotated[concept][rows])
        assert torch.equal(record.images, full.images[rows])
    again = read_broden(broden, limit=2, seed=5)
    assert again.files == drawn[5].files


def test_a_lazy_record_reads_chunk_by_chunk_and_dissects_as_the_in_memory_one(broden, monkeypatch):
    """``read_broden(lazy=True)``: nothing decoded up front but the labels; dissect reads the
    images and masks a chunk at a time (here one image) and finds what it finds in memory."""
    module = importlib.import_module("convlens.features.dissect")
    dense, lazy = read_broden(broden), read_broden(broden, lazy=True)
    assert isinstance(lazy, BrodenFolder) and lazy.files == dense.files
    loaded = lazy.load()
    assert torch.equal(loaded.images, dense.images) and loaded.categories == dense.categories
    assert all(torch.equal(loaded.masks[c], dense.masks[c]) for c in dense.masks)
    assert all(torch.equal(lazy.annotated[c], dense.annotated[c]) for c in dense.masks)
    sizes = {"read_images": [], "read_masks": []}
    for method in sizes:
        original = getattr(BrodenFolder, method)

        def counted(self, start=0, stop=None, original=original, method=method):
            out = original(self, start, stop)
            sizes[method].append(len(out))
            return out

        monkeypatch.setattr(BrodenFolder, method, counted)
    monkeypatch.setattr(module, "CHUNK", 1)
    model = colour_model()
    found = features.dissect(model, None, lazy, "units", quantile=0.1, batch_size=1)
    assert sizes["read_images"] and max(sizes["read_images"]) == 1
    assert sizes["read_masks"] and max(sizes["read_masks"]) == 1
    in_memory = features.dissect(model, broden_inputs(model, dense), dense, "units", quantile=0.1)
    assert found.info["concepts"] == in_memory.info["concepts"]
    for key in ("thresholds", "iou", "detector"):
        assert torch.equal(found.data[key], in_memory.data[key])
    names = found.info["concepts"]  # by hand, as in the in-memory test above
    assert found.data["iou"][1, names.index("grass")] == pytest.approx(1.0)
    assert found.data["iou"][0, names.index("beach")] == pytest.approx(16 / 256)
    # the record's own images, from memory, also without a batch
    own = features.dissect(model, None, dense, "units", quantile=0.1)
    assert torch.equal(own.data["iou"], in_memory.data["iou"])
    with pytest.raises(RequestError, match="images=None only with a Broden record"):
        features.dissect(model, None, dense.masks, "units")


def test_broden_inputs_keep_brightness_when_shrinking_and_go_grey_for_one_channel():
    """Shrinking 4x an image whose every fourth column is white keeps its mean, 1/4 (plain
    bilinear sampling between columns 4i + 1 and 4i + 2 would see only black); a one-channel
    model gets the luma of PIL's "L" mode, 0.299 R + 0.587 G + 0.114 B, normalised."""

    def record(images):
        one = torch.ones(1, 8, 8, dtype=torch.bool)
        return Broden(images, {"a": one}, {"a": ("object",)}, {"a": torch.ones(1).bool()}, ("x",))

    stripes = torch.zeros(1, 3, 32, 32)
    stripes[..., ::4] = 1.0
    small = cl.wrap(nn.Identity(), input_size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1))
    x = broden_inputs(small, record(stripes))
    assert x.shape == (1, 3, 8, 8) and float(x.mean()) == pytest.approx(0.25, abs=0.01)
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1.0
    grey = cl.wrap(nn.Identity(), input_size=(32, 32), mean=(0.5,), std=(0.25,))
    g = broden_inputs(grey, record(red))
    assert g.shape == (1, 1, 32, 32)
    assert torch.allclose(g, torch.full_like(g, (0.299 - 0.5) / 0.25))


def test_bad_numbers_are_refused_in_one_line(broden):
    x = torch.zeros(2, 3, 4, 4)
    masks = {"a": torch.ones(2, 4, 4, dtype=torch.bool)}
    for name, value in [("detector_iou", "0.1"), ("quantile", "0.1"), ("quantile", -0.1),
                        ("detector_iou", float("nan"))]:  # fmt: skip
        with pytest.raises(RequestError, match=f"^{name} must be") as error:
            features.dissect(Corner(), x, masks, "units", **{name: value})
        assert "\n" not in str(error.value)
    for name, value in [("limit", "2"), ("limit", 0), ("seed", -1), ("seed", 1.5)]:
        with pytest.raises(RequestError, match=f"^{name} must be"):
            read_broden(broden, **{name: value})
