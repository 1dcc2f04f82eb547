"""Records display themselves in Jupyter: ``_repr_png_`` gives PNG bytes, ``_repr_html_`` a
figure with an escaped caption, and neither touches pyplot."""

from __future__ import annotations

import ast
import base64
import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import tiny, tiny_input
from PIL import Image

import convlens as cl
from convlens import metrics, viz


def opened(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    picture = Image.open(io.BytesIO(data))
    picture.load()
    return picture


def inlined(html: str) -> list[Image.Image]:
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return [opened(base64.b64decode(data)) for data in found]


def small_model() -> cl.Model:
    return cl.wrap(tiny(head="gap"), input_size=(8, 8), labels=[f"class {k}" for k in range(5)])


def test_explanation_displays_itself_with_an_escaped_caption():
    e = cl.explain(small_model(), tiny_input(2), "input_x_gradient", target=1)
    picture = opened(e._repr_png_())
    assert picture.size == e._sheet().size and picture.size[0] > 8  # both inputs
    evil = dataclasses.replace(e, labels=["<script>alert(1)</script>", "a & b"])
    html = evil._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "a &amp; b (1)" in html and re.search(
        r"<figcaption[^>]*>input_x_gradient: .*, \d+\.\d\d s", html
    )
    assert "linear-gradient(to right" in html  # a colour bar per input
    shown = inlined(html)
    assert len(shown) >= 2 and shown[0].size == (8, 8)
    assert [p.tobytes() for p in shown[:1]] == [e.overlay(0).tobytes()]


def test_many_inputs_show_the_first_sixteen():
    e = cl.explain(small_model(), tiny_input(18), "saliency")
    html = e._repr_html_()
    assert len(inlined(html)) == 16 and "first 16 of 18 inputs" in html
    assert opened(e._repr_png_()).size == e._sheet(16).size


def test_feature_records_display_themselves():
    f = cl.features.filters(small_model())
    assert opened(f._repr_png_()).size == f.image.size
    html = f._repr_html_()
    assert "filters, layer conv1" in html and len(inlined(html)) == 1
    g = dataclasses.replace(f, name="<b>", info={"layer": "x<y"})
    assert "&lt;b&gt;, layer x&lt;y" in g._repr_html_()


def test_curves_and_sanity_records_display_themselves():
    model, x = small_model(), tiny_input(2)
    e = cl.explain(model, x, "saliency")
    curve = metrics.deletion(model, x, e, steps=4)
    assert opened(curve._repr_png_()).size == curve.plot().size
    html = dataclasses.replace(curve, targets=["<contrast>", 3])._repr_html_()
    assert "deletion AUC, input 0 (class &lt;contrast&gt;): " in html and len(inlined(html)) == 1
    region = metrics.region_perturbation(model, x, e, patch=4)
    assert opened(region._repr_png_()).size == region.plot().size
    check = metrics.sanity(model, x[:1], "saliency")
    assert opened(check._repr_png_()).size == check.plot().size
    html = check._repr_html_()
    assert html.count("<img") == 1 and "of 1 maps still correlated" in html


def test_displaying_never_imports_pyplot():
    script = (
        "import json, sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from conftest import tiny, tiny_input\n"
        "import convlens as cl\n"
        "from convlens import metrics\n"
        "model = cl.wrap(tiny(head='gap'), input_size=(8, 8))\n"
        "x = tiny_input(1)\n"
        "e = cl.explain(model, x, 'integrated_gradients', steps=4)\n"
        "e._repr_html_(), e._repr_png_()\n"
        "metrics.deletion(model, x, e, steps=3)._repr_png_()\n"
        "cl.features.filters(model)._repr_html_()\n"
        "print(json.dumps('matplotlib.pyplot' in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) is False


def test_html_figure_escapes_and_inlines():
    picture = Image.new("RGB", (3, 2), "red")
    html = viz.html_figure([picture], 'say "<hi>"')
    assert "&lt;hi&gt;" in html and "<hi>" not in html
    assert inlined(html)[0].tobytes() == picture.tobytes()


def readme_cells() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8")
    block = re.search(r"<!-- notebook -->\n(.*?)<!-- /notebook -->", text, re.S)
    assert block, "the README has no notebook section"
    return re.findall(r"```python\n(.*?)```", block.group(1), re.S)


def test_the_readme_notebook_runs_and_every_cell_displays_something():
    """The README's notebook cells, run as Jupyter would: each cell's last expression is shown
    through its richest ``_repr_*_``."""
    cells, namespace, shown = readme_cells(), {}, []
    assert len(cells) >= 4 and cells[0].startswith("import convlens as cl")
    for cell in cells:
        tree = ast.parse(cell)
        *body, last = tree.body
        assert isinstance(last, ast.Expr), cell
        exec(compile(ast.Module(body, []), "<cell>", "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
        if hasattr(value, "_repr_html_"):
            assert inlined(value._repr_html_())
        else:
            opened(value._repr_png_())
        shown.append(type(value).__name__)
    assert shown[0] == "Explanation" and {"Curve", "Sanity"} <= set(shown)
