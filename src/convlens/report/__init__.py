"""The HTML report of ``convlens explain``: :func:`explain_images` checks the request, does
the work and writes the report folder as one unit (pictures, ``results.json``, ``index.html``),
returning the document; :func:`write` renders a document into a folder again."""

from convlens.report.page import render, write
from convlens.report.run import (
    check_methods,
    check_report_folder,
    check_request,
    explain_images,
    ranking,
)

__all__ = [
    "check_methods",
    "check_report_folder",
    "check_request",
    "explain_images",
    "ranking",
    "render",
    "write",
]
