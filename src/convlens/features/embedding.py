"""What the last layers make of images: embeddings, nearest neighbours and t-SNE maps.

Krizhevsky, Sutskever & Hinton 2012, "ImageNet Classification with Deep Convolutional Neural
Networks" (NeurIPS), section 6.1 and Fig. 4: images whose last-hidden-layer vectors are close
are alike to the network, not in their pixels. van der Maaten & Hinton 2008, "Visualizing Data
using t-SNE" (JMLR), as used on CNN codes by Karpathy (2014).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from convlens import viz
from convlens.checks import RequestError
from convlens.engine import session
from convlens.features.common import Features, layer_outputs
from convlens.hooks import call_order
from convlens.model import Model, as_model

__all__ = ["check_distinct", "embed", "neighbours", "tsne"]


def check_distinct(vectors: Tensor) -> None:
    """Refuse embeddings t-SNE cannot place: fewer than 2 distinct ones, or non-finite values
    (scikit-learn's t-SNE crashes the process, SIGSEGV, on all-identical points)."""
    if vectors.dim() != 2 or len(vectors) < 2:
        raise RequestError(f"t-SNE needs at least 2 embeddings, not {tuple(vectors.shape)}")
    if not bool(torch.isfinite(vectors).all()):
        raise RequestError("t-SNE needs finite embeddings; the model gave NaN or infinite values")
    if len(torch.unique(vectors.double(), dim=0)) < 2:
        raise RequestError(
            f"t-SNE needs at least 2 distinct embeddings; the {len(vectors)} images all have "
            "the same one (identical images?)"
        )


def _penultimate(model: Model, x: Tensor) -> str:
    """The last nn.Linear a forward pass calls: its input is the penultimate representation."""
    linears = {m: n for n, m in model.module.named_modules() if isinstance(m, nn.Linear)}
    with session(model, x[:1], progress=False) as engine:
        order = call_order(lambda: engine.forward(x[:1]), linears)
    if not order:
        raise RequestError("the model calls no nn.Linear; give the layer to embed from")
    return linears[order[-1]]


def _embeddings(
    model: Model, x: Tensor, layer: str | nn.Module | None, batch_size: int | None
) -> tuple[Tensor, str]:
    if layer is None:
        name = _penultimate(model, x)
        vectors = layer_outputs(model, x, name, batch_size, inputs=True)
        return vectors.flatten(1), f"input of {name}"
    name = layer if isinstance(layer, str) else model.layer_name(layer)
    vectors = layer_outputs(model, x, name, batch_size)
    if vectors.dim() == 4:  # feature maps: global average pooling
        vectors = vectors.mean(dim=(2, 3))
    return vectors.flatten(1), name


def embed(
    model: Model | nn.Module,
    images: Any,
    layer: str | nn.Module | None = None,
    batch_size: int | None = None,
) -> Features:
    """One vector per image: the input of the last linear layer (the penultimate layer) by
    default, or a layer's output (feature maps averaged over space). ``data["embeddings"]`` is
    (N, D); the picture shows the first two principal components."""
    wrapped = as_model(model)
    x = wrapped.inputs(images)
    vectors, name = _embeddings(wrapped, x, layer, batch_size)
    centred = vectors - vectors.mean(dim=0)
    components = (
        torch.linalg.svd(centred, full_matrices=False).Vh[:2]
        if len(x) > 1
        else torch.eye(2, vectors.shape[1])
    )
    points = centred @ components.T
    picture = _scatter(
        points.numpy(), None, None, f"embeddings ({name}), first two principal components"
    )
    return Features(
        "embed", {"embeddings": vectors}, picture, {"layer": name, "shape": list(vectors.shape)}
    )


def neighbours(
    model: Model | nn.Module,
    query: Any,
    images: Any,
    k: int = 5,
    layer: str | nn.Module | None = None,
    batch_size: int | None = None,
) -> Features:
    """The ``k`` images closest to ``query`` in feature space (Euclidean distance between
    embeddings, as Krizhevsky et al.) beside the ``k`` closest in pixel space.

    ``data``: ``feature_indices``/``feature_distances`` and ``pixel_indices``/``pixel_distances``.
    """
    wrapped = as_model(model)
    q = wrapped.inputs(query)[:1]
    x = wrapped.inputs(images)
    if not 1 <= k <= len(x):
        raise RequestError(f"k must be between 1 and the number of images ({len(x)}), not {k}")
    vectors, name = _embeddings(wrapped, torch.cat([q, x]), layer, batch_size)
    exact = "donot_use_mm_for_euclid_dist"  # the fast form loses digits near zero
    feature = torch.cdist(vectors[:1], vectors[1:], compute_mode=exact)[0]
    pixel = torch.cdist(q.flatten(1).float(), x.flatten(1).float(), compute_mode=exact)[0]
    f_dist, f_idx = feature.topk(k, largest=False)
    p_dist, p_idx = pixel.topk(k, largest=False)
    pictures = wrapped.to_display(torch.cat([q, x[f_idx], q, x[p_idx]]))
    tiles = [Image.fromarray(p) for p in pictures]
    titles = (
        ["query"]
        + [f"features {d:.2f}" for d in f_dist]
        + ["query"]
        + [f"pixels {d:.1f}" for d in p_dist]
    )
    picture = viz.grid(tiles, titles, columns=k + 1, cell=112, padding=2)
    data = {
        "feature_indices": f_idx,
        "feature_distances": f_dist,
        "pixel_indices": p_idx,
        "pixel_distances": p_dist,
    }
    return Features("neighbours", data, picture, {"layer": name, "k": k})


def tsne(
    model: Model | nn.Module,
    images: Any,
    labels: Any = None,
    layer: str | nn.Module | None = None,
    perplexity: float = 30.0,
    seed: int = 0,
    thumbnails: int = 60,
    batch_size: int | None = None,
) -> Features:
    """A 2-D t-SNE map of the embeddings (scikit-learn), points coloured by ``labels`` and up to
    ``thumbnails`` images drawn at their places. ``data``: ``points`` (N, 2), ``embeddings``."""
    from sklearn.manifold import TSNE

    wrapped = as_model(model)
    x = wrapped.inputs(images)
    if len(x) < 5:
        raise RequestError("t-SNE needs at least 5 images")
    vectors, name = _embeddings(wrapped, x, layer, batch_size)
    check_distinct(vectors)
    perplexity = min(perplexity, (len(x) - 1) / 3)
    points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        vectors.double().numpy()
    )
    label_array = None if labels is None else np.asarray(torch.as_tensor(labels))
    shown = min(thumbnails, len(x))
    pictures = wrapped.to_display(x[:shown]) if shown else None
    picture = _scatter(points, label_array, pictures, f"t-SNE of {name}", wrapped.labels)
    data = {"points": torch.from_numpy(points), "embeddings": vectors}
    return Features("tsne", data, picture, {"layer": name, "perplexity": perplexity})


def _scatter(
    points: np.ndarray,
    labels: np.ndarray | None,
    pictures: np.ndarray | None,
    title: str,
    names: list[str] | None = None,
) -> Image.Image:
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    figure, axes = viz.new_figure((7, 6))
    if labels is None:
        axes.scatter(points[:, 0], points[:, 1], s=12)
    else:
        for value in np.unique(labels):
            chosen = labels == value
            name = names[int(value)] if names and 0 <= int(value) < len(names) else str(value)
            axes.scatter(points[chosen, 0], points[chosen, 1], s=12, label=name)
        axes.legend(fontsize=8, markerscale=2)
    if pictures is not None:
        for point, picture in zip(points, pictures, strict=False):
            thumb = OffsetImage(np.asarray(Image.fromarray(picture).resize((28, 28))), zoom=1)
            axes.add_artist(AnnotationBbox(thumb, point, frameon=False))
    axes.set_title(title, fontsize=10)
    axes.set_xticks([])
    axes.set_yticks([])
    return viz.figure_image(figure)
