"""A benchmark with known answers: every method on ``cl.datasets.shapes`` with the bundled
shapes CNN, scored by pointing game, energy in the box, deletion and insertion AUC, the sanity
check and speed. ``convlens evaluate`` runs it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from convlens.datasets import Shapes
from convlens.model import Model

__all__ = [
    "COLUMNS",
    "EVALUATE_PARAMS",
    "evaluate_methods",
    "markdown_table",
    "model_accuracy",
    "model_inputs",
]

# Settings sized for 64x64 inputs and a quick run; the CLI's --param overrides them.
EVALUATE_PARAMS: dict[str, dict[str, Any]] = {
    "occlusion": {"window": 8, "stride": 4},
    "rise": {"n_masks": 2000, "grid": 8},
    "lime": {"n_samples": 500},
    "kernel_shap": {"n_samples": 500},
    "anchors": {"n_segments": 16, "n_samples": 2000},
    "meaningful_perturbation": {"steps": 150},
}

COLUMNS = {
    "method": "method",
    "pointing": "pointing game (hit rate)",
    "energy": "energy in box",
    "deletion": "deletion AUC (lower better)",
    "insertion": "insertion AUC (higher better)",
    "sanity": "sanity: rank corr. after randomisation (lower better)",
    "seconds": "seconds per image",
}


def model_inputs(model: Model, data: Shapes) -> torch.Tensor:
    """The data set's images normalised as the model expects (:meth:`Model.normalise`)."""
    return model.normalise(data.images)


def model_accuracy(model: Model, data: Shapes) -> float:
    """Share of the images whose class the model predicts."""
    with torch.no_grad():
        predicted = model.module.eval()(model_inputs(model, data)).argmax(dim=1)
    return float((predicted == data.labels).double().mean())


def evaluate_methods(
    model: Model,
    data: Shapes,
    methods: Sequence[str],
    params: dict[str, dict[str, Any]] | None = None,
    sanity_images: int = 4,
    steps: int = 64,
    seed: int = 0,
    batch_size: int | None = None,
    on_method: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row of scores per method, each the mean over the images (targets: true classes).

    The pointing game's 15-pixel tolerance (Zhang et al. 2016, on 224-pixel images) is scaled
    to the input size. The sanity column is the mean Spearman correlation between each map and
    the map of the fully randomised network (Adebayo et al. 2018) on the first
    ``sanity_images`` images.
    """
    from convlens import metrics
    from convlens.api import explain

    x = model_inputs(model, data)
    targets = data.labels.tolist()
    tolerance = 15 * x.shape[-1] / 224
    rows = []
    for name in methods:
        if on_method is not None:
            on_method(name)
        own = {**EVALUATE_PARAMS.get(name, {}), **(params or {}).get(name, {})}
        e = explain(
            model, x, name, target=targets, batch_size=batch_size, seed=seed, progress=False,
            **own,
        )  # fmt: skip
        shared = {"target": targets, "steps": steps, "batch_size": batch_size, "progress": False}
        check = metrics.sanity(
            model, x[:sanity_images], name, target=targets[:sanity_images], seed=seed,
            batch_size=batch_size, **own,
        )  # fmt: skip
        rows.append(
            {
                "method": name,
                "pointing": float(metrics.pointing_game(e, data.boxes, tolerance).double().mean()),
                "energy": float(metrics.energy_pointing_game(e, data.boxes).mean()),
                "deletion": float(metrics.deletion(model, x, e, **shared).auc.mean()),
                "insertion": float(metrics.insertion(model, x, e, **shared).auc.mean()),
                "sanity": float(check.spearman[-1].mean()),
                "seconds": e.seconds / len(x),
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table with the column headings of :data:`COLUMNS`."""

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row[key]) for key in COLUMNS) + " |")
    return "\n".join(lines)
