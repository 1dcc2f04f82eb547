"""Where an audit's images come from: an image folder (class sub-folders give the true labels),
a CSV or Parquet table of image paths (optional ``label`` and box columns ``x0,y0,x1,y1``), or a
list of paths.

A source is a list of small :class:`Item` records (a path, a label, boxes); the images
themselves are read only when a chunk of them is explained, so memory does not grow with the
data set's images.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convlens.boxes import match_images, read_boxes
from convlens.checks import RequestError, RequestTypeError
from convlens.files import printable
from convlens.train import scan_folder

__all__ = ["Item", "Source", "chunks", "image_seed", "open_source"]

PATH_COLUMNS = ("path", "image")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
Box4 = tuple[float, float, float, float]


@dataclass(frozen=True)
class Item:
    """One image of a source.

    Attributes:
        index: its place in the source (rows of the results are ordered by it).
        image: its name: the path relative to the folder, or as the table or list gives it. The
            per-image seed is derived from it, so it does not depend on where the run happens.
        path: the file to read, absolute (Ray workers run in folders of their own).
        label: the true class name, when known.
        boxes: ground-truth boxes ``(x0, y0, x1, y1)`` in the original picture's pixels.
    """

    index: int
    image: str
    path: str
    label: str | None = None
    boxes: tuple[Box4, ...] = ()


@dataclass(frozen=True)
class Source:
    """The images of an audit and a description of where they came from (``kind``: folder,
    table or list; ``origin``: the folder or file)."""

    items: list[Item]
    kind: str
    origin: str

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """A short hash of every item: a restart on changed data is told apart."""
        digest = hashlib.blake2b(digest_size=8)
        for item in self.items:
            digest.update(repr((item.image, item.path, item.label, item.boxes)).encode())
        return digest.hexdigest()


def image_seed(seed: int, image: str) -> int:
    """The seed of random methods for one image: a stable hash (BLAKE2b) of ``seed`` and the
    image's name, so the result does not depend on the worker or the order of work."""
    digest = hashlib.blake2b(f"{int(seed)}\0{image}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _box_table(boxes: str | os.PathLike | None, names: list[str]) -> list[tuple[Box4, ...]]:
    if boxes is None:
        return [() for _ in names]
    table = read_boxes(boxes)
    keys = match_images(table, names)
    return [tuple(b.xyxy for b in table[k]) if k is not None else () for k in keys]


def _from_folder(root: Path, boxes: str | os.PathLike | None) -> Source:
    folder = scan_folder(root)
    names = [p.relative_to(root).as_posix() for p in folder.files]
    if boxes is None and (root / "boxes.csv").is_file():
        boxes = root / "boxes.csv"  # what convlens.datasets.shapes_folder writes
    found = _box_table(boxes, names)
    items = [
        Item(i, name, str(path), folder.classes[label], found[i])
        for i, (name, path, label) in enumerate(
            zip(names, folder.files, folder.labels, strict=True)
        )
    ]
    return Source(items, "folder", str(root.resolve()))


def _read_table(path: Path) -> Any:
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.csv as pacsv

        return pacsv.read_csv(path)
    except ImportError:
        raise RequestError(
            "reading a table of images needs pyarrow (pip install pyarrow)"
        ) from None
    except Exception as error:  # pyarrow's own errors carry no common base
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RequestError(f"cannot read {printable(path)}: {first}") from None


def _from_table(path: Path, boxes: str | os.PathLike | None) -> Source:
    table = _read_table(path)
    columns = table.column_names
    column = next((c for c in PATH_COLUMNS if c in columns), None)
    if column is None:
        raise RequestError(
            f"{printable(path)} needs a 'path' or 'image' column; it has {', '.join(columns)}"
        )
    has_boxes = all(c in columns for c in BOX_COLUMNS)
    if any(c in columns for c in BOX_COLUMNS) and not has_boxes:
        raise RequestError(f"{printable(path)}: box columns need all of {', '.join(BOX_COLUMNS)}")
    data = table.to_pydict()
    names = [str(v) for v in data[column]]
    labels = data.get("label", [None] * len(names))
    extra = _box_table(boxes, list(dict.fromkeys(names))) if boxes is not None else None
    extra_of = dict(zip(dict.fromkeys(names), extra, strict=True)) if extra is not None else {}
    order: dict[str, int] = {}
    gathered: dict[str, list[Box4]] = {}
    label_of: dict[str, str | None] = {}
    for row, name in enumerate(names):
        if name not in order:
            order[name] = len(order)
            gathered[name] = list(extra_of.get(name, ()))
            label_of[name] = None if labels[row] is None else str(labels[row])
        if has_boxes:  # one row per box: an image may have several
            values = [data[c][row] for c in BOX_COLUMNS]
            if all(v is not None for v in values):
                gathered[name].append(tuple(float(v) for v in values))  # type: ignore[arg-type]
    base = path.resolve().parent
    items = []
    for name, i in order.items():
        where = Path(name) if Path(name).is_absolute() else base / name
        items.append(Item(i, name, str(where), label_of[name], tuple(gathered[name])))
    return Source(items, "table", str(path.resolve()))


def _from_list(paths: Sequence[Any], boxes: str | os.PathLike | None) -> Source:
    names = [os.fspath(p) for p in paths]
    if not names:
        raise RequestError("no images given")
    if len(set(names)) != len(names):
        raise RequestError("the list of images names an image twice")
    found = _box_table(boxes, names)
    items = [Item(i, n, os.path.abspath(n), None, found[i]) for i, n in enumerate(names)]
    return Source(items, "list", "")


def open_source(data: Any, boxes: str | os.PathLike | None = None) -> Source:
    """The images of ``data``: a folder (class sub-folders; its ``boxes.csv`` is read when
    ``boxes`` is not given), a ``.csv``/``.parquet`` file with a ``path`` (or ``image``) column,
    optional ``label`` and box columns ``x0,y0,x1,y1`` (one row per box; paths relative to the
    file's folder), or a list of paths. ``boxes`` is a box file (``convlens.boxes.read_boxes``)
    matched to the images by path or name."""
    if isinstance(data, (list, tuple)):
        return _from_list(data, boxes)
    if not isinstance(data, (str, os.PathLike)):
        raise RequestTypeError(
            f"data must be a folder, a .csv/.parquet file or a list of paths, not "
            f"{type(data).__name__}"
        )
    path = Path(data)
    if path.is_dir():
        return _from_folder(path.resolve(), boxes)
    if not path.exists():
        raise RequestError(f"data not found: {printable(path)}")
    if path.suffix.lower() in (".csv", ".parquet"):
        return _from_table(path, boxes)
    raise RequestError(
        f"{printable(path)}: give a folder of class sub-folders, a .csv or .parquet file of "
        "image paths, or a list of paths"
    )


def chunks(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    """``items`` in consecutive chunks of ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
