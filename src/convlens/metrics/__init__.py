"""Evaluation of explanations: which map to trust (``cl.metrics``).

- faithfulness: :func:`deletion`, :func:`insertion` (Petsiuk et al. 2018) and
  :func:`region_perturbation` (Samek et al. 2017);
- localization: :func:`pointing_game` (Zhang et al. 2016), :func:`energy_pointing_game`
  (Wang et al. 2020), :func:`localization` (Zhou et al. 2016; Selvaraju et al. 2017),
  :func:`localization_error` (ILSVRC top-1/top-5, Zhou et al. 2016) and
  :func:`saliency_segmentation` (Simonyan et al. 2014);
- sanity: :func:`sanity`, cascading weight randomisation (Adebayo et al. 2018).
"""

from convlens.metrics.common import heatmaps
from convlens.metrics.faithfulness import (
    Curve,
    RegionPerturbation,
    deletion,
    insertion,
    region_perturbation,
)
from convlens.metrics.localization import (
    Localization,
    LocalizationError,
    box_iou,
    energy_pointing_game,
    heatmap_box,
    localization,
    localization_error,
    paper_threshold,
    pointing_game,
    saliency_segmentation,
)
from convlens.metrics.sanity import Sanity, sanity

__all__ = [
    "Curve",
    "Localization",
    "LocalizationError",
    "RegionPerturbation",
    "Sanity",
    "box_iou",
    "deletion",
    "energy_pointing_game",
    "heatmap_box",
    "heatmaps",
    "insertion",
    "localization",
    "localization_error",
    "paper_threshold",
    "pointing_game",
    "region_perturbation",
    "saliency_segmentation",
    "sanity",
]
