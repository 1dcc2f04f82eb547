"""TCAV (Kim et al. 2018): the score is known in closed form on a model whose class score is a
product of two activations, the CAV agrees with a logistic regression oracle, the t-test with
scipy's, a CNN trained on a planted concept is found to use it (and not a random one), the
model is left as it was, bad requests are refused, and ``convlens features tcav`` works."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_input
from PIL import Image
from test_lifecycle import assert_same, prepared_model, snapshot
from torch import nn

import convlens as cl
from convlens.checks import RequestError
from convlens.cli import main
from convlens.features import tcav
from convlens.features.tcav import cav, t_test


class Product(nn.Module):
    """Layer ``a`` (and ``b`` after it) is the identity on a (B, 2, 1, 1) input; logit 0 is
    a0 * a1 (its gradient at ``a`` is (a1, a0)) and logit 1 is a0 (gradient (1, 0))."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        self.b = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.b(self.a(x)).flatten(1)
        return torch.stack([a[:, 0] * a[:, 1], a[:, 0]], dim=1)


def on_axis(n: int, centre: float, seed: int) -> torch.Tensor:
    """Points (centre + noise, 0): every CAV between such sets is (+-1, 0) exactly."""
    points = torch.zeros(n, 2, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    points[:, 0, 0, 0] = centre + 0.3 * torch.randn(n, generator=generator)
    return points


A1 = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, -1, -2, -3])  # 7 of 10 inputs have a1 > 0


def product_inputs() -> torch.Tensor:
    x = torch.randn(10, 2, 1, 1, generator=torch.Generator().manual_seed(2))
    x[:, 1, 0, 0] = A1
    return x


def test_score_in_closed_form_on_a_product_model():
    model, x = Product(), product_inputs()
    concept, pool = on_axis(10, 1.0, 0), on_axis(30, -1.0, 1)
    result = tcav(model, x, concept, pool, layer="a", target=0, runs=4, progress=False)
    # the CAV is (1, 0); S(x) = grad . v = a1, positive for 7 of the 10 inputs
    assert torch.allclose(result.data["cavs"]["a"], torch.tensor([[1.0, 0.0]] * 4))
    assert torch.allclose(result.data["derivatives"]["a"], A1[:, None].expand(10, 4))
    assert torch.equal(result.data["scores"], torch.full((1, 4), 0.7, dtype=torch.float64))
    assert result.data["accuracy"].min() == 1.0 and result.data["std"][0] == 0
    assert result.info["layers"] == ["a"] and result.info["target"] == 0
    # the concept on the other side: v = (-1, 0), S(x) = -a1
    flipped = tcav(model, x, pool[:10], torch.cat([concept, pool[10:]]), "a", 0, runs=4)
    assert torch.allclose(flipped.data["cavs"]["a"], torch.tensor([[-1.0, 0.0]] * 4))
    assert torch.equal(flipped.data["scores"], torch.full((1, 4), 0.3, dtype=torch.float64))
    # logit 1 = a0: S(x) = 1 for every input
    other = tcav(model, x, concept, pool, layer="a", target=1, runs=4)
    assert torch.equal(other.data["scores"], torch.ones(1, 4, dtype=torch.float64))
    assert isinstance(result.image, Image.Image)


def test_significance_is_bonferroni_corrected_over_layers():
    model, x = Product(), product_inputs()
    concept, pool = on_axis(10, 1.0, 0), on_axis(30, -1.0, 1)
    one = tcav(model, x, concept, pool, layer="a", target=0, runs=4)
    p = float(one.data["p_values"][0])
    assert 0 < p < 0.6  # the random CAVs point either way: their scores are 0.7 or 0.3
    alpha = 1.5 * p  # p < alpha, but p > alpha / 2
    alone = tcav(model, x, concept, pool, layer="a", target=0, runs=4, alpha=alpha)
    both = tcav(model, x, concept, pool, layer=["a", "b"], target=0, runs=4, alpha=alpha)
    assert alone.data["significant"].tolist() == [True]
    assert both.data["p_values"].tolist() == [p, p]  # b = a: the same test twice
    assert both.data["significant"].tolist() == [False, False]


def test_cav_is_the_logistic_regression_normal():
    from sklearn.linear_model import LogisticRegression

    generator = torch.Generator().manual_seed(0)
    for dims in (3, 500):
        scales = torch.rand(dims, generator=generator) * 3
        concept = torch.randn(12, dims, generator=generator) * scales + 0.2
        random = torch.randn(12, dims, generator=generator) * scales
        vector, says_concept = cav(concept, random, l2=0.01)
        a = torch.cat([concept, random]).double()
        s2 = float((a - a.mean(0)).pow(2).sum(1).mean())
        # the same problem: mean loss + 0.01 / 2 ||w_z||^2 with z = (a - mean) / s
        oracle = LogisticRegression(C=1 / (0.01 * len(a) * s2), tol=1e-12, max_iter=10_000)
        oracle.fit(a.numpy(), [1] * 12 + [0] * 12)
        w = torch.from_numpy(oracle.coef_[0])
        assert float(vector.norm()) == pytest.approx(1.0)
        assert float(w @ vector / w.norm()) > 1 - 1e-8
        assert torch.equal(says_concept(a), torch.from_numpy(oracle.predict(a.numpy())).bool())


def test_t_test_is_students():
    from scipy.stats import ttest_ind

    generator = torch.Generator().manual_seed(3)
    for n in (3, 7, 10):
        a = torch.rand(n, generator=generator).double()
        b = torch.rand(9, generator=generator).double() * 0.8
        expected = ttest_ind(a.numpy(), b.numpy(), equal_var=True).pvalue
        assert t_test(a, b) == pytest.approx(float(expected), rel=1e-9)
    ones = torch.ones(5, dtype=torch.float64)
    assert t_test(ones, ones) == 1.0 and t_test(ones, ones * 0.5) == 0.0


# -- a CNN trained on a planted concept -------------------------------------------------------
SIDE = 16
STRIPES = (torch.arange(6) % 2).float().view(1, 6).expand(6, 6)


def backgrounds(n: int, generator: torch.Generator) -> torch.Tensor:
    colour = torch.rand(n, 3, 1, 1, generator=generator)
    return (colour + 0.25 * torch.randn(n, 3, SIDE, SIDE, generator=generator)).clamp(0, 1)


def striped(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` with a 6x6 patch of vertical black and white stripes at a random place."""
    x = x.clone()
    for i in range(len(x)):
        y0, x0 = torch.randint(0, SIDE - 6, (2,), generator=generator).tolist()
        x[i, :, y0 : y0 + 6, x0 : x0 + 6] = STRIPES
    return x


@pytest.fixture(scope="module")
def planted():
    """A tiny CNN trained (seeded, ~2 s) to tell images with the stripes (class 1) from
    images without (class 0), on random backgrounds."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        x = backgrounds(64, generator)
        labels = torch.randint(0, 2, (64,), generator=generator)
        x[labels == 1] = striped(x[labels == 1], generator)
        loss = nn.functional.cross_entropy(model(x), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    test = backgrounds(100, generator)
    with torch.no_grad():
        assert (model(striped(test, generator)).argmax(1) == 1).float().mean() > 0.95
        assert (model(test).argmax(1) == 0).float().mean() > 0.95
    return model, generator


def test_planted_concept_is_significant_and_a_random_one_is_not(planted):
    model, generator = planted
    inputs = striped(backgrounds(20, generator), generator)  # class 1 images
    grey = 0.5 + 0.05 * torch.randn(10, 3, SIDE, SIDE, generator=generator)
    concept = striped(grey, generator)  # the stripes on a neutral background
    pool = backgrounds(40, generator)
    layers = ["1", "4"]
    found = tcav(model, inputs, concept, pool, layers, target=1, runs=10)
    assert found.info["layers"] == layers
    assert found.data["scores"].shape == found.data["random_scores"].shape == (2, 10)
    assert (found.data["mean"] > 0.8).all()
    assert (found.data["p_values"] < 0.05 / 2).all() and found.data["significant"].all()
    assert found.data["passes"].all()
    assert (found.data["accuracy_p_values"] < 0.05 / 2).all()
    assert (found.data["accuracy"].mean(dim=1) > 0.6).all()
    assert (found.data["random_accuracy"].mean(dim=1) < 0.7).all()  # random vs random: chance
    # Random "concepts": 8 fixed sets of random images, none passes. The paper's t-test of the
    # scores alone calls most such sets significant on this network (a fixed set's CAVs point
    # the same way in every run); the CAVs' held-out accuracy is what tells them from a concept.
    called, significant = [], []
    for k in range(8):
        draw = backgrounds(10, torch.Generator().manual_seed(100 + k))
        noise = tcav(model, inputs, draw, pool, layers, target=1, runs=10, progress=False)
        learnt = (noise.data["accuracy_p_values"] < 0.05 / 2) & (
            noise.data["accuracy"].mean(1) > noise.data["random_accuracy"].mean(1)
        )  # Bonferroni over the two layers
        assert torch.equal(noise.data["significant"], noise.data["p_values"] < 0.05 / 2)
        assert torch.equal(noise.data["passes"], noise.data["significant"] & learnt)
        called.append(bool(noise.data["passes"].any()))
        significant.append(bool(noise.data["significant"].any()))
    assert not any(called), called
    assert sum(significant) >= 2, significant  # what the accuracy test is there for


def test_refuses_inner_unit_targets_and_names_identical_random_draws():
    from convlens.targets import Channel

    model, x = Product(), product_inputs()
    concept, pool = on_axis(10, 1.0, 0), on_axis(30, -1.0, 1)
    with pytest.raises(RequestError, match="not a Channel target"):
        tcav(model, x, concept, pool, layer="a", target=Channel("a", 0), runs=2)
    same = on_axis(1, -1.0, 1).expand(30, -1, -1, -1).clone()
    with pytest.raises(RequestError, match="two draws of random images"):
        tcav(model, x, concept, same, layer="a", target=0, runs=2)
    with pytest.raises(RequestError, match="alpha must be in"):
        tcav(model, x, concept, pool, layer="a", target=0, runs=2, alpha="2")


def test_model_left_as_it_was_also_after_an_error():
    model = prepared_model()
    before = snapshot(model)
    x, concept, pool = tiny_input(4, 1), tiny_input(5, 2), tiny_input(10, 3)
    result = tcav(model, x, concept, pool, ["conv1", "act2"], target=2, runs=2)
    assert result.data["scores"].shape == (2, 2)
    assert_same(before, snapshot(model))
    with pytest.raises(RequestError, match="target class 9 is out of range"):
        tcav(model, x, concept, pool, "act2", target=9, runs=2)  # found in the first pass
    assert_same(before, snapshot(model))


def test_refusals_before_any_work():
    module = prepared_model()
    model = cl.wrap(module, input_size=8, labels=list("abcde"))
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    x, concept, pool = tiny_input(4, 1), tiny_input(5, 2), tiny_input(10, 3)
    bad = [
        ({"concept": concept[:4]}, "at least 5 concept images"),
        ({"random": pool[:9]}, "at least twice as many random images"),
        ({"layer": "nope"}, "unknown layer 'nope'"),
        ({"layer": ["act2", "act2"]}, "names 'act2' more than once"),
        ({"target": 5}, "target class 5 is out of range"),
        ({"target": "z"}, "unknown label 'z'"),
        ({"target": None}, "tcav needs a target"),
        ({"runs": 1}, "runs"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"random": tiny_input(10, 3)[..., :4]}, "must have one shape"),
    ]
    for change, message in bad:
        request = {"concept": concept, "random": pool, "layer": "act2", "target": 1, **change}
        with pytest.raises(RequestError, match=message) as error:
            tcav(model, x, **request)
        assert len(str(error.value).splitlines()) == 1
    assert not calls


# -- the command line ---------------------------------------------------------------------------
def _save(images: torch.Tensor, folder) -> list[str]:
    folder.mkdir()
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:02d}.png"
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def test_cli_tcav(tmp_path, capsys):
    from convlens import datasets

    data = datasets.shapes(24, seed=3)
    inputs = _save(datasets.tag(data.images[data.labels == 1]), tmp_path / "squares")
    grey = 0.5 + 0.03 * torch.randn(10, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _save(datasets.tag(grey.clamp(0, 1)), tmp_path / "tag")
    _save(datasets.shapes(20, seed=5).images, tmp_path / "random")
    out = tmp_path / "out"
    model = ["features", "tcav", *inputs, "--model", "clever-hans-cnn", "--target", "circle"]
    folders = ["--concept", str(tmp_path / "tag"), "--random", str(tmp_path / "random")]
    layers = ["--layer", "features.1,features.9", "--runs", "3"]
    assert main([*model, *folders, *layers, "--out", str(out)]) == 0
    summary = json.loads((out / "tcav.json").read_text())
    assert summary["layers"] == ["features.1", "features.9"] and summary["runs"] == 3
    assert summary["target"] == 0 and summary["concept_images"] == 10
    # the model learnt the tag as a shortcut to "circle": it moves squares towards circles
    assert summary["per_layer"]["features.1"]["score"] > 0.8
    assert Image.open(out / "tcav.png").size[0] > 100
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    refused = [
        (folders[:2], "tcav needs --random DIR"),
        (folders[2:], "tcav needs --concept DIR"),
        ([*folders, "--runs", "1"], "--runs"),
        ([*folders, "--layer", "features.1,nope"], "unknown layer 'nope'"),
        ([*folders, "--concept", str(tmp_path / "empty")], "holds no images"),
        ([*folders, "--random", str(tmp_path / "nowhere")], "is not a folder"),
        ([*folders, "--target", "7"], "target class 7 is out of range"),
    ]
    for extra, message in refused:
        assert main([*model, *extra, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


def test_cli_help_for_tcav_and_invert(capsys):
    texts = {}
    for kind in ("tcav", "invert"):
        with pytest.raises(SystemExit):
            main(["features", kind, "--help"])
        texts[kind] = capsys.readouterr().out
    assert "--concept DIR" in texts["tcav"] and "--runs RUNS" in texts["tcav"]
    assert "Kim et al. 2018" in texts["tcav"] and "--steps" in texts["invert"]
    assert "--concept" not in texts["invert"]


def test_cli_invert_runs(tmp_path):
    out = tmp_path / "invert"
    args = ["features", "invert", "--model", "shapes-cnn", "--shapes", "1", "--steps", "2"]
    assert main([*args, "--layer", "features.4", "--out", str(out)]) == 0
    summary = json.loads((out / "invert.json").read_text())
    assert summary["layer"] == "features.4" and summary["params"] == {"steps": 2}
    assert (out / "invert.png").is_file()
