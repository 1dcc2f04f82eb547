"""``convlens audit`` (issue 19): the command runs the audit, clusters each class's maps with
SpRAy into the ``cluster`` column, and a second run with the same arguments changes nothing."""

from __future__ import annotations

import json

import pytest

from convlens.cli import main
from convlens.datasets import shapes_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes_folder(tmp_path_factory.mktemp("audit") / "photos", 5, seed=4)


def test_audit_writes_rows_clusters_and_strategies_and_resumes(data, tmp_path, capsys):
    pd = pytest.importorskip("pandas")
    out = tmp_path / "audit"
    args = ["audit", str(data), "--model", "shapes-cnn", "--methods", "gradcam,saliency"]
    args += ["--curve-steps", "5", "--spray", "saliency", "--out", str(out)]
    assert main(args) == 0
    assert "SpRAy on saliency maps: circle:" in capsys.readouterr().err
    rows = pd.read_parquet(out / "results.parquet")
    assert len(rows) == 30 and set(rows["method"]) == {"gradcam", "saliency"}
    summary = json.loads((out / "strategies.json").read_text())
    assert [c["label"] for c in summary["classes"]] == ["circle", "square", "triangle"]
    saliency = rows[rows["method"] == "saliency"]
    for entry in summary["classes"]:
        of_class = saliency[saliency["target"] == entry["class"]]
        sizes = of_class["cluster"].value_counts().sort_index().tolist()
        assert sizes == entry["sizes"] and entry["maps"] == len(of_class)
    # every row of an image carries that image's cluster
    assert (rows.groupby("image")["cluster"].nunique() == 1).all()
    assert main(args) == 0  # the same arguments again: nothing to do, same rows
    again = pd.read_parquet(out / "results.parquet")
    assert again.drop(columns=["seconds"]).equals(rows.drop(columns=["seconds"]))


def test_audit_refuses_a_spray_method_that_is_not_selected(data, tmp_path, capsys):
    args = ["audit", str(data), "--model", "shapes-cnn", "--methods", "gradcam"]
    assert main([*args, "--spray", "lrp", "--out", str(tmp_path / "a")]) == 2
    assert "--spray lrp: not one of the selected --methods" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
