"""Ground-truth boxes for your own images: read from a CSV file, a COCO JSON file or a folder
of Pascal VOC XML files (:func:`read_boxes`), matched to the images (:func:`match_image`) and
mapped into model-input pixels through the model's preprocessing (:func:`map_boxes`).

Coordinates. A :class:`Box` is ``(x0, y0, x1, y1)`` in the original picture's pixels, in
continuous coordinates: ``(0, 0)`` is the top-left corner of the top-left pixel and the right
and bottom edges are exclusive, so a box of the whole W x H picture is ``(0, 0, W, H)``. That is
COCO's convention (``bbox`` ``[x, y, width, height]`` gives ``(x, y, x + width, y + height)``)
and the CSV's. Pascal VOC numbers pixels from 1 with ``xmax``/``ymax`` inclusive, so a VOC box
becomes ``(xmin - 1, ymin - 1, xmax, ymax)``.

Which boxes are kept. COCO ``iscrowd`` regions and VOC ``difficult`` objects are kept: the
metrics here ask whether a map falls on *any* object of the image, and the detection benchmarks
do not count those regions as background either (COCO and VOC evaluation ignore them rather
than penalise finding them).

Matching images. The boxes are keyed by the image name as the file writes it (a CSV ``image``
cell, a COCO ``file_name``, a VOC ``<filename>``); names that differ only by ``./`` or ``\\``
(:func:`image_key`) are one image, whose boxes are merged under the first spelling. An image
given as ``photos/cat.jpg`` takes the boxes of the key ``photos/cat.jpg`` when there is one (the
same path, ``./`` and ``\\`` aside), otherwise those of the one key whose file name is
``cat.jpg``, otherwise those of the key ``cat`` (ImageNet's VOC files name images without their
extension). Two keys that match only by file name are refused as ambiguous.

Sizes. A COCO ``images[].width``/``height`` or a VOC ``<size><width>``/``<height>`` is kept in
:attr:`BoxFile.sizes` so that the picture can be checked to be the one annotated (a resized
copy would misplace every box); a size that is absent, or 0 (as LabelImg writes when it could
not read the picture), is not checked.

Orientation. Boxes refer to the pixels as stored in the file: convlens reads pictures without
applying an EXIF orientation tag (:func:`convlens.images.load_image`), and so does
:func:`image_size`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from convlens.checks import RequestError
from convlens.files import printable
from convlens.images import ImageError, ImageLike, to_rgb
from convlens.model import Model

__all__ = [
    "CSV_COLUMNS",
    "Box",
    "BoxFile",
    "DroppedBox",
    "check_image_sizes",
    "image_key",
    "image_size",
    "map_boxes",
    "match_image",
    "match_images",
    "read_boxes",
]

CSV_COLUMNS = ("image", "x0", "y0", "x1", "y1")
CSV_HEADER = "image,x0,y0,x1,y1[,label]"


@dataclass(frozen=True)
class Box:
    """A ground-truth box in original picture pixels, right and bottom exclusive."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None = None

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class DroppedBox:
    """A box that does not reach the model's input: ``index`` in the image's list, ``reason``."""

    index: int
    box: Box
    reason: str


class BoxFile(dict[str, list[Box]]):
    """What :func:`read_boxes` returns: the boxes by image name, and ``sizes``, the picture
    size ``(height, width)`` the file states for an image name (COCO and VOC files; absent
    for a CSV file and for images whose size is not stated)."""

    def __init__(
        self,
        boxes: Mapping[str, list[Box]] | None = None,
        sizes: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(boxes or {})
        self.sizes: dict[str, tuple[int, int]] = dict(sizes or {})


def image_key(name: str) -> str:
    """An image name as a POSIX path with ``\\`` read as ``/`` and ``.`` parts left out:
    ``./photos\\cat.jpg`` and ``photos/cat.jpg`` have the same key (``photos/cat.jpg``)."""
    return str(_parts(name))


class _Merged:
    """Boxes (and stated sizes) gathered under the first spelling of each image's
    :func:`image_key`."""

    def __init__(self) -> None:
        self.found = BoxFile()
        self.spelling: dict[str, str] = {}

    def key(self, name: str) -> str:
        return self.spelling.setdefault(image_key(name), name)

    def add(self, name: str, boxes: Sequence[Box] = ()) -> str:
        key = self.key(name)
        self.found.setdefault(key, []).extend(boxes)
        return key

    def size(self, name: str, size: tuple[int, int] | None, where: str) -> None:
        if size is None:
            return
        key = self.key(name)
        known = self.found.sizes.setdefault(key, size)
        if known != size:
            raise RequestError(
                f"{where}: image {printable(name)!r} is {_size(size)} here but "
                f"{_size(known)} earlier in the file"
            )


def _size(size: tuple[int, int]) -> str:
    """(height, width) as the usual ``WxH``."""
    return f"{size[1]}x{size[0]}"


def _stated_size(width: Any, height: Any, where: str, names: str) -> tuple[int, int] | None:
    """(height, width) from a file's stated width and height; ``None`` when either is absent
    or 0 (unknown). ``names`` are how the file calls the two, as ``width,height``."""
    if width is None or height is None:
        return None
    values = []
    for value, what in zip((width, height), names.split(","), strict=True):
        number = _number(value, what, where)
        if number < 0 or number != int(number):
            raise RequestError(f"{where}: {what} must be a whole number of pixels, not {value!r}")
        values.append(int(number))
    return None if 0 in values else (values[1], values[0])


# -- reading -----------------------------------------------------------------------------------


def read_boxes(path: str | os.PathLike) -> BoxFile:
    """The boxes of a CSV file (``image,x0,y0,x1,y1[,label]``, a header line first, one row per
    box), a COCO JSON file (``images``, ``annotations`` with ``bbox`` ``[x, y, w, h]``,
    ``categories`` naming the labels) or a folder of Pascal VOC ``.xml`` files (one file also
    works), by image name as written in the file (names that differ only by ``./`` or ``\\``
    merged), with the picture sizes the file states (:class:`BoxFile`). See the module's
    notes on coordinates, matching and sizes. Anything malformed is a one-line
    :class:`RequestError` naming the file and the line, row or annotation.

    Example:
        >>> boxes = read_boxes("boxes.csv")   # {"cat.jpg": [Box(10.0, 20.0, 200.0, 180.0, "cat")]}
    """
    path = Path(path)
    shown = printable(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".xml" and p.is_file())
        if not files:
            raise RequestError(f"{shown} holds no .xml files (a folder of Pascal VOC annotations)")
        return _read_voc(files)
    if not path.exists():
        raise RequestError(f"box file not found: {shown}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_coco(path)
    if suffix == ".xml":
        return _read_voc([path])
    if suffix in (".csv", ".txt"):
        return _read_csv(path)
    raise RequestError(
        f"{shown}: give boxes as a .csv file ({CSV_HEADER}), a COCO .json file or a folder of "
        "Pascal VOC .xml files"
    )


def _number(text: Any, what: str, where: str) -> float:
    if isinstance(text, bool) or text is None:
        raise RequestError(f"{where}: {what} is not a number: {text!r}")
    try:
        value = float(text.strip() if isinstance(text, str) else text)
    except (TypeError, ValueError):
        raise RequestError(f"{where}: {what} is not a number: {printable(repr(text))}") from None
    if not math.isfinite(value):
        raise RequestError(f"{where}: {what} must be a finite number, not {text!r}")
    return value


def _shown(value: float) -> str:
    return f"{value:g}"


def _box(
    x0: float, y0: float, x1: float, y1: float, label: str | None, where: str, names: str
) -> Box:
    """A checked box; ``names`` are the four coordinates' names as the file calls them."""
    n = names.split(",")
    for low, high, low_name, high_name in ((x0, x1, n[0], n[2]), (y0, y1, n[1], n[3])):
        if high <= low:
            raise RequestError(
                f"{where}: {high_name} ({_shown(high)}) must be greater than "
                f"{low_name} ({_shown(low)})"
            )
    return Box(x0, y0, x1, y1, label)


def _read_csv(path: Path) -> BoxFile:
    shown = printable(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            lines = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError:
        raise RequestError(f"{shown}: not UTF-8 text (a CSV file is needed)") from None
    except OSError as error:
        raise RequestError(f"cannot read {shown}: {error.strerror or error}") from None
    except csv.Error as error:
        raise RequestError(f"{shown}: malformed CSV: {error}") from None
    lines = [(number, row) for number, row in lines if any(cell.strip() for cell in row)]
    if not lines:
        raise RequestError(f"{shown} is empty; a CSV file needs the header {CSV_HEADER}")
    number, header = lines[0]
    columns = [cell.strip().lower() for cell in header]
    missing = [c for c in CSV_COLUMNS if c not in columns]
    if missing:
        raise RequestError(
            f"{shown}: line {number}: the first line must be the header {CSV_HEADER} (a header "
            f"is required); missing column(s) {', '.join(missing)} in "
            f"{printable(','.join(header))!r}"
        )
    unknown = [c for c in columns if c not in (*CSV_COLUMNS, "label")]
    doubled = sorted({c for c in columns if columns.count(c) > 1})
    if unknown or doubled:
        what = f"unknown column(s) {', '.join(map(repr, unknown))}" if unknown else ""
        what += ("; " if what else "") + (f"repeated {', '.join(doubled)}" if doubled else "")
        raise RequestError(f"{shown}: line {number}: {printable(what)}; the header is {CSV_HEADER}")
    at = {c: columns.index(c) for c in columns}
    merged = _Merged()
    for number, row in lines[1:]:
        where = f"{shown}: line {number}"
        if len(row) != len(columns):
            raise RequestError(f"{where}: {len(row)} fields, the header has {len(columns)}")
        image = row[at["image"]].strip()
        if not image:
            raise RequestError(f"{where}: the image name is empty")
        x0, y0, x1, y1 = (_number(row[at[c]], c, where) for c in CSV_COLUMNS[1:])
        label = (row[at["label"]].strip() or None) if "label" in at else None
        merged.add(image, [_box(x0, y0, x1, y1, label, where, "x0,y0,x1,y1")])
    if not merged.found:
        raise RequestError(f"{shown} has a header but no boxes")
    return merged.found


def _is_id(value: Any) -> bool:
    """A COCO id: a number or a string (anything else cannot be looked up)."""
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _read_coco(path: Path) -> BoxFile:
    shown = printable(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise RequestError(f"{shown}: not UTF-8 text (a COCO JSON file is needed)") from None
    except OSError as error:
        raise RequestError(f"cannot read {shown}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise RequestError(
            f"{shown}: malformed JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(key), list) for key in ("images", "annotations")
    ):
        raise RequestError(f"{shown}: a COCO file needs 'images' and 'annotations' lists")
    categories: dict[Any, str] | None = None
    if data.get("categories") is not None:
        if not isinstance(data["categories"], list):
            raise RequestError(f"{shown}: 'categories' must be a list")
        categories = {}
        for i, category in enumerate(data["categories"]):
            if not isinstance(category, dict) or not _is_id(category.get("id")):
                raise RequestError(f"{shown}: categories[{i}] needs an 'id' and a 'name'")
            if "name" not in category:
                raise RequestError(f"{shown}: categories[{i}] needs an 'id' and a 'name'")
            categories[category["id"]] = str(category["name"])
    names: dict[Any, str] = {}
    merged = _Merged()
    for i, image in enumerate(data["images"]):
        name = image.get("file_name") if isinstance(image, dict) else None
        if not isinstance(image, dict) or not _is_id(image.get("id")):
            raise RequestError(f"{shown}: images[{i}] needs an 'id' and a 'file_name'")
        if not isinstance(name, str) or not name.strip():
            raise RequestError(f"{shown}: images[{i}] (id {image['id']!r}) has no 'file_name'")
        if image["id"] in names:
            raise RequestError(f"{shown}: images[{i}]: image id {image['id']!r} is repeated")
        names[image["id"]] = merged.add(name.strip())
        where = f"{shown}: images[{i}] (id {image['id']!r})"
        size = _stated_size(image.get("width"), image.get("height"), where, "width,height")
        merged.size(name.strip(), size, where)
    for i, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            raise RequestError(f"{shown}: annotations[{i}] is not an object")
        where = f"{shown}: annotations[{i}]" + (
            f" (id {annotation['id']!r})" if "id" in annotation else ""
        )
        if not _is_id(annotation.get("image_id")) or annotation["image_id"] not in names:
            raise RequestError(
                f"{where}: image_id {annotation.get('image_id')!r} is not among the images"
            )
        bbox = annotation.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise RequestError(f"{where}: 'bbox' must be [x, y, width, height], not {bbox!r}")
        x, y, width, height = (
            _number(v, what, where)
            for v, what in zip(bbox, ("x", "y", "width", "height"), strict=True)
        )
        for size, what in ((width, "width"), (height, "height")):
            if size <= 0:
                raise RequestError(f"{where}: the bbox {what} must be positive, not {size:g}")
        label = None
        if categories is not None and "category_id" in annotation:
            if not _is_id(annotation["category_id"]) or annotation["category_id"] not in categories:
                raise RequestError(
                    f"{where}: category_id {annotation['category_id']!r} is not in 'categories'"
                )
            label = categories[annotation["category_id"]]
        merged.add(names[annotation["image_id"]], [Box(x, y, x + width, y + height, label)])
    return merged.found


def _read_voc(files: Sequence[Path]) -> BoxFile:
    merged = _Merged()
    origin: dict[str, Path] = {}
    for file in files:
        shown = printable(file)
        try:
            root = ElementTree.parse(file).getroot()
        except ElementTree.ParseError as error:
            raise RequestError(f"{shown}: malformed XML: {error}") from None
        except OSError as error:
            raise RequestError(f"cannot read {shown}: {error.strerror or error}") from None
        if root.tag != "annotation":
            raise RequestError(f"{shown}: not a Pascal VOC file (its root is <{root.tag}>)")
        name = (root.findtext("filename") or "").strip()
        if not name:
            raise RequestError(f"{shown}: no <filename>")
        if image_key(name) in origin:
            raise RequestError(
                f"{shown}: image {printable(name)!r} is also described by "
                f"{printable(origin[image_key(name)])}"
            )
        origin[image_key(name)] = file
        frame = root.find("size")
        if frame is not None:
            size = _stated_size(
                frame.findtext("width"), frame.findtext("height"), shown, "<width>,<height>"
            )
            merged.size(name, size, shown)
        boxes = merged.found.setdefault(merged.key(name), [])
        for i, item in enumerate(root.findall("object"), 1):
            where = f"{shown}: object {i}"
            label = (item.findtext("name") or "").strip() or None
            frame = item.find("bndbox")
            if frame is None:
                raise RequestError(f"{where} has no <bndbox>")
            values = []
            for tag in ("xmin", "ymin", "xmax", "ymax"):
                text = frame.findtext(tag)
                if text is None:
                    raise RequestError(f"{where}: <bndbox> has no <{tag}>")
                values.append(_number(text, f"<{tag}>", where))
            xmin, ymin, xmax, ymax = values
            # 1-based, inclusive: pixels xmin..xmax cover [xmin - 1, xmax) from 0
            checked = _box(xmin - 1, ymin - 1, xmax, ymax, label, where, "xmin,ymin,xmax,ymax")
            boxes.append(checked)
    return merged.found


# -- matching -----------------------------------------------------------------------------------


def _parts(name: str) -> PurePosixPath:
    return PurePosixPath(name.replace("\\", "/"))


def match_images(boxes: Mapping[str, Sequence[Box]], names: Sequence[str]) -> list[str | None]:
    """For each image given as ``names[i]``, the key of ``boxes`` holding its boxes: the same
    path, else the one key with the same file name, else the one key that is the file name
    without its extension; ``None`` when no key matches. Several keys matching by file name,
    or by path (keys that differ only by ``./`` or ``\\``, which :func:`read_boxes` merges),
    are a :class:`RequestError`."""
    paths: dict[PurePosixPath, list[str]] = {}
    by_name: dict[str, list[str]] = {}
    by_stem: dict[str, list[str]] = {}
    for key in boxes:
        path = _parts(key)
        paths.setdefault(path, []).append(key)
        by_name.setdefault(path.name, []).append(key)
        if not path.suffix:
            by_stem.setdefault(path.name, []).append(key)
    found: list[str | None] = []
    for name in map(str, names):
        path = _parts(name)
        same = paths.get(path, [])
        if len(same) > 1:
            raise RequestError(
                f"image {printable(name)} has boxes under several spellings of its path "
                f"({printable(', '.join(same[:3]))}); merge them into one"
            )
        if same:
            found.append(same[0])
            continue
        keys = by_name.get(path.name) or by_stem.get(path.stem) or []
        if len(keys) > 1:
            raise RequestError(
                f"image {printable(name)} matches several images of the box file by name "
                f"({printable(', '.join(keys[:3]))}); give the images by the paths it uses"
            )
        found.append(keys[0] if keys else None)
    return found


def match_image(boxes: Mapping[str, Sequence[Box]], name: str) -> str | None:
    """The key of ``boxes`` holding the boxes of the image given as ``name`` (see
    :func:`match_images`), or ``None``."""
    return match_images(boxes, [name])[0]


# -- mapping into model-input pixels -------------------------------------------------------------


def image_size(image: ImageLike) -> tuple[int, int]:
    """(height, width) of a picture as convlens reads it, cheaply: a file's header only (no EXIF
    rotation, as :func:`convlens.images.load_image`)."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        picture = to_rgb(image)
        return picture.height, picture.width
    path = Path(image)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as picture:
            return picture.height, picture.width
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot read {path}: {error}") from None


def check_image_sizes(
    boxes: Mapping[str, Sequence[Box]],
    images: Sequence[tuple[str, ImageLike]],
    keys: Sequence[str | None],
) -> None:
    """Refuse, in one line, a picture whose (height, width) is not the one its box file states
    (``BoxFile.sizes``; ``keys[i]`` is the key of ``images[i]``, from :func:`match_images`):
    its boxes would land in the wrong place. Pictures that cannot be read are not checked."""
    sizes = getattr(boxes, "sizes", None) or {}
    for (name, source), key in zip(images, keys, strict=True):
        stated = sizes.get(key) if key is not None else None
        if stated is None:
            continue
        try:
            actual = tuple(image_size(source))
        except (ImageError, OSError, RequestError):
            continue
        if actual == tuple(stated):
            continue
        if actual == tuple(stated)[::-1]:
            cause = (
                "probably an EXIF orientation tag: the boxes were drawn on the rotated picture, "
                "and convlens reads pixels as stored, without EXIF rotation"
            )
        else:
            cause = "probably a resized copy of the annotated picture"
        raise RequestError(
            f"image {printable(name)} is {_size(actual)} pixels but the box file gives "
            f"{_size(stated)} for {printable(key)}: {cause}"
        )


def _geometry(model: Model, height: int, width: int) -> tuple[float, float, int, int]:
    """What ``Model.preprocess`` does to a (height, width) picture: the scale of each axis and
    the crop's top and left offsets in the resized picture."""
    if model.input_size is None:
        raise RequestError("this model has no preprocessing (a bare nn.Module) to map boxes by")
    in_h, in_w = model.input_size
    scale = max(in_h / height, in_w / width) / model.crop
    size_h, size_w = max(in_h, round(height * scale)), max(in_w, round(width * scale))
    return size_h / height, size_w / width, (size_h - in_h) // 2, (size_w - in_w) // 2


def map_boxes(
    model: Model, boxes: Sequence[Box], image_size: tuple[int, int]
) -> tuple[Tensor, list[DroppedBox]]:
    """Boxes of a (height, width) picture in the model's input pixels: scaled as
    ``Model.preprocess`` resizes the shorter side to ``input_size / crop`` and shifted by its
    centre crop. Returns the (N, 4) float tensor of the boxes that reach the input, in order,
    clipped to it, and the boxes that do not, with the reason (outside the picture, or cropped
    away). Exact when the picture is decoded at full size; within a pixel when convlens decodes
    a large picture at a reduced size (``load_image``'s ``size``)."""
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise RequestError(f"image_size must be a positive (height, width), not {image_size}")
    scale_y, scale_x, top, left = _geometry(model, height, width)
    in_h, in_w = model.input_size  # type: ignore[misc]
    kept: list[list[float]] = []
    dropped: list[DroppedBox] = []
    for index, box in enumerate(boxes):
        x0, y0 = max(box.x0, 0.0), max(box.y0, 0.0)
        x1, y1 = min(box.x1, float(width)), min(box.y1, float(height))
        if x1 <= x0 or y1 <= y0:
            reason = f"outside the {width}x{height} picture"
            dropped.append(DroppedBox(index, box, reason))
            continue
        mapped = [
            min(max(x0 * scale_x - left, 0.0), in_w),
            min(max(y0 * scale_y - top, 0.0), in_h),
            min(max(x1 * scale_x - left, 0.0), in_w),
            min(max(y1 * scale_y - top, 0.0), in_h),
        ]
        if mapped[2] <= mapped[0] or mapped[3] <= mapped[1]:
            dropped.append(DroppedBox(index, box, "cropped away by the centre crop"))
            continue
        kept.append(mapped)
    return torch.tensor(kept, dtype=torch.float32).reshape(-1, 4), dropped
