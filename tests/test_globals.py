"""``import convlens`` and drawing a picture leave the process's global settings alone.

Each check runs in a fresh interpreter: by the time a test runs here, this process has imported
convlens long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import json, sys
    import matplotlib
    import torch

    def settings():
        return {
            "backend": matplotlib.get_backend(),
            "threads": torch.get_num_threads(),
            "dtype": str(torch.get_default_dtype()),
            "grad": torch.is_grad_enabled(),
        }

    # not the defaults (one thread, float64, no grad), so a library resetting them shows
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, sys.argv[1]))
    torch.set_grad_enabled(sys.argv[2] == "grad")
    seen = {"before": settings()}
    import convlens
    seen["imported"] = settings()
    convlens.viz.curve_plot([0, 1, 2], {"a": [0, 1, 4], "b": [1, 1, 1]}, "x", "y", "title")
    convlens.viz.confusion_plot([[3, 1], [0, 4]], ["p", "q"], "confusion")
    from convlens import zoo
    from convlens.datasets import shapes
    model = zoo.shapes_model(zoo.ShapesCNN())
    data = shapes(8, seed=0)
    with torch.no_grad():
        x = model.preprocess([picture.permute(1, 2, 0).float().numpy() for picture in data.images])
    x = x.to(torch.get_default_dtype())
    convlens.features.tsne(model, x, labels=data.labels, perplexity=3)
    convlens.features.dissect(model, x, {"shape": data.masks}, "features.9")
    seen["drawn"] = settings()
    seen["pyplot"] = "matplotlib.pyplot" in sys.modules
    print(json.dumps(seen))
    """
)


def probe(backend: str, dtype: str = "float32", grad: str = "grad") -> dict[str, dict]:
    env = {**os.environ, "MPLBACKEND": backend}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, dtype, grad],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["svg", "pdf"])
def test_import_and_drawing_keep_the_matplotlib_backend(backend):
    seen = probe(backend)
    assert seen["before"]["backend"] == backend
    assert seen["imported"]["backend"] == backend
    assert seen["drawn"]["backend"] == backend
    assert not seen["pyplot"]  # figures are drawn without pyplot and its global state


@pytest.mark.parametrize(("dtype", "grad"), [("float32", "grad"), ("float64", "no_grad")])
def test_import_keeps_torch_threads_dtype_and_grad_mode(dtype, grad):
    seen = probe("svg", dtype, grad)
    assert seen["before"]["threads"] == 1
    assert seen["before"]["dtype"] == f"torch.{dtype}"
    assert seen["before"]["grad"] is (grad == "grad")
    torch_settings = ("threads", "dtype", "grad")
    for stage in ("imported", "drawn"):
        assert {k: seen[stage][k] for k in torch_settings} == {
            k: seen["before"][k] for k in torch_settings
        }, stage
