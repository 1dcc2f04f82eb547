"""``convlens.audit.run``: rows and columns, error rows, resuming a killed run, refusing changed
arguments, no Ray without ``engine="ray"``, and the Ray engine giving the local engine's rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convlens as cl
from convlens.audit.data import image_seed, open_source
from convlens.audit.store import RESULT_COLUMNS
from convlens.checks import RequestError
from convlens.datasets import shapes_folder

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

METHODS = ["gradcam", "saliency", "rise"]
OPTIONS: dict[str, Any] = {
    "params": {"rise": {"n_masks": 100}},
    "steps": 10,
    "chunk": 2,
    "seed": 3,
    "progress": False,
}
# a script running an audit in its own process; argv: data, out, check (no Ray imported)
SCRIPT = """
import json, sys
import convlens.audit
data, out, check = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
options = json.loads(sys.argv[4])
convlens.audit.run("shapes-cnn", data, {methods!r}, out, engine="local", **options)
if check:
    assert "ray" not in sys.modules, "the local engine imported ray"
"""


def _audit(data: Path, out: Path, check: bool = False) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = SCRIPT.format(methods=METHODS)
    arguments = [str(data), str(out), "1" if check else "0", json.dumps(OPTIONS)]
    return subprocess.Popen([sys.executable, "-c", script, *arguments], env=env)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Seven images (two per class and a corrupt one) and an uninterrupted local audit of them,
    run in a process of its own that checks Ray was not imported."""
    root = tmp_path_factory.mktemp("audit")
    data = shapes_folder(root / "data", 2)
    (data / "square" / "square_broken.png").write_bytes(b"not a picture")
    reference = root / "reference"
    process = _audit(data, reference, check=True)
    assert process.wait(timeout=120) == 0
    return data, reference


def _rows(path: Path) -> Any:
    return pd.read_parquet(path).drop(columns=["seconds"])


def _same(a: Any, b: Any) -> None:
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for column in a.columns:
        for x, y in zip(a[column], b[column], strict=True):
            both_missing = (x is None or x != x) and (y is None or y != y)
            assert both_missing or x == y, (column, x, y)


def test_rows_columns_and_errors(dataset: tuple[Path, Path]) -> None:
    reference = dataset[1]
    rows = pd.read_parquet(reference / "results.parquet")
    assert list(rows.columns) == list(RESULT_COLUMNS)
    assert len(rows) == 7 * len(METHODS)
    assert not rows.duplicated(["image", "method"]).any()
    broken = rows[rows["image"] == "square/square_broken.png"]
    assert len(broken) == len(METHODS)
    assert broken["error"].str.contains("cannot read").all()
    assert broken["map"].isna().all()
    good = rows[rows["image"] != "square/square_broken.png"]
    assert good["error"].isna().all()
    assert set(good["label"]) == {"circle", "square", "triangle"}
    assert (good["correct"] == (good["label"] == good["predicted_label"])).all()
    assert good["deletion_auc"].between(0, 1).all() and good["insertion_auc"].between(0, 1).all()
    assert good["pointing_game"].notna().all() and good["energy"].between(0, 1).all()
    assert (good["forwards"] > 0).all()
    assert (good["target"] == good["predicted"]).all()
    first = good.iloc[0]
    heat = np.frombuffer(first["map"], dtype="<f2").reshape(int(first["map_size"]), -1)
    assert heat.shape == (32, 32) and np.abs(heat).max() == 1
    rise = good[good["method"] == "rise"]
    assert list(rise["seed"]) == [image_seed(3, name) for name in rise["image"]]
    assert (good[good["method"] != "rise"]["seed"] == 3).all()
    record = json.loads((reference / "audit.json").read_text())
    assert record["methods"] == METHODS and record["seed"] == 3


def test_resume_after_kill(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    data, reference = dataset
    out = tmp_path / "killed"
    process = _audit(data, out)
    parts = out / "parts"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(parts.glob("part-*.parquet"))) >= 1:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=30)
    written = len(list(parts.glob("part-*.parquet")))
    assert 1 <= written < 4, "the run was not killed mid-way"
    assert not (out / "results.parquet").exists()
    cl.audit.run("shapes-cnn", data, METHODS, out, **OPTIONS)
    assert len(list(parts.glob("part-*.parquet"))) == 4
    _same(_rows(out / "results.parquet"), _rows(reference / "results.parquet"))


def test_changed_arguments_refused(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    data, reference = dataset
    with pytest.raises(RequestError, match=r"other arguments.*seed"):
        cl.audit.run("shapes-cnn", data, METHODS, reference, **{**OPTIONS, "seed": 4})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RequestError, match="not empty"):
        cl.audit.run("shapes-cnn", data, METHODS, tmp_path / "other", **OPTIONS)
    with pytest.raises(RequestError, match="unknown method"):
        cl.audit.run("shapes-cnn", data, ["nope"], tmp_path / "new", **OPTIONS)
    assert not (tmp_path / "new").exists()


def test_table_and_list_sources(tmp_path: Path) -> None:
    data = shapes_folder(tmp_path / "data", 1)
    table = tmp_path / "images.csv"
    table.write_text(
        "path,label,x0,y0,x1,y1\n"
        "data/circle/circle_0000.png,circle,1,2,30,40\n"
        "data/circle/circle_0000.png,circle,5,5,9,9\n"
        "data/square/square_0000.png,square,,,,\n"
    )
    source = open_source(table)
    assert [item.image for item in source.items] == [
        "data/circle/circle_0000.png",
        "data/square/square_0000.png",
    ]
    assert source.items[0].boxes == ((1, 2, 30, 40), (5, 5, 9, 9))
    assert source.items[1].boxes == () and source.items[1].label == "square"
    assert Path(source.items[0].path) == data / "circle" / "circle_0000.png"
    listed = open_source([str(data / "circle" / "circle_0000.png")], boxes=data / "boxes.csv")
    assert listed.items[0].label is None and len(listed.items[0].boxes) == 1
    rows = cl.audit.explain_batch(cl.load_model("shapes-cnn"), source.items, ["gradcam"], steps=0)
    assert len(rows) == 2 and rows[0]["deletion_auc"] is None
    assert rows[0]["pointing_game"] is not None and rows[1]["pointing_game"] is None
    model = cl.load_model("shapes-cnn")
    rows = cl.audit.explain_batch(
        model, source.items[:1], ["gradcam", "saliency"], {"gradcam": {"layer": "nope"}}, steps=0
    )
    assert "nope" in rows[0]["error"] and rows[0]["map"] is None  # the method refused
    assert rows[1]["error"] is None and rows[1]["map"] is not None  # the next one ran
    with pytest.raises(RequestError, match="nope"):
        cl.audit.run(model, table, "gradcam", tmp_path / "x", params={"gradcam": {"layer": "nope"}})
    paths = [item.path for item in source.items]
    out = cl.audit.run("shapes-cnn", paths, "gradcam", tmp_path / "out", steps=0, save_maps=True)
    assert list(pd.read_parquet(out)["image"]) == paths
    saved = np.load(tmp_path / "out" / "maps" / "part-000000.npz")
    assert saved["maps"].shape == (2, 64, 64) and list(saved["image"]) == paths


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("ray") is None, reason="needs convlens[ray]"
)
def test_ray_engine_same_rows(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    import ray

    data, reference = dataset
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray"
        out = cl.audit.run("shapes-cnn", data, METHODS, out, "ray", workers=2, **OPTIONS)
    finally:
        ray.shutdown()
    _same(_rows(out), _rows(reference / "results.parquet"))
