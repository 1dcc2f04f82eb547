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

from convlens.checks import RequestError

__all__ = [
    "SHAPES",
    "TAG_SIZE",
    "CleverHans",
    "Shapes",
    "clever_hans",
    "shapes",
    "shapes_folder",
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
