"""An audit's output folder: rows written in parts, one Parquet file per chunk of images, so
that a run that is killed and started again does only the chunks that are missing.

Layout of ``DIR``:

- ``audit.json``: the arguments of the run. A restart with other arguments is refused.
- ``parts/part-000123.parquet``: the rows of chunk 123 (each written whole, atomically: a
  temporary file renamed over the name, so a part is either absent or complete).
- ``maps/part-000123.npz``: with ``save_maps``, the chunk's full-resolution maps (written
  before its part; arrays ``maps`` (N, H, W) float32, ``image`` and ``method`` (N,) str).
- ``results.parquet``: all parts in order (image, then method), written at the end
  (atomically), readable by pandas, pyarrow or DuckDB as it is.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convlens.checks import RequestError
from convlens.files import printable, write_atomic

__all__ = ["RESULT_COLUMNS", "Store", "schema"]

# column -> pyarrow type name; the order of the results' columns
RESULT_COLUMNS: dict[str, str] = {
    "index": "int64",  # the image's place in the source
    "image": "string",  # its name (relative path in a folder, as given in a table or list)
    "path": "string",  # the file read
    "method": "string",
    "label": "string",  # true class name (null when unknown)
    "predicted": "int64",
    "predicted_label": "string",
    "probability": "float64",  # of the predicted class
    "correct": "bool",  # null when the true label is unknown
    "target": "int64",  # the class the map explains
    "target_label": "string",
    "deletion_auc": "float64",
    "insertion_auc": "float64",
    "pointing_game": "bool",  # null without boxes
    "energy": "float64",  # energy pointing game; null without boxes
    "seconds": "float64",  # the image's share of the method's time
    "forwards": "int64",  # the image's share of the method's forward passes
    "seed": "int64",  # seed the method ran with (per image for random methods)
    "error": "string",  # null, or why the image or method failed
    "map": "binary",  # float16 little-endian, map_size x map_size, scaled to max |value| 1
    "map_scale": "float64",  # max |value| of the map: map * map_scale is the map's value
    "map_size": "int64",
}


def schema() -> Any:
    """The pyarrow schema of the results."""
    import pyarrow as pa

    types = {
        "int64": pa.int64(),
        "string": pa.string(),
        "float64": pa.float64(),
        "bool": pa.bool_(),
        "binary": pa.binary(),
    }
    return pa.schema([(name, types[kind]) for name, kind in RESULT_COLUMNS.items()])


def _table(rows: Sequence[Mapping[str, Any]]) -> Any:
    import pyarrow as pa

    columns = {name: [row.get(name) for row in rows] for name in RESULT_COLUMNS}
    return pa.table(columns, schema=schema())


class Store:
    """The output folder ``out`` of an audit with arguments ``record`` (JSON-able).

    Opening it checks the record against an earlier run's ``audit.json``: the same arguments
    resume it, others are a :class:`RequestError`; a folder holding anything else is refused.
    """

    def __init__(self, out: str | os.PathLike, record: Mapping[str, Any]) -> None:
        self.out = Path(out)
        self.parts = self.out / "parts"
        self.maps = self.out / "maps"
        self.record = json.loads(json.dumps(dict(record)))
        stamp = self.out / "audit.json"
        if self.out.exists() and not self.out.is_dir():
            raise RequestError(f"--out {printable(self.out)} is a file, not a folder")
        if stamp.is_file():
            earlier = json.loads(stamp.read_text())
            if earlier != self.record:
                changed = sorted(
                    k
                    for k in set(earlier) | set(self.record)
                    if earlier.get(k) != self.record.get(k)
                )
                raise RequestError(
                    f"{printable(self.out)} holds an audit run with other arguments "
                    f"({', '.join(changed)} differ); rerun with the same arguments to resume, "
                    "or give a new --out"
                )
        elif self.out.is_dir() and any(self.out.iterdir()):
            raise RequestError(
                f"{printable(self.out)} is not empty and holds no audit.json; give a new or "
                "empty --out"
            )
        else:
            write_atomic(stamp, (json.dumps(self.record, indent=2) + "\n").encode())
        self.parts.mkdir(parents=True, exist_ok=True)
        for leftover in self.parts.glob(".part-*"):  # temporaries of a killed run
            leftover.unlink(missing_ok=True)

    def part_path(self, chunk: int) -> Path:
        return self.parts / f"part-{chunk:06d}.parquet"

    def done(self) -> set[int]:
        """The chunks whose part is written."""
        found = set()
        for path in self.parts.glob("part-*.parquet"):
            try:
                found.add(int(path.stem.split("-")[1]))
            except (IndexError, ValueError):
                continue
        return found

    def write(self, chunk: int, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Write chunk ``chunk``'s rows (and, where rows carry ``full_map``, its maps)."""
        import pyarrow.parquet as pq

        full = [row for row in rows if row.get("full_map") is not None]
        if full:
            buffer = io.BytesIO()
            np.savez_compressed(
                buffer,
                maps=np.stack([np.asarray(row["full_map"], dtype=np.float32) for row in full]),
                image=np.array([row["image"] for row in full]),
                method=np.array([row["method"] for row in full]),
            )
            write_atomic(self.maps / f"part-{chunk:06d}.npz", buffer.getvalue())
        sink = io.BytesIO()
        pq.write_table(_table(rows), sink)
        return write_atomic(self.part_path(chunk), sink.getvalue())

    def consolidate(self) -> Path:
        """``results.parquet``: every part in chunk order, one part in memory at a time, written
        to a temporary file renamed over the name at the end."""
        import pyarrow.parquet as pq

        target = self.out / "results.parquet"
        handle, temporary = tempfile.mkstemp(dir=self.out, prefix=".results.")
        os.close(handle)
        try:
            with pq.ParquetWriter(temporary, schema()) as writer:
                for chunk in sorted(self.done()):
                    writer.write_table(pq.read_table(self.part_path(chunk), schema=schema()))
            os.chmod(temporary, 0o644)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return target
