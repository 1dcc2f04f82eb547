"""``index.html`` and ``results.json`` from a report document.

The page is one self-contained file (inline CSS and script, no fonts or scripts from the
network) rendered by a Jinja2 template with autoescaping on, so file names and labels are
always escaped. Both files are written atomically.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from convlens.files import write_atomic

__all__ = ["render", "write"]


@lru_cache(maxsize=1)
def environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("convlens.report", "templates"),
        autoescape=True,  # every {{ value }} is HTML-escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _target(value: Any) -> str:
    """A recorded target as the command line writes it: ``predicted``, ``285``, ``top:3``,
    ``contrast:285,281``, ``channel:LAYER:C``, ``neuron:LAYER:C:Y:X``."""
    if isinstance(value, dict) and len(value) == 1:
        ((kind, parts),) = value.items()
        joined = ",".join if kind == "contrast" else ":".join
        return f"{kind}:{joined(str(part) for part in parts)}"
    return str(value)


def render(document: dict[str, Any]) -> str:
    """The report page for ``document`` (as built by ``report.explain_images``)."""
    template = environment().get_template("report.html")
    return template.render(doc=document, num=number, target=_target)


def write(out: str | Path, document: dict[str, Any]) -> Path:
    """Write ``out/results.json`` and ``out/index.html``; returns the page's path."""
    out = Path(out)
    write_atomic(out / "results.json", json.dumps(document, indent=2).encode())
    return write_atomic(out / "index.html", render(document).encode())
