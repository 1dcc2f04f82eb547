"""The README's walkthrough (issue 17, part 7), run as written: every command between its
``<!-- walkthrough -->`` markers, in a fresh folder with ``examples/`` beside it, through a shell
(globs included), each checked for exit status 0; then what each step promises."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import convlens as cl

ROOT = Path(__file__).resolve().parents[1]


def walkthrough_commands() -> list[str]:
    text = (ROOT / "README.md").read_text("utf-8")
    found = re.search(r"<!-- walkthrough -->\n```sh\n(.*?)```\n<!-- /walkthrough -->", text, re.S)
    assert found, "the README has no walkthrough block"
    return [line for line in found.group(1).splitlines() if line.strip()]


def test_the_walkthrough_names_the_four_steps():
    commands = walkthrough_commands()
    assert [c.split()[:2] for c in commands[1:]] == [
        ["convlens", "train"],
        ["convlens", "explain"],
        ["convlens", "evaluate"],
    ]
    assert "--arch examples/nets.py:resnet_small" in commands[1]
    assert "--methods all --target top:2" in commands[2] and "--boxes" in commands[3]


@pytest.mark.slow
def test_the_readme_walkthrough_runs_end_to_end(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["TQDM_DISABLE"] = "1"
    for command in walkthrough_commands():
        done = subprocess.run(
            ["bash", "-c", command.replace("python ", f"{sys.executable} ", 1)],
            cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stderr[-2000:])

    # 1. the folders and their boxes
    assert len(list((tmp_path / "photos").glob("*/*.png"))) == 90
    assert (tmp_path / "held-out" / "boxes.csv").read_text().count("\n") == 16
    # 2. the checkpoint rebuilds the factory's network with a 3-class head
    saved = torch.load(tmp_path / "shapes.pt", map_location="cpu", weights_only=True)
    assert saved["factory"].endswith("examples/nets.py:resnet_small") and saved["head"] == "fc"
    model = cl.load_model(tmp_path / "shapes.pt")
    assert model.labels == ["circle", "square", "triangle"] and model.module.fc.out_features == 3
    assert saved["training"]["val_accuracy"] > 0.8
    # 3. every method, two classes per image, raw maps saved
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    first = results["images"][0]
    assert len(first["methods"]) == len(cl.list_methods()) and not results["refused"]
    ranks = first["methods"]["gradcam"]["top"]
    assert [r["class"] for r in ranks] == [t["class"] for t in first["top5"][:2]]
    arrays = np.load(tmp_path / "report" / first["attributions"])
    maps = sum(1 if cl.get_method(m).prediction_only else 2 for m in cl.list_methods())
    assert len(arrays.files) == maps and arrays["gradcam@2"].dtype == np.float32
    # 4. the evaluation on the held-out boxes
    evaluation = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    rows = {row["method"]: row for row in evaluation["summary"]}
    assert set(rows) == {"gradcam", "integrated_gradients", "occlusion", "rise"}
    assert all(row["images"] == 15 for row in rows.values())
    assert rows["gradcam"]["pointing"] > 0.5
    assert (tmp_path / "evaluation" / "index.html").is_file()
