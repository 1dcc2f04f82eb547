"""The HTML report of ``convlens explain``: :func:`explain_images` checks the request, does
the work and writes the report folder as one unit (pictures, ``results.json``, ``index.html``,
optionally each image's attributions as ``.npz``), returning the document; :func:`write`
renders a document into a folder again. :class:`Top` asks for one map per each of the k most
probable classes; :func:`load_background` draws a reference set from the user's images.
:func:`evaluate_images` scores methods on the user's images and boxes (``convlens evaluate``).

Each card names the class it explains, with its colour bar, its deletion and insertion curves
and its flags (:mod:`convlens.report.checks`: the map does not depend on the class, or, with
``sanity=True``, on the model); :func:`ranking` gives each method's mean faithfulness with a
bootstrap interval, the per-image values and the flags, under a note on what it measures."""

from convlens.report.evaluation import check_evaluation, evaluate_images
from convlens.report.inputs import (
    Background,
    Top,
    background_files,
    background_users,
    load_background,
    unused_background,
    with_background,
)
from convlens.report.page import render, write
from convlens.report.run import (
    check_methods,
    check_report_folder,
    check_request,
    explain_images,
    ranking,
)

__all__ = [
    "Background",
    "Top",
    "background_files",
    "background_users",
    "check_evaluation",
    "check_methods",
    "check_report_folder",
    "check_request",
    "evaluate_images",
    "explain_images",
    "load_background",
    "ranking",
    "render",
    "unused_background",
    "with_background",
    "write",
]
