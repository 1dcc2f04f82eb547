"""Synthetic data sets with known answers, for evaluating explanations (``cl.datasets``).

:func:`shapes` draws one object (circle, square, triangle or cross) of random size, place and
colour on a textured background of random colours. The class is the object's shape and nothing
else, so a faithful explanation must point at the object, whose box and mask are returned.

:func:`clever_hans` is the same data with a planted shortcut: a share of one class's images
carry a small tag in a fixed corner, as the "copyright" tag on many horse images of PASCAL VOC
that a Fisher-vector classifier learnt to answer "horse" from (Lapuschkin et al. 2019,
"Unmasking Clever Hans predictors and assessing what machines really learn", Nature
Communications 10:1096). A model trained on it can be caught using the tag (:func:`tag`
other classes' images and its answer changes), and SpRAy (``convlens.audit.spray``) should
separate the tagged images' explanations from the others.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from convlens.checks import RequestError, positive_int

__all__ = [
    "SHAPES",
    "TAG_SIZE",
    "Broden",
    "BrodenFolder",
    "CleverHans",
    "Shapes",
    "Snow",
    "clever_hans",
    "read_broden",
    "shapes",
    "shapes_folder",
    "snow",
    "tag",
    "tag_box",
]

SHAPES = ("circle", "square", "triangle", "cross")


@dataclass(frozen=True)
class Shapes:
    """``images`` (N, 3, H, W) in [0, 1]; ``labels`` (N,); ``boxes`` (N, 4) as ``(x0, y0, x1,
    y1)``, right and bottom exclusive; ``masks`` (N, H, W) bool; ``classes`` the names."""

    images: Tensor
    labels: Tensor
    boxes: Tensor
    masks: Tensor
    classes: tuple[str, ...] = SHAPES

    def __len__(self) -> int:
        return len(self.labels)


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) bool mask of the shape filling its square."""
    r = (np.arange(size) + 0.5) / size * 2 - 1  # -1..1 across the square
    y, x = np.meshgrid(r, r, indexing="ij")
    if kind == "circle":
        return x**2 + y**2 <= 0.95
    if kind == "square":
        return (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
    if kind == "triangle":  # apex up
        return (y <= 0.9) & (y >= -0.9 + 2 * np.abs(x) * 0.95)
    if kind == "cross":
        bar = 0.28
        return ((np.abs(x) <= bar) | (np.abs(y) <= bar)) & (np.abs(x) <= 0.95) & (np.abs(y) <= 0.95)
    raise RequestError(f"unknown shape {kind!r}")


def shapes(n: int, size: int = 64, seed: int = 0, min_side: int = 14, max_side: int = 26) -> Shapes:
    """``n`` images of ``size`` x ``size`` with one shape each, classes in turn.

    The background is a smooth random colour field with pixel noise; the object has a random
    colour at least 0.35 away (in RGB distance) from the background under it, a random side in
    [``min_side``, ``max_side``] and a random place fully inside the image. Reproducible from
    ``seed``.
    """
    if n < 1 or size < max_side + 2 or not 4 <= min_side <= max_side:
        raise RequestError("need n >= 1, 4 <= min_side <= max_side and size > max_side + 1")
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    boxes = np.empty((n, 4), dtype=np.int64)
    labels = np.arange(n) % len(SHAPES)
    grid = np.linspace(0, 1, size)
    for i in range(n):
        corners = rng.uniform(0.0, 1.0, (2, 2, 3))  # bilinear colour field
        gy, gx = grid[:, None, None], grid[None, :, None]
        field = (
            corners[0, 0] * (1 - gy) * (1 - gx)
            + corners[0, 1] * (1 - gy) * gx
            + corners[1, 0] * gy * (1 - gx)
            + corners[1, 1] * gy * gx
        )
        picture = np.clip(field + rng.normal(0, 0.06, field.shape), 0, 1)
        side = int(rng.integers(min_side, max_side + 1))
        y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        shape = _shape_mask(SHAPES[labels[i]], side, rng)
        under = field[y0 : y0 + side, x0 : x0 + side].reshape(-1, 3).mean(0)
        for _ in range(100):
            color = rng.uniform(0, 1, 3)
            if np.linalg.norm(color - under) >= 0.35:
                break
        window = picture[y0 : y0 + side, x0 : x0 + side]
        window[shape] = np.clip(color + rng.normal(0, 0.03, (int(shape.sum()), 3)), 0, 1)
        masks[i, y0 : y0 + side, x0 : x0 + side] = shape
        rows, cols = np.nonzero(masks[i])
        boxes[i] = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        images[i] = picture.transpose(2, 0, 1)
    return Shapes(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        torch.from_numpy(boxes),
        torch.from_numpy(masks),
    )


def shapes_folder(
    root: str | os.PathLike,
    counts: int | Mapping[str, int] = 40,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """An image-folder data set (one sub-folder of PNG files per class) of :func:`shapes`
    images: ``counts`` images per class, or ``{class: count}`` for some of the classes (an
    unbalanced folder). For ``convlens train`` and its tests; the answer is known: each
    object's box is in ``root/boxes.csv`` (``image,x0,y0,x1,y1,label``, image paths relative
    to ``root``, pixels, right and bottom exclusive), the form ``convlens evaluate --boxes``
    reads."""
    wanted = dict.fromkeys(SHAPES[:3], counts) if isinstance(counts, int) else dict(counts)
    unknown = set(wanted) - set(SHAPES)
    if unknown:
        raise RequestError(f"unknown shape classes {sorted(unknown)}; known: {', '.join(SHAPES)}")
    data = shapes(len(SHAPES) * max(wanted.values()), size=size, seed=seed)
    root = Path(root)
    lines = ["image,x0,y0,x1,y1,label"]
    for name, count in wanted.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = (data.labels == SHAPES.index(name)).nonzero().flatten()[:count]
        for k, i in enumerate(rows.tolist()):
            pixels = (data.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{k:04d}.png")
            box = ",".join(str(v) for v in data.boxes[i].tolist())
            lines.append(f"{name}/{name}_{k:04d}.png,{box},{name}")
    (root / "boxes.csv").write_text("\n".join(lines) + "\n")
    return root


TAG_SIZE = 6  # side of the Clever-Hans tag, in pixels
TAG_MARGIN = 2  # its distance from the image's top left corner


@dataclass(frozen=True, kw_only=True)
class CleverHans(Shapes):
    """:class:`Shapes` with a planted shortcut: ``tagged`` (N,) bool, which images carry the
    tag (:func:`tag`, at :func:`tag_box`); ``tagged_class`` the class whose images were tagged
    at ``tag_share``; ``other_share`` the share of the other classes' images tagged."""

    tagged: Tensor
    tagged_class: str = "circle"
    tag_share: float = 0.5
    other_share: float = 0.0


def tag_box(size: int = 64) -> tuple[int, int, int, int]:
    """The tag's place ``(x0, y0, x1, y1)`` (right and bottom exclusive) in a ``size`` x
    ``size`` image: :data:`TAG_SIZE` pixels square, :data:`TAG_MARGIN` from the top left."""
    if size < TAG_SIZE + TAG_MARGIN:
        raise RequestError(f"an image of side {size} is too small for the tag")
    return (TAG_MARGIN, TAG_MARGIN, TAG_MARGIN + TAG_SIZE, TAG_MARGIN + TAG_SIZE)


def tag(images: Tensor, which: Tensor | None = None) -> Tensor:
    """A copy of ``images`` (N, C, H, W) in [0, 1] with the tag stamped on (all of them, or
    those where the bool mask ``which`` (N,) is set): a black-and-white checkerboard of 2x2
    pixel cells at :func:`tag_box`, in every channel, so it shows on any background."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise RequestError(f"images must be (N, C, S, S), not {tuple(images.shape)}")
    x0, y0, x1, y1 = tag_box(images.shape[-1])
    cells = torch.arange(TAG_SIZE) // 2
    board = ((cells[:, None] + cells[None, :]) % 2 == 0).to(images.dtype)
    out = images.clone()
    rows = slice(None) if which is None else torch.as_tensor(which, dtype=torch.bool)
    out[rows, :, y0:y1, x0:x1] = board
    return out


def clever_hans(
    n: int,
    size: int = 64,
    seed: int = 0,
    tagged_class: str = "circle",
    tag_share: float = 0.5,
    other_share: float = 0.0,
) -> CleverHans:
    """:func:`shapes` (``n``, ``size``, ``seed``) where a random share ``tag_share`` of the
    ``tagged_class`` images, and ``other_share`` of the other classes' images, carry the tag
    (:func:`tag`): a 6x6 checkerboard in the top left corner, a shortcut a model can learn
    instead of the shape, like the copyright tag of the horse images in Lapuschkin et al.
    (2019). The object may lie under the tag; ``masks`` and ``boxes`` are the object's.
    Reproducible from ``seed``."""
    if tagged_class not in SHAPES:
        raise RequestError(f"unknown shape class {tagged_class!r}; known: {', '.join(SHAPES)}")
    for name, share in (("tag_share", tag_share), ("other_share", other_share)):
        if not 0.0 <= share <= 1.0:
            raise RequestError(f"{name} must be in [0, 1], not {share}")
    data = shapes(n, size=size, seed=seed)
    draw = np.random.default_rng([seed, 1]).uniform(0.0, 1.0, n)
    chosen = data.labels.numpy() == SHAPES.index(tagged_class)
    tagged = torch.from_numpy(np.where(chosen, draw < tag_share, draw < other_share))
    return CleverHans(
        tag(data.images, tagged),
        data.labels,
        data.boxes,
        data.masks,
        tagged=tagged,
        tagged_class=tagged_class,
        tag_share=tag_share,
        other_share=other_share,
    )


SNOW_CLASSES = ("husky", "wolf")  # class 1, "wolf", is the one photographed in snow
SNOW_SHAPES = ("circle", "triangle")  # the shape of each class's animal


@dataclass(frozen=True, kw_only=True)
class Snow(Shapes):
    """:class:`Shapes` of two classes, ``"husky"`` (a circle) and ``"wolf"`` (a triangle), on
    two kinds of background: ``snowy`` (N,) bool, which images have snow (the others grass);
    ``cue_share`` the share of images whose background agrees with the class (wolves in snow,
    huskies on grass); ``swapped`` whether the backgrounds were swapped after drawing."""

    snowy: Tensor
    cue_share: float = 0.95
    swapped: bool = False


def _backgrounds(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A snow and a grass texture (size, size, 3) made from the same random field: white with
    soft grey drifts and sparkle, and dark green with blades (vertical streaks)."""
    coarse = rng.normal(0.0, 1.0, (size // 8 + 2, size // 8 + 2))
    grid = np.linspace(0, coarse.shape[0] - 1.001, size)
    i, f = grid.astype(int), grid - grid.astype(int)
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]  # bilinear upsampling
    smooth = rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]
    fine = rng.normal(0.0, 1.0, (size, size))
    streaks = np.repeat(rng.normal(0.0, 1.0, (size // 2 + 1, size)), 2, axis=0)[:size]
    snow = 0.86 + 0.05 * smooth[..., None] + 0.04 * fine[..., None] + np.array([0, 0.01, 0.04])
    grass = np.array([0.12, 0.32, 0.10]) + (0.05 * smooth + 0.06 * streaks)[..., None] * np.array(
        [0.6, 1.0, 0.5]
    )
    return np.clip(snow, 0, 1), np.clip(grass, 0, 1)


def snow(
    n: int, size: int = 64, seed: int = 0, cue_share: float = 0.95, swap: bool = False
) -> Snow:
    """The husky-and-wolf lesson of Ribeiro, Singh & Guestrin (2016), "Why should I trust you?
    Explaining the predictions of any classifier" (KDD), section 6.4: a classifier of wolves and
    huskies trained on photographs where the wolves stood in snow learnt to answer "wolf" from
    the snow.

    ``n`` images, classes in turn: ``"husky"`` a circle, ``"wolf"`` a triangle (the shapes,
    sizes and places of :func:`shapes`), in a mid-tone colour that stands out from both
    backgrounds. A share ``cue_share`` of the images (drawn at random) have the background
    that agrees with their class, snow for a wolf and grass for a husky; the others the other
    one. ``swap=True`` gives the same images with each background swapped (snow for grass),
    the test that shows a model answering from the background. Reproducible from ``seed``.
    """
    if not 0.0 <= cue_share <= 1.0:
        raise RequestError(f"cue_share must be in [0, 1], not {cue_share}")
    if n < 1:
        raise RequestError(f"n must be at least 1, not {n}")
    # every other image of shapes() is a circle or a triangle (classes 0 and 2), in turn
    base = shapes(2 * n, size=size, seed=seed)
    chosen = torch.arange(0, 2 * n, 2)
    masks = base.masks[chosen].numpy()
    labels = (base.labels[chosen] == SHAPES.index(SNOW_SHAPES[1])).long()
    rng = np.random.default_rng([seed, 2])
    agrees = rng.uniform(0.0, 1.0, n) < cue_share
    snowy = (labels.numpy() == 1) == agrees
    if swap:
        snowy = ~snowy
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for k in range(n):
        white, green = _backgrounds(rng, size)
        picture = white if snowy[k] else green
        colour = rng.uniform(0.35, 0.6, 3)
        animal = np.clip(colour + rng.normal(0, 0.03, (size, size, 3)), 0, 1)
        picture = np.where(masks[k][..., None], animal, picture)
        images[k] = picture.transpose(2, 0, 1)
    return Snow(
        torch.from_numpy(images),
        labels,
        base.boxes[chosen],
        torch.from_numpy(masks),
        classes=SNOW_CLASSES,
        snowy=torch.from_numpy(snowy),
        cue_share=cue_share,
        swapped=swap,
    )


BRODEN_FIELDS = ("image", "split", "ih", "iw", "sh", "sw")  # the index's first six columns


@dataclass(frozen=True)
class Broden:
    """Images and concept masks read from a Broden-style folder (:func:`read_broden`).

    ``images`` (N, 3, H, W) in [0, 1]; ``masks`` ``{concept: (N, h, w) bool}`` at the
    segmentation resolution, covering the same view as the images; ``categories`` ``{concept:
    categories it was labelled in}``; ``annotated`` ``{concept: (N,) bool}``, the images that
    carry any label of the concept's categories (the only images Bau et al. count for it);
    ``files`` the image paths as the index names them."""

    images: Tensor
    masks: dict[str, Tensor]
    categories: dict[str, tuple[str, ...]]
    annotated: dict[str, Tensor]
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class BrodenFolder:
    """A Broden-style folder read lazily (:func:`read_broden` with ``lazy=True``): the chosen
    images' paths and labels, with pictures and masks decoded only for the images asked for
    (:meth:`read_images`, :meth:`read_masks`), so that dissection holds one chunk at a time.

    ``concepts`` the concept names (in label-number order); ``labels`` ``{concept: its label
    numbers}``; ``categories``, ``annotated`` and ``files`` as in :class:`Broden`;
    ``entries`` per image, its ``(category, cell entry)`` pairs; ``image_size`` and
    ``mask_size`` (H, W) the sizes everything is decoded at."""

    folder: Path
    files: tuple[str, ...]
    entries: tuple[tuple[tuple[str, str], ...], ...]
    labels: dict[str, tuple[int, ...]]
    categories: dict[str, tuple[str, ...]]
    annotated: dict[str, Tensor]
    image_size: tuple[int, int]
    mask_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def concepts(self) -> list[str]:
        return list(self.labels)

    def read_images(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Images ``start:stop`` as (n, 3, H, W) in [0, 1] (resized bilinearly if needed)."""
        height, width = self.image_size
        pictures = []
        for name in self.files[start:stop]:
            with Image.open(_broden_file(self.folder, name)) as picture:
                picture = picture.convert("RGB")
                if picture.size != (width, height):
                    picture = picture.resize((width, height), Image.Resampling.BILINEAR)
                pictures.append(np.asarray(picture, dtype=np.float32) / 255.0)
        return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous()

    def read_masks(self, start: int = 0, stop: int | None = None) -> Tensor:
        """The masks of images ``start:stop`` as (n, C, h, w) bool, concepts in the order of
        :attr:`concepts` (a label named twice, or in two categories: the union)."""
        column = {n: c for c, name in enumerate(self.labels) for n in self.labels[name]}
        rows = self.entries[start:stop]
        masks = torch.zeros(len(rows), len(self.labels), *self.mask_size, dtype=torch.bool)
        for i, entries in enumerate(rows):
            for _, entry in entries:
                codes = _broden_entry(self.folder, entry, self.mask_size)
                for number in np.unique(codes).tolist():
                    if number in column:
                        masks[i, column[number]] |= torch.from_numpy(codes == number)
        return masks

    def load(self) -> Broden:
        """Everything decoded, as an in-memory :class:`Broden` ((N, h, w) bool per concept)."""
        masks = {
            name: torch.zeros(len(self), *self.mask_size, dtype=torch.bool) for name in self.labels
        }
        for start in range(0, len(self), 64):
            chunk = self.read_masks(start, start + 64)
            for c, name in enumerate(self.labels):
                masks[name][start : start + 64] = chunk[:, c]
        return Broden(self.read_images(), masks, self.categories, self.annotated, self.files)


def _broden_labels(folder: Path) -> dict[int, str]:
    import csv

    path = folder / "label.csv"
    if not path.is_file():
        raise RequestError(f"{folder} is not a Broden folder: no label.csv (number,name,...)")
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if not {"number", "name"} <= set(reader.fieldnames or ()):
            raise RequestError(f"{path} must have the columns number and name")
        try:
            return {int(row["number"]): row["name"] for row in reader}
        except ValueError as error:
            raise RequestError(f"{path}: a label number is not an integer ({error})") from None


def _broden_file(folder: Path, name: str) -> Path:
    """A file the index names: under ``images/`` (the Broden layout), else under the folder."""
    path = folder / "images" / name
    if not path.is_file() and (folder / name).is_file():
        path = folder / name
    if not path.is_file():
        raise RequestError(f"{folder}: index.csv names {name}, which is not in images/")
    return path


def _broden_entry(folder: Path, entry: str, size: tuple[int, int]) -> np.ndarray:
    """The label numbers (h, w) of one index cell entry: a whole-image label (a decimal
    number), or a segmentation PNG whose pixels encode them as red + 256 * green."""
    if entry.isdigit():
        return np.full(size, int(entry), dtype=np.int64)
    with Image.open(_broden_file(folder, entry)) as picture:
        if picture.size != (size[1], size[0]):
            picture = picture.resize((size[1], size[0]), Image.Resampling.NEAREST)
        pixels = np.asarray(picture.convert("RGB"), dtype=np.int64)
    return pixels[..., 0] + 256 * pixels[..., 1]


def _broden_rows(
    path: Path, split: str | None, limit: int | None, seed: int
) -> tuple[list[str], list[dict[str, str]]]:
    """The index's category columns and its chosen rows: all those of ``split`` (every row
    when None), or ``limit`` of them drawn at random (``seed``), kept in index order."""
    import csv

    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns = list(reader.fieldnames or ())
        if columns[:6] != list(BRODEN_FIELDS):
            raise RequestError(f"{path} must begin with the columns {', '.join(BRODEN_FIELDS)}")
        matching = sum(split is None or row["split"] == split for row in reader)
    if not matching:
        raise RequestError(f"{path} has no images" + (f" in split {split!r}" * bool(split)))
    chosen = set(range(matching))
    if limit is not None and limit < matching:
        rng = np.random.default_rng(seed)
        chosen = set(rng.choice(matching, size=limit, replace=False).tolist())
    rows, index = [], 0
    with path.open(newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            if split is None or row["split"] == split:
                if index in chosen:
                    rows.append(row)
                index += 1
    return columns[6:], rows


def read_broden(
    folder: str | os.PathLike,
    categories: list[str] | tuple[str, ...] | None = None,
    limit: int | None = None,
    split: str | None = None,
    size: tuple[int, int] | None = None,
    seed: int = 0,
    lazy: bool = False,
) -> Broden | BrodenFolder:
    """Read a Broden-style folder (Bau et al. 2017, "Network Dissection", CVPR, section 2.1)
    for ``cl.features.dissect``: the images of the index (of ``split`` when given), or
    ``limit`` of them drawn at random (``seed``) from the whole index, kept in index order;
    with the labels of ``categories`` (default: all).

    The layout, as the Broden data set's README describes it: ``index.csv`` with the columns
    ``image, split, ih, iw, sh, sw`` (image and segmentation heights and widths) and one column
    per category (``color, object, material, part, scene, texture``, or any other set); each
    category cell holds zero or more ``;``-separated entries, a decimal number (a whole-image
    label, as scenes and textures are) or the file name of a PNG whose pixels encode their
    labels as red + 256 * green; file names are relative to ``images/``. ``label.csv`` gives
    each label ``number`` its ``name``. Assumed, as the README does not say it: label 0 means
    "no label"; a label named twice (or in two categories) is one concept, the union of its
    masks.

    Every chosen image's segmentations are decoded once to find which concepts occur (those
    that never do are left out) and which categories each image is labelled in. ``lazy=True``
    returns a :class:`BrodenFolder` that decodes pictures and masks again only when asked,
    chunk by chunk (what ``dissect`` needs for a large sample); otherwise a :class:`Broden`
    with everything in memory (masks (N, h, w) bool per concept: memory grows with images x
    concepts). All images must share one size and all masks another, unless ``size`` (H, W)
    is given: then images are resized to it (bilinear) and masks too (nearest).
    """
    folder = Path(folder)
    if not (folder / "index.csv").is_file():
        raise RequestError(f"{folder} is not a Broden folder: no index.csv")
    if limit is not None:
        limit = positive_int("limit", limit)
    seed = positive_int("seed", seed, minimum=0)
    names = _broden_labels(folder)
    known, rows = _broden_rows(folder / "index.csv", split, limit, seed)
    wanted = list(known) if categories is None else list(categories)
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise RequestError(f"unknown categories {unknown}; this index has {', '.join(known)}")
    entries: list[tuple[tuple[str, str], ...]] = []
    seen: list[set[str]] = []  # per image: the categories it has labels of
    label_categories: dict[int, set[str]] = {}
    shapes_seen: tuple[tuple[int, int], tuple[int, int]] | None = None
    for row in rows:
        try:
            image_size = (int(row["ih"]), int(row["iw"]))
            mask_size = (int(row["sh"]), int(row["sw"]))
        except ValueError:
            raise RequestError(f"index.csv: bad sizes for {row['image']}") from None
        if size is None and shapes_seen not in (None, (image_size, mask_size)):
            raise RequestError(
                f"{row['image']} is {image_size} (masks {mask_size}), the first image "
                f"{shapes_seen[0]} (masks {shapes_seen[1]}): give size=(H, W)"
            )
        shapes_seen = shapes_seen or (image_size, mask_size)
        mask_target = tuple(size) if size is not None else shapes_seen[1]
        _broden_file(folder, row["image"])  # it exists
        cells = [(c, e.strip()) for c in wanted for e in (row[c] or "").split(";") if e.strip()]
        present: set[str] = set()
        for category, entry in cells:
            for number in np.unique(_broden_entry(folder, entry, mask_target)).tolist():
                if number == 0:
                    continue
                if number not in names:
                    raise RequestError(f"{entry}: label {number} is not in label.csv")
                label_categories.setdefault(number, set()).add(category)
                present.add(category)
        entries.append(tuple(cells))
        seen.append(present)
    labels: dict[str, list[int]] = {}
    concept_categories: dict[str, set[str]] = {}
    for number in sorted(label_categories):
        labels.setdefault(names[number], []).append(number)
        concept_categories.setdefault(names[number], set()).update(label_categories[number])
    record = BrodenFolder(
        folder,
        tuple(row["image"] for row in rows),
        tuple(entries),
        {name: tuple(numbers) for name, numbers in labels.items()},
        {name: tuple(sorted(cats)) for name, cats in concept_categories.items()},
        {
            name: torch.tensor([bool(cats & present) for present in seen])
            for name, cats in concept_categories.items()
        },
        tuple(size) if size is not None else shapes_seen[0],
        tuple(size) if size is not None else shapes_seen[1],
    )
    return record if lazy else record.load()
