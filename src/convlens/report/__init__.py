"""The HTML report of ``convlens explain``: :func:`explain_images` does the work and returns
the document (also saved as ``results.json``), :func:`write` renders ``index.html``."""

from convlens.report.page import render, write
from convlens.report.run import explain_images, ranking

__all__ = ["explain_images", "ranking", "render", "write"]
