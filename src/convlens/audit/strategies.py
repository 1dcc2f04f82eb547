"""The strategies of each class in an audit: SpRAy (Lapuschkin et al. 2019) on the maps one
method gave the images of each class, the cluster of every row written into
``results.parquet`` and a summary into ``strategies.json``.

The maps are those the audit stored (reduced, ``map_size`` x ``map_size``), grouped by the class
they explain (the prediction). Every row of an image gets the cluster of that image's map by the
chosen method; ``-1`` where the image was not clustered (an error, a class with fewer than
``MIN_MAPS`` maps).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from convlens.audit.spray import spray
from convlens.checks import RequestError
from convlens.files import write_atomic

__all__ = ["MIN_MAPS", "decode_map", "strategies"]

MIN_MAPS = 4  # fewer maps of a class than this are not clustered


def decode_map(row: dict[str, Any]) -> np.ndarray:
    """The (map_size, map_size) float32 map of a ``results.parquet`` row."""
    size = int(row["map_size"])
    values = np.frombuffer(row["map"], "<f2").astype(np.float32)
    return values.reshape(size, -1) * float(row["map_scale"])


def strategies(out: str | os.PathLike, method: str, seed: int = 0) -> dict[str, Any]:
    """Cluster, per explained class, the ``method`` maps of the audit in ``out`` with SpRAy;
    writes the ``cluster`` column of ``out/results.parquet`` (replacing one there) and
    ``out/strategies.json``; returns that summary: per class, the number of maps, the number
    of clusters, their sizes and the eigenvalues the eigengap read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(out) / "results.parquet"
    table = pq.read_table(path)
    if "cluster" in table.column_names:
        table = table.drop_columns(["cluster"])
    rows = table.to_pylist()
    if not any(row["method"] == method for row in rows):
        raise RequestError(f"the audit in {out} has no maps of {method!r} (--spray METHOD)")
    usable = [
        row
        for row in rows
        if row["method"] == method and row["error"] is None and row["map"] is not None
    ]
    by_class: dict[int, list[dict[str, Any]]] = {}
    for row in usable:
        by_class.setdefault(int(row["target"]), []).append(row)
    cluster_of: dict[str, int] = {}
    summary: dict[str, Any] = {"method": method, "seed": seed, "classes": []}
    for target, members in sorted(by_class.items()):
        entry: dict[str, Any] = {
            "class": target,
            "label": members[0]["target_label"],
            "maps": len(members),
        }
        if len(members) >= MIN_MAPS:
            record = spray(np.stack([decode_map(row) for row in members]), seed=seed)
            labels = [int(label) for label in record.labels]
            for row, label in zip(members, labels, strict=True):
                cluster_of[row["image"]] = label
            entry["n_clusters"] = int(record.n_clusters)
            entry["sizes"] = np.bincount(labels, minlength=record.n_clusters).tolist()
            entry["eigenvalues"] = [float(v) for v in record.eigenvalues]
        summary["classes"].append(entry)
    column = pa.array([cluster_of.get(row["image"], -1) for row in rows], type=pa.int32())
    table = table.append_column("cluster", column)
    temporary = path.with_name(f".{path.name}.clusters")
    pq.write_table(table, temporary)
    os.replace(temporary, path)
    write_atomic(Path(out) / "strategies.json", json.dumps(summary, indent=2).encode())
    return summary
