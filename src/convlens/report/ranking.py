"""The report's ranking of methods by faithfulness (Petsiuk et al. 2018), with its spread.

Faithfulness is insertion AUC minus deletion AUC of each map; a method's row holds its mean
over the images, Efron's percentile bootstrap 95 % interval of that mean
(:func:`~convlens.report.checks.bootstrap_interval`, 1000 resamples, seeded), the number of
images, each image's values, and how many of its maps the checks flagged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from convlens.report.checks import bootstrap_interval

__all__ = ["FAVOURED", "NOTE", "ranking"]

# Methods the metric favours, and why (shown on their rows): they optimise, or are built on, the
# perturbations that deletion (to black) and insertion (onto a blurred copy) apply.
FAVOURED = {
    "meaningful_perturbation": "optimises a mask that blurs the image: favoured by insertion",
    "occlusion": "built on the same kind of perturbation (patches removed): favoured",
    "rise": "built on the same kind of perturbation (random masks): favoured",
}

# What the ranking measures and its known biases, shown above the table and kept in results.json
NOTE = (
    "Faithfulness = insertion AUC \u2212 deletion AUC (Petsiuk et al. 2018): deletion removes "
    "the pixels the map ranks highest first (to black) and measures how fast the class "
    "probability falls (lower is better); insertion puts them back first onto a blurred copy "
    "of the image and measures how fast it rises (higher is better). It scores the order of "
    "the pixels only, on this model and these images. Known biases: the blur canvas favours "
    "maps that point at sharp detail the blur removed; methods that optimise a perturbation "
    "mask (meaningful_perturbation, whose mask blurs the image) or are built on the same kind "
    "of perturbation (occlusion, RISE) are scored by what they optimised and are favoured. "
    "With a few images the intervals are wide: rows whose intervals overlap are not "
    "distinguished. A high rank does not make a map class- or model-dependent: see the flags."
)


def ranking(
    images: list[dict[str, Any]], methods: Sequence[str], seed: int = 0
) -> list[dict[str, Any]]:
    """One row per method over the images: mean deletion AUC (lower is better), insertion AUC
    (higher is better) and their difference ``faithfulness`` (the ranking key, higher is
    better) with its bootstrap 95 % interval (``None`` for one image), ``n`` the images,
    ``per_image`` their values, mean seconds and forward passes, and ``flags``: per check
    (``class``: the map does not depend on the class; ``model``: it does not depend on the
    model, with ``--sanity``) how many maps were flagged of how many checked. Rows are in rank
    order. With a ``Top(k)`` target only the rank-1 maps (the most probable class, each image's
    ``methods[name]`` record) count, so that methods are compared on the same target as
    without it; a method refused on an image leaves it out, and so does a constant map (its
    pixels have no order, and its curves would score the raster order): ``constant`` counts
    those."""
    from convlens.registry import get_method

    rows = []
    for name in methods:
        made = [
            (image["image"], image["methods"][name])
            for image in images
            if name in image["methods"] and "refused" not in image["methods"][name]
        ]
        pairs = [(image, entry) for image, entry in made if not entry.get("constant")]
        if not pairs:
            continue
        entries = [entry for _, entry in pairs]

        def mean(key: str, entries: list[dict[str, Any]] = entries) -> float:
            return sum(float(e[key]) for e in entries) / len(entries)

        scores = [float(e["insertion"]) - float(e["deletion"]) for e in entries]
        interval = bootstrap_interval(scores, seed=seed)
        rows.append(
            {
                "method": name,
                "family": get_method(name).family,
                "deletion": mean("deletion"),
                "insertion": mean("insertion"),
                "faithfulness": mean("insertion") - mean("deletion"),
                "interval": list(interval) if interval is not None else None,
                "n": len(entries),
                "per_image": [
                    {
                        "image": image,
                        "faithfulness": score,
                        "deletion": float(e["deletion"]),
                        "insertion": float(e["insertion"]),
                    }
                    for (image, e), score in zip(pairs, scores, strict=True)
                ],
                "seconds": mean("seconds"),
                "forwards": mean("forwards"),
                "flags": {key: _count(entries, key) for key in ("class", "model")},
                "constant": len(made) - len(pairs),
                "favoured": FAVOURED.get(name),
            }
        )
    rows.sort(key=lambda row: -row["faithfulness"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _count(entries: list[dict[str, Any]], check: str) -> dict[str, int]:
    """How many of ``entries`` the check flagged, of how many it was applied to."""
    key = "class_sensitivity" if check == "class" else "sanity"
    done = [
        e[key]
        for e in entries
        if isinstance(e.get(key), dict) and e[key].get("correlation") is not None
    ]
    return {"flagged": sum(bool(r.get("flag")) for r in done), "checked": len(done)}
