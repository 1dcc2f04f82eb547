"""SpRAy, Spectral Relevance Analysis (Lapuschkin, Wäldchen, Binder, Montavon, Samek and Müller
2019, "Unmasking Clever Hans predictors and assessing what machines really learn", Nature
Communications 10:1096, Methods, "Spectral relevance analysis").

SpRAy looks at many explanations of one class at once to find the strategies the model decides
that class by: a model that answers "horse" from a copyright tag in some images and from the
horse in others gives two kinds of heat maps, and clustering the maps finds the two groups
without anyone looking at each map. The paper's steps are: (1) explain every image of the
class; (2) downsize the maps to one small uniform size (cheaper, and tolerant to small shifts);
(3) spectral clustering of the maps on a nearest-neighbour affinity graph; (4) the eigengap of
the graph Laplacian's spectrum to choose the number of clusters and to spot the interesting
ones; (5) a 2-D embedding to look at them (the paper uses t-SNE).

Here: (2) average pooling to ``size`` x ``size`` (default 12), then each map divided by its
largest absolute value (a map that is all zeros stays zero), so that the maps' pattern, not
their scale, is compared; (3) a symmetric k-nearest-neighbour graph (``neighbours``, default
10; an edge where either map is among the other's nearest in Euclidean distance) whose edges
are weighted with locally scaled Gaussians (Zelnik-Manor and Perona 2004, "Self-tuning spectral
clustering": ``exp(-d_ij^2 / (s_i s_j))``, ``s_i`` the distance to i's k-th neighbour; with
plain 0/1 edges a tight group of maps, such as those of tagged images, collects edges from
scattered maps and is not cut out cleanly), the normalised Laplacian ``I - D^-1/2 A D^-1/2``
(von Luxburg 2007, "A tutorial on spectral clustering"), and k-means (seeded) on the rows of
its first ``n_clusters`` eigenvectors normalised to unit length (Ng, Jordan and Weiss 2002);
(4) without ``n_clusters``, the number of clusters is the ``k`` (1 to 10) with the largest gap
``lambda_{k+1} - lambda_k`` between consecutive smallest eigenvalues; (5) the embedding is the
Laplacian eigenmap (Belkin and Niyogi 2003) of the same graph, the 2nd and 3rd eigenvectors
scaled by ``D^-1/2``, not t-SNE: it is deterministic and shows the graph the clusters were cut
from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from convlens import viz
from convlens.checks import RequestError
from convlens.explanation import Explanation
from convlens.metrics.common import heatmaps

__all__ = ["Spray", "spray"]

MAX_CLUSTERS = 10  # the eigengap looks for at most this many clusters
EIGENVALUES = 10  # how many of the smallest eigenvalues the record keeps (at least)


@dataclass(frozen=True)
class Spray:
    """The result of :func:`spray` on N maps.

    Attributes:
        labels: (N,) int, the cluster of each map, 0 the largest cluster, then by size.
        n_clusters: the number of clusters (given, or from the eigengap when ``chosen``).
        eigenvalues: the smallest eigenvalues of the graph's normalised Laplacian, ascending
            (at least ``min(N, 10)``, and ``n_clusters + 1`` where N allows); a gap after the
            k-th says the graph falls into k groups.
        embedding: (N, 2) the maps' Laplacian eigenmap (2nd and 3rd eigenvectors scaled by
            ``D^-1/2``), for a scatter plot; its second column is zero when N = 2.
        means: (n_clusters, h, w) the mean of each cluster's downsized, normalised maps.
        chosen: whether ``n_clusters`` came from the eigengap (``n_clusters=None``).
        size: (h, w) the size the maps were downsized to.
        neighbours: the k of the nearest-neighbour graph.
        seed: the seed of k-means.
    """

    labels: np.ndarray
    n_clusters: int
    eigenvalues: np.ndarray
    embedding: np.ndarray
    means: np.ndarray
    chosen: bool
    size: tuple[int, int]
    neighbours: int
    seed: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sizes(self) -> np.ndarray:
        """(n_clusters,) how many maps each cluster holds."""
        return np.bincount(self.labels, minlength=self.n_clusters)

    def plot(self) -> Any:
        """The embedding as a scatter plot coloured by cluster, as a PIL picture."""
        figure, axes = viz.new_figure((4.5, 3.6))
        colours = [f"C{k % 10}" for k in range(self.n_clusters)]
        for k in range(self.n_clusters):
            points = self.embedding[self.labels == k]
            label = f"cluster {k} ({len(points)})"
            axes.scatter(points[:, 0], points[:, 1], s=14, c=colours[k], label=label)
        how = "eigengap" if self.chosen else "given"
        axes.set_title(f"SpRAy: {len(self)} maps, {self.n_clusters} clusters ({how})")
        axes.set_xlabel("eigenmap 1")
        axes.set_ylabel("eigenmap 2")
        axes.legend(fontsize=7, loc="best")
        return viz.figure_image(figure)

    def _repr_png_(self) -> bytes:
        """Jupyter: :meth:`plot` as PNG."""
        return viz.png_bytes(self.plot())


def _maps(maps: Any) -> Tensor:
    """(N, H, W) float maps from Explanations, a sequence of them, or an array/tensor (N, H, W)
    or (N, C, H, W) (channels summed)."""
    if isinstance(maps, Sequence) and maps and all(isinstance(m, Explanation) for m in maps):
        parts = [heatmaps(m) for m in maps]
        if len({tuple(p.shape[1:]) for p in parts}) > 1:
            raise RequestError("the Explanations' maps differ in size; SpRAy needs one size")
        return torch.cat(parts)
    if isinstance(maps, Explanation):
        return heatmaps(maps)
    try:
        table = torch.as_tensor(np.asarray(maps) if not isinstance(maps, Tensor) else maps)
    except (TypeError, ValueError, RuntimeError):
        raise RequestError(
            f"maps must be Explanations or an (N, H, W) array, not {type(maps).__name__}"
        ) from None
    if table.dim() not in (3, 4) or table.is_complex() or table.dtype == torch.bool:
        raise RequestError(
            f"maps must be (N, H, W) or (N, C, H, W) real numbers, not {tuple(table.shape)} "
            f"{table.dtype}"
        )
    if not bool(torch.isfinite(table.float()).all()):
        raise RequestError("the maps contain NaN or infinite values")
    return heatmaps(table.float())


def _downsized(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """(N, h, w): average pooled to ``size`` (never larger than the maps), each divided by its
    largest absolute value."""
    sides = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    if len(sides) != 2 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in sides
    ):
        raise RequestError(f"size must be a positive integer or two, not {size!r}")
    h, w = sides
    small = torch.nn.functional.adaptive_avg_pool2d(
        maps[:, None].double(), (min(h, maps.shape[1]), min(w, maps.shape[2]))
    )[:, 0]
    top = small.abs().flatten(1).amax(1).clamp_min(1e-300)
    return small / top[:, None, None]


def spray(
    maps: Any,
    n_clusters: int | None = None,
    seed: int = 0,
    size: int | tuple[int, int] = 12,
    neighbours: int = 10,
) -> Spray:
    """Cluster explanation maps with SpRAy (Lapuschkin et al. 2019; the steps and the choices
    made here are in this module's docstring).

    Args:
        maps: the maps of one class: an :class:`~convlens.Explanation` (its heat maps), a list
            of them, or an (N, H, W) / (N, 1, H, W) / (N, C, H, W) tensor or array (channels
            summed). At least 2 maps, all finite.
        n_clusters: the number of clusters, 1 to N; ``None``: from the eigengap (1 to 10).
        seed: seed of k-means; the same seed and maps give the same clusters.
        size: the side (or (h, w)) the maps are downsized to, by average pooling.
        neighbours: the k of the k-nearest-neighbour graph (capped at N - 1).

    Returns:
        a :class:`Spray`: the cluster of each map, the number of clusters, the Laplacian's
        smallest eigenvalues and a 2-D embedding.

    The graph is held dense (N x N): a few thousand maps take seconds; for more, run SpRAy
    on a sample of the class.
    """
    from scipy.linalg import eigh
    from scipy.sparse.csgraph import laplacian
    from sklearn.cluster import KMeans

    table = _maps(maps)
    count = table.shape[0]
    if count < 2:
        raise RequestError(f"SpRAy needs at least 2 maps, not {count}")
    if n_clusters is not None and (
        isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer))
    ):
        raise RequestError(f"n_clusters must be an integer or None, not {n_clusters!r}")
    if n_clusters is not None and not 1 <= n_clusters <= count:
        raise RequestError(f"n_clusters must be in [1, {count}] for {count} maps, not {n_clusters}")
    if isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer)):
        raise RequestError(f"neighbours must be a positive integer, not {neighbours!r}")
    if neighbours < 1:
        raise RequestError(f"neighbours must be at least 1, not {neighbours}")
    small = _downsized(table, size)
    k = min(int(neighbours), count - 1)
    points = small.flatten(1).numpy()
    affinity = _affinity(points, k)
    lap, degree = laplacian(affinity, normed=True, return_diag=True)
    wanted = max(EIGENVALUES, (n_clusters or MAX_CLUSTERS) + 1, 3)
    last = min(count, wanted) - 1
    values, vectors = eigh(lap, subset_by_index=[0, last])
    values = np.clip(values, 0.0, None)
    chosen = n_clusters is None
    if n_clusters is None:
        gaps = np.diff(values[: min(MAX_CLUSTERS, count - 1) + 1])
        n_clusters = int(np.argmax(gaps)) + 1
    n_clusters = int(n_clusters)
    labels = _cluster(vectors[:, :n_clusters], n_clusters, seed, KMeans)
    embedding = np.zeros((count, 2))
    eigenmap = vectors[:, 1:3] / degree[:, None]  # degree is sqrt(D) for normed=True
    for j in range(eigenmap.shape[1]):
        column = eigenmap[:, j]
        embedding[:, j] = column * (1.0 if column[np.argmax(np.abs(column))] >= 0 else -1.0)
    flat = small.numpy()
    means = np.zeros((n_clusters, *flat.shape[1:]))
    for c in range(n_clusters):
        if (labels == c).any():  # k-means may leave a cluster empty on repeated maps
            means[c] = flat[labels == c].mean(0)
    return Spray(
        labels=labels,
        n_clusters=n_clusters,
        eigenvalues=values,
        embedding=embedding,
        means=means,
        chosen=chosen,
        size=(int(small.shape[1]), int(small.shape[2])),
        neighbours=k,
        seed=int(seed),
    )


def _affinity(points: np.ndarray, k: int) -> np.ndarray:
    """(N, N) symmetric affinity: an edge where either point is among the other's ``k``
    nearest (Euclidean), weighted ``exp(-d_ij^2 / (s_i s_j))``, ``s_i`` the distance from point
    i to its k-th nearest (local scaling, Zelnik-Manor and Perona 2004, "Self-tuning spectral
    clustering"), so that a tight group of maps is not joined to scattered ones."""
    from scipy.spatial.distance import cdist

    distances = cdist(points, points)
    others = distances.copy()
    np.fill_diagonal(others, np.inf)
    nearest = np.argpartition(others, k - 1, axis=1)[:, :k]
    scale = np.take_along_axis(others, nearest, axis=1).max(axis=1)
    scale = np.clip(scale, max(float(scale.max()), 1.0) * 1e-12, None)
    edges = np.zeros(distances.shape, dtype=bool)
    edges[np.arange(len(points))[:, None], nearest] = True
    edges |= edges.T
    return np.where(edges, np.exp(-(distances**2) / np.outer(scale, scale)), 0.0)


def _cluster(vectors: np.ndarray, n_clusters: int, seed: int, kmeans: Any) -> np.ndarray:
    """k-means on the rows normalised to unit length (Ng, Jordan and Weiss 2002), labels
    renumbered by cluster size (largest 0; ties by first appearance)."""
    count = vectors.shape[0]
    if n_clusters == 1:
        return np.zeros(count, dtype=np.int64)
    rows = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    found = kmeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(rows)
    sizes = np.bincount(found, minlength=n_clusters)
    first = np.array([np.argmax(found == c) if sizes[c] else count for c in range(n_clusters)])
    order = sorted(range(n_clusters), key=lambda c: (-sizes[c], first[c]))
    rank = np.empty(n_clusters, dtype=np.int64)
    rank[order] = np.arange(n_clusters)
    return rank[found]
