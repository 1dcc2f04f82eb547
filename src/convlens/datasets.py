"""Synthetic data sets with known answers, for evaluating explanations (``cl.datasets``).

:func:`shapes` draws one object (circle, square, triangle or cross) of random size, place and
colour on a textured background of random colours. The class is the object's shape and nothing
else, so a faithful explanation must point at the object, whose box and mask are returned.
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

__all__ = ["SHAPES", "Shapes", "shapes", "shapes_folder"]

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
