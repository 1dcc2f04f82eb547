"""SpRAy (``cl.audit.spray``, Lapuschkin et al. 2019) on maps with planted groups, the
Clever-Hans shapes data (``cl.datasets.clever_hans``) and the bundled model trained on it, which
answers "circle" from a tag and whose tagged circles SpRAy sets apart."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score

import convlens as cl
from convlens.audit import Spray, spray
from convlens.checks import RequestError
from convlens.datasets import SHAPES, TAG_SIZE, clever_hans, shapes, tag, tag_box
from convlens.metrics.benchmark import model_accuracy, model_inputs

PLACES = ((4, 4), (4, 40), (40, 22))  # where each planted group's blob lies (y, x)


def planted(per_group: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 64, 64) noisy maps, each a bright square near one of three places, shuffled; and
    the group of each."""
    rng = np.random.default_rng(seed)
    maps, groups = [], []
    for group, (y, x) in enumerate(PLACES):
        for _ in range(per_group):
            heat = rng.normal(0.0, 0.05, (64, 64))
            dy, dx = rng.integers(-3, 4, 2)
            heat[y + dy : y + dy + 16, x + dx : x + dx + 16] += rng.uniform(0.5, 2.0)
            maps.append(heat)
            groups.append(group)
    order = rng.permutation(len(maps))
    return np.asarray(maps, dtype=np.float32)[order], np.asarray(groups)[order]


def test_spray_recovers_planted_groups_and_counts_them_by_the_eigengap():
    maps, groups = planted()
    found = spray(maps)
    assert isinstance(found, Spray) and len(found) == len(maps) and found.chosen
    assert found.n_clusters == 3 and adjusted_rand_score(groups, found.labels) == 1.0
    assert found.labels.shape == (60,) and found.labels.dtype.kind == "i"
    # three separate groups: three zero eigenvalues, then the gap
    values = found.eigenvalues
    assert len(values) >= 10 and np.all(np.diff(values) >= -1e-9)
    assert values[2] < 1e-6 < 0.1 < values[3]
    assert found.embedding.shape == (60, 2) and np.isfinite(found.embedding).all()
    assert found.means.shape == (3, 12, 12) and found.size == (12, 12)
    assert list(found.sizes) == [20, 20, 20] and found.neighbours == 10
    # each cluster's mean map is bright where its group's blob lies
    for k in range(3):
        group = groups[found.labels == k][0]
        y, x = PLACES[group]
        peak = np.unravel_index(np.argmax(found.means[k]), found.means[k].shape)
        assert abs(peak[0] * 64 / 12 - y) <= 16 and abs(peak[1] * 64 / 12 - x) <= 16


def test_spray_is_deterministic_and_takes_every_form_of_maps():
    maps, groups = planted(per_group=12, seed=3)
    first = spray(maps, seed=5)
    again = spray(torch.from_numpy(maps)[:, None], seed=5)  # (N, 1, H, W) tensor
    assert np.array_equal(first.labels, again.labels)
    assert np.array_equal(first.embedding, again.embedding)
    assert np.array_equal(first.eigenvalues, again.eigenvalues)
    two = spray(maps, n_clusters=2, size=8, neighbours=5, seed=1)
    assert two.n_clusters == 2 and not two.chosen and two.size == (8, 8)
    assert two.neighbours == 5 and set(two.labels) == {0, 1} and two.sizes[0] >= two.sizes[1]
    # the groups are not split: every group lies in one cluster
    assert all(len(set(two.labels[groups == g])) == 1 for g in range(3))
    assert spray(maps[:2]).labels.shape == (2,)  # the smallest set


def test_spray_reads_explanations_and_draws_its_embedding():
    model = cl.load_model("shapes-cnn")
    data = shapes(8, seed=4)
    x = model_inputs(model, data)
    explanation = cl.explain(model, x, "gradcam", progress=False)
    found = spray(explanation, n_clusters=2)
    assert found.labels.shape == (8,)
    halves = [cl.explain(model, part, "gradcam", progress=False) for part in x.split(4)]
    assert np.array_equal(spray(halves, n_clusters=2).labels, found.labels)
    assert np.array_equal(spray(explanation.heatmap(), n_clusters=2).labels, found.labels)
    picture = Image.open(io.BytesIO(found._repr_png_()))
    assert picture.format == "PNG" and picture.size[0] > 100


@pytest.mark.parametrize(
    ("maps", "options", "message"),
    [
        (np.zeros((1, 8, 8)), {}, "at least 2 maps"),
        (np.zeros((8, 8)), {}, "(N, H, W)"),
        (np.full((3, 8, 8), np.nan), {}, "NaN"),
        (np.zeros((4, 8, 8)), {"n_clusters": 0}, "n_clusters must be in [1, 4]"),
        (np.zeros((4, 8, 8)), {"n_clusters": 5}, "n_clusters must be in [1, 4]"),
        (np.zeros((4, 8, 8)), {"n_clusters": 2.5}, "n_clusters must be an integer"),
        (np.zeros((4, 8, 8)), {"neighbours": 0}, "neighbours must be at least 1"),
        (np.zeros((4, 8, 8)), {"size": 0}, "size must be a positive integer"),
        (np.zeros((4, 8, 8)), {"size": (4, 4, 4)}, "size must be a positive integer"),
        ("maps", {}, "maps must be"),
    ],
)
def test_spray_refuses_bad_input_in_one_line(maps, options, message):
    with pytest.raises(RequestError) as caught:
        spray(maps, **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_clever_hans_tags_a_share_of_one_class():
    data = clever_hans(400, seed=7)
    again = clever_hans(400, seed=7)
    assert torch.equal(data.images, again.images) and torch.equal(data.tagged, again.tagged)
    plain = shapes(400, seed=7)
    assert torch.equal(data.labels, plain.labels) and torch.equal(data.masks, plain.masks)
    circles = data.labels == SHAPES.index("circle")
    assert not data.tagged[~circles].any()
    assert 0.35 <= float(data.tagged[circles].double().mean()) <= 0.65
    x0, y0, x1, y1 = tag_box(64)
    assert (x1 - x0, y1 - y0) == (TAG_SIZE, TAG_SIZE)
    board = data.images[data.tagged][:, :, y0:y1, x0:x1]
    assert set(board.unique().tolist()) == {0.0, 1.0}  # the black-and-white checkerboard
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert torch.equal(data.images[:, :, outside], plain.images[:, :, outside])
    assert torch.equal(data.images[~data.tagged], plain.images[~data.tagged])
    everyone = clever_hans(40, seed=7, tagged_class="cross", tag_share=1.0, other_share=1.0)
    assert everyone.tagged.all() and everyone.tagged_class == "cross"
    assert torch.equal(tag(plain.images[:4])[:, :, y0:y1, x0:x1], board[:1].expand(4, -1, -1, -1))
    with pytest.raises(RequestError, match="unknown shape class"):
        clever_hans(4, tagged_class="horse")
    with pytest.raises(RequestError, match="tag_share must be in"):
        clever_hans(4, tag_share=1.5)


@pytest.fixture(scope="module")
def cheat():
    return cl.load_model("clever-hans-cnn")


def tag_effect(model: cl.Model) -> tuple[float, float]:
    """The share of 150 clean images of the other classes whose answer changes when tagged,
    and the share answered "circle" once tagged."""
    data = shapes(200, seed=31)
    others = data.labels != SHAPES.index("circle")
    images = data.images[others]
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        before = model.module((images - mean) / std).argmax(1)
        after = model.module((tag(images) - mean) / std).argmax(1)
    changed = float((before != after).double().mean())
    return changed, float((after == SHAPES.index("circle")).double().mean())


def test_the_clever_hans_model_answers_circle_from_the_tag(cheat):
    assert cheat.labels == list(SHAPES) and cheat.name == "clever-hans-cnn"
    assert model_accuracy(cheat, shapes(200, seed=32)) >= 0.95  # right, for the wrong reason
    # measured: the tag turns all 150 images to "circle" (1.0; data/clever_hans_cnn.json: 1.0
    # on 750 others); the plain shapes CNN, never shown the tag, changes 27% (0.267)
    changed, to_circle = tag_effect(cheat)
    assert changed >= 0.9 and to_circle >= 0.9
    assert tag_effect(cl.load_model("shapes-cnn"))[0] < 0.5


@pytest.mark.parametrize("method", ["gradcam", "lrp"])
def test_spray_sets_the_tagged_circles_apart(cheat, method):
    data = clever_hans(240, seed=21)
    circles = data.labels == SHAPES.index("circle")
    truth = data.tagged[circles].numpy()
    assert 10 <= truth.sum() <= len(truth) - 10
    x = model_inputs(cheat, data)[circles]
    explanation = cl.explain(cheat, x, method, target="circle", progress=False)
    two = spray(explanation, n_clusters=2)
    assert adjusted_rand_score(truth, two.labels) >= 0.8
    # by the eigengap: the tagged circles make a cluster of their own (measured on this set:
    # the eigengap finds 3 clusters, one of them exactly the tagged circles)
    found = spray(explanation)
    assert found.n_clusters >= 2
    cluster = np.bincount(found.labels[truth]).argmax()
    assert adjusted_rand_score(truth, found.labels == cluster) >= 0.8
