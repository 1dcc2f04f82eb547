"""Cheap checks that flag a report's maps a user should not trust, and the spread of the scores.

- :func:`class_sensitivity`: the map for the explained class against the map for a class from
  the middle of the model's ranking for that image (:func:`other_class`), by Spearman rank
  correlation of the two 2-D heat maps (signed where the method's map is signed, so a map that
  flips sign with the class counts as class-dependent). Above :data:`CLASS_THRESHOLD` (0.9) the
  map "does not depend on the class": it shows the image, not the reason for the class
  (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"; Nie et al. 2018 show that deconvnet
  and guided backpropagation reconstruct the image whatever the class; Sixt et al. 2020 test
  class sensitivity the same way). The middle class, not the runner-up: the runner-up is often
  a near-synonym (tiger cat and Egyptian cat, missile and projectile) whose map rightly
  coincides (Grad-CAM's maps for the two correlate at 0.95-0.99 on the bundled model); nor the
  least likely class, whose Grad-CAM map is often empty (all zero after its ReLU).
- :func:`sanity_flags`: the cascading model-parameter randomisation of Adebayo et al. 2018
  (:func:`convlens.metrics.sanity`) per method on the report's images. A map whose Spearman
  rank correlation with the trained model's map stays at or above :data:`MODEL_THRESHOLD`
  (0.5, the paper's figures show faithful methods falling near 0) once every layer is random
  "does not depend on the model".
- :func:`bootstrap_interval`: Efron's percentile bootstrap interval of a mean (Efron &
  Tibshirani 1993, "An Introduction to the Bootstrap", chapter 13), seeded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from convlens.checks import RequestError, first_line
from convlens.model import Model

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "CLASS_THRESHOLD",
    "MODEL_THRESHOLD",
    "NO_CLASS_CHECK",
    "bootstrap_interval",
    "class_sensitivity",
    "not_applicable",
    "other_class",
    "plain",
    "sanity_flags",
    "spearman",
]

CLASS_THRESHOLD = 0.9
# methods whose map of a class the model does not predict means nothing, so the class check
# does not apply to them (and would only spend its sample budget)
NO_CLASS_CHECK = {
    "anchors": "anchors explains the prediction kept; a class the model does not predict has "
    "no anchor (its search would only spend the sample budget)",
    "contrast_cam": "contrast_cam explains the network's prediction only (P in 'why P rather "
    "than Q')",
}
MODEL_THRESHOLD = 0.5
BOOTSTRAP_RESAMPLES = 1000


def spearman(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float | None:
    """Spearman rank correlation of two maps of the same shape (ties get their mean rank);
    ``None`` where it is undefined (a constant map has no ranks)."""
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise RequestError(f"maps of {a.size} and {b.size} values cannot be compared")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(spearmanr(a, b).statistic)
    return value if np.isfinite(value) else None


def other_class(probabilities: Tensor, target: int) -> tuple[int, int]:
    """The class a map of ``target`` is compared with, and its rank (1 = most probable): the
    median of the other classes ranked by probability (for 1000 classes the 500th of the 999
    others; for two classes the other one)."""
    order = torch.argsort(probabilities.detach().double(), descending=True, stable=True)
    others = [int(c) for c in order if int(c) != target]
    if not others:
        raise RequestError("the model has one class: there is no other class to compare with")
    chosen = others[len(others) // 2]
    return chosen, order.tolist().index(chosen) + 1


def class_sensitivity(
    heat: Tensor, other_heat: Tensor | None, other: dict[str, Any], reason: str | None = None
) -> dict[str, Any]:
    """The record of one map's class-sensitivity check against the map ``other_heat`` of the
    class ``other`` (``{"class", "label", "probability"}``); ``reason`` when that map could not
    be computed (the method refused it)."""
    record: dict[str, Any] = {
        "statistic": "spearman",
        "threshold": CLASS_THRESHOLD,
        "other": other,
    }
    if other_heat is None:
        return {**record, "correlation": None, "flag": False, "reason": reason or "no map"}
    value = spearman(heat, other_heat)
    record["correlation"] = value
    record["flag"] = value is not None and value > CLASS_THRESHOLD
    if value is None:  # no ranks to correlate; a constant map beside a varying one differs
        constant = "this map" if float(heat.max()) == float(heat.min()) else "the other map"
        record["reason"] = f"no rank correlation: {constant} is constant"
    return record


def not_applicable(reason: str) -> dict[str, Any]:
    """The class-sensitivity record of a map whose target is not one class."""
    return {"statistic": "spearman", "threshold": CLASS_THRESHOLD, "applies": False,
            "reason": reason}  # fmt: skip


def bootstrap_interval(
    values: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """The percentile bootstrap interval (Efron 1979) of the mean of ``values``: ``resamples``
    means of samples drawn with replacement (``numpy.random.default_rng(seed)``), and their
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (linear interpolation). ``None`` for
    fewer than two values, which have no spread to resample. The resamples are drawn 100 at a
    time (the generator's stream is the same as in one draw), so memory stays at 100 x n
    indices for an audit's 20,000 images."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or len(data) < 2:
        return None
    if not 0 < level < 1:
        raise RequestError(f"level must lie in (0, 1), not {level}")
    rng = np.random.default_rng(seed)
    means = np.concatenate([
        data[rng.integers(0, len(data), size=(min(100, resamples - start), len(data)))].mean(1)
        for start in range(0, resamples, 100)
    ])  # fmt: skip
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def sanity_flags(
    model: Model,
    method: str | Callable[[Model, Tensor], Any],
    x: Tensor,
    targets: list[Any],
    params: dict[str, Any],
    seed: int,
    batch_size: int | None,
) -> dict[str, Any]:
    """Cascading randomisation (Adebayo et al. 2018) of ``method`` on the images ``x`` (one
    target each), by :func:`convlens.metrics.sanity`: every layer owning parameters is
    re-initialised from the output down, one map per step. Returns the record: the layers, the
    mean Spearman correlation after each step (over the maps that are not constant), and per
    image the final Spearman and SSIM and the flag (Spearman >= :data:`MODEL_THRESHOLD`;
    ``None`` and no flag where the trained model's map is constant, which has no ranks). A
    method that refuses the randomised network is recorded with its reason. ``method`` may
    also be a function ``(model, x) -> map``, as :func:`convlens.metrics.sanity` takes it."""
    from convlens.metrics import sanity

    try:
        result = sanity(
            model, x, method, target=targets, threshold=MODEL_THRESHOLD, seed=seed,
            batch_size=batch_size, **params,
        )  # fmt: skip
    except RequestError as error:
        name = method if isinstance(method, str) else getattr(method, "__name__", "map")
        return {"method": name, "refused": first_line(error), "threshold": MODEL_THRESHOLD}
    steps = len(result.layers)
    final = result.spearman[-1] if steps else torch.ones(len(x))
    ssim = result.ssim[-1] if steps else torch.ones(len(x))
    # a constant trained-model map has no ranks: its correlation is undefined, not 0
    ranked = [float(m.max()) != float(m.min()) for m in result.maps[0]]
    return {
        "method": result.method,
        "statistic": "spearman",
        "threshold": MODEL_THRESHOLD,
        "layers": steps,
        "first_layer": result.layers[0] if steps else None,
        "last_layer": result.layers[-1] if steps else None,
        "curve": [1.0, *(float(v) for v in result.spearman[:, ranked].mean(dim=1))]
        if any(ranked)
        else [],
        "spearman": [float(v) if r else None for v, r in zip(final, ranked, strict=True)],
        "ssim": [float(v) for v in ssim],
        "flags": [bool(v) and r for v, r in zip(result.model_independent, ranked, strict=True)],
    }


def plain(
    value: Any,
    store: Callable[[str, np.ndarray], dict[str, Any]],
    key: str = "",
    limit: int = 256,
) -> Any:
    """``value`` as JSON numbers: tensors and arrays of at most ``limit`` values as (nested)
    lists, larger ones handed to ``store(key, array)`` (which keeps them in a file and returns
    a reference), other objects by ``repr``. ``key`` is the path of the value, ``/``-joined."""
    if isinstance(value, Mapping):
        return {str(k): plain(v, store, f"{key}/{k}", limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, store, f"{key}/{i}", limit) for i, v in enumerate(value)]
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= limit else store(key.lstrip("/"), value)
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
