"""Testing with Concept Activation Vectors: Kim, Wattenberg, Gilmer, Cai, Wexler, Viegas &
Sayres 2018, "Interpretability Beyond Feature Attribution: Quantitative Testing with Concept
Activation Vectors (TCAV)" (ICML, arXiv:1711.11279), section 3.

- A CAV v_C^l (section 3.2) is the unit normal of a linear classifier that separates the
  activations f_l(x) of a layer l on concept examples from those on random examples, oriented
  towards the concept. Here: L2-regularised logistic regression (:func:`cav`).
- The conceptual sensitivity (eq. 1) of class k to C at l for input x is the directional
  derivative S_{C,k,l}(x) = grad h_{l,k}(f_l(x)) . v_C^l of the class logit h_{l,k}.
- The TCAV score (eq. 2) is TCAV_Q = |{x in X_k : S_{C,k,l}(x) > 0}| / |X_k|.
- Significance (section 3.3): ``runs`` CAVs, each against its own draw of random images, and
  ``runs`` CAVs of one random draw against another (the null); a two-sided Student t-test of
  the concept scores against the random ones, with a Bonferroni correction over the layers
  tested: ``significant`` when p < alpha / number of layers, the paper's test as it is.
- convlens adds ``passes``: significant, and the CAVs tell the concept from random images on
  held-out images better than the random-vs-random CAVs tell two random draws apart (the same
  t-test on their held-out accuracies, ``accuracy_p_values``, mean accuracy higher). The paper
  reports CAV accuracies but does not test them; without that, a CAV no better than chance
  can point the same way in every run (a fixed set of random images differs from the pool by
  chance), and its scores pass the t-test: on a test network a fixed random image set was
  ``significant`` at a layer 8 times in 12, and ``passes`` 0 times in 24. The picture stars
  the layers that pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from convlens import viz
from convlens.checks import RequestError, distinct, finite, positive_int
from convlens.engine import Engine, session
from convlens.features.common import Features, progress_bar, resolve_layer
from convlens.hooks import capture
from convlens.model import Model, as_model
from convlens.targets import Class, Contrast, Predicted, Target, check_classes, check_target_spec

__all__ = ["cav", "t_test", "tcav"]

MIN_CONCEPT = 5  # one in five is held out to measure the CAV's accuracy


def cav(
    concept: Tensor,
    random: Tensor,
    l2: float = 0.01,
    steps: int = 100,
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The CAV of activations ``concept`` (n, D) against ``random`` (m, D), and its classifier
    (a function (k, D) -> True where it says "concept").

    The CAV is the unit normal w / ||w|| of the L2-regularised logistic regression (concept
    = 1) minimising mean_i log(1 + exp(-y_i (w . z_i + b))) + l2 / 2 ||w||^2 on z = (a - mean)
    / s, the activations centred and divided by one number s (their RMS distance to the mean,
    which leaves the normal's direction in activation space unchanged). The problem is
    strongly convex; it is solved in float64 by ``steps`` of Nesterov's accelerated gradient
    descent with step 1 / L and momentum (sqrt(k) - 1) / (sqrt(k) + 1), L the gradient's
    Lipschitz constant and k = L / l2 (deterministic; no random start).
    """
    a = torch.cat([concept, random]).double()
    labels = torch.cat([torch.ones(len(concept)), torch.zeros(len(random))]).double()
    centre = a.mean(dim=0)
    scale = float((a - centre).pow(2).sum(dim=1).mean().sqrt())
    scale = scale if scale > 0 else 1.0
    z = torch.cat([(a - centre) / scale, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
    n = len(z)
    penalty = torch.full((z.shape[1],), l2, dtype=a.dtype)
    penalty[-1] = 0.0  # the bias is not penalised
    lipschitz = 0.25 * float(torch.linalg.eigvalsh(z @ z.T)[-1]) / n + l2
    root = math.sqrt(lipschitz / l2)
    momentum = (root - 1) / (root + 1)
    theta = previous = torch.zeros(z.shape[1], dtype=a.dtype)
    for _ in range(steps):
        ahead = theta + momentum * (theta - previous)
        gradient = z.T @ (torch.sigmoid(z @ ahead) - labels) / n + penalty * ahead
        previous, theta = theta, ahead - gradient / lipschitz
    normal, bias = theta[:-1], float(theta[-1])
    norm = float(normal.norm())

    def says_concept(x: Tensor) -> Tensor:
        return ((x.double() - centre) / scale) @ normal + bias > 0

    return (normal / norm if norm > 0 else normal), says_concept


def t_test(a: Tensor, b: Tensor) -> float:
    """Two-sided p-value of Student's two-sample t-test (pooled variance, n_a + n_b - 2
    degrees of freedom) of ``a`` against ``b``; where both samples are constant, 1 if their
    means agree and 0 otherwise."""
    from scipy.special import stdtr  # the t distribution's CDF (scipy.stats loads slowly)

    a64, b64 = a.double(), b.double()
    n_a, n_b = len(a64), len(b64)
    dof = n_a + n_b - 2
    pooled = ((n_a - 1) * a64.var() + (n_b - 1) * b64.var()) / dof
    difference = float(a64.mean() - b64.mean())
    spread = float((pooled * (1 / n_a + 1 / n_b)).sqrt())
    if spread == 0:
        return 1.0 if difference == 0 else 0.0
    return float(2 * stdtr(dof, -abs(difference) / spread))


def _target(model: Model, target: Any) -> Target:
    if target is None:
        raise RequestError("tcav needs a target: the class (index or label name) to test")
    (goal,) = check_target_spec(target, 1, model.labels)
    if isinstance(goal, Predicted):
        raise RequestError("tcav tests one class for all inputs: give target=CLASS")
    if not isinstance(goal, (Class, Contrast)):
        raise RequestError(
            f"tcav tests a class's logit (Kim et al. 2018), not a {type(goal).__name__} target: "
            "give a class index or label name, or Contrast(p, q)"
        )
    check_classes(goal, model.labels)
    return goal


def _layers(model: Model, layer: Any, x: Tensor) -> list[str]:
    given = layer if isinstance(layer, (list, tuple)) else [layer]
    if not given:
        raise RequestError("give at least one layer (a name, a module or a list of them)")
    names = [resolve_layer(model, item, x) for item in given]
    distinct(names, "layer")
    return names


def _tensor(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise RequestError(f"layer {name!r} returns a {type(value).__name__}, not a tensor")
    return value


def _gradients(
    engine: Engine, x: Tensor, goal: Target, modules: dict[str, nn.Module]
) -> list[Tensor]:
    """Per layer, the gradient (N, D) of the target's score with respect to the layer's
    (flattened) output, one row per input."""
    parts: list[list[Tensor]] = [[] for _ in modules]
    for start, stop in engine.chunks(len(x)):
        step = engine.evaluate(x[start:stop], [goal] * (stop - start), modules, grad=True)
        missing = [name for name in modules if name not in step.captured]
        if missing:
            raise RequestError(f"layer {missing[0]!r} is not called by the model's forward pass")
        outputs = [_tensor(step.captured[name], name) for name in modules]
        grads = torch.autograd.grad(step.scores.sum(), outputs, allow_unused=True)
        for i, (name, grad) in enumerate(zip(modules, grads, strict=True)):
            if grad is None:
                raise RequestError(f"the target's score does not depend on layer {name!r}")
            parts[i].append(grad.detach().flatten(1).float().cpu())
    return [torch.cat(p) for p in parts]


def _activations(engine: Engine, x: Tensor, modules: dict[str, nn.Module]) -> list[Tensor]:
    """Per layer, the (flattened) outputs (N, D) for the images ``x``, no gradients."""
    parts: list[list[Tensor]] = [[] for _ in modules]
    with capture(modules) as seen:
        for start, stop in engine.chunks(len(x)):
            engine.forward(x[start:stop])
            for i, name in enumerate(modules):
                parts[i].append(_tensor(seen[name], name).detach().flatten(1).float().cpu())
    return [torch.cat(p) for p in parts]


def _draws(
    runs: int, n_concept: int, n_random: int, held_out: int, generator: torch.Generator
) -> list[dict[str, Tensor]]:
    """Per run, the indices of one concept-vs-random and one random-vs-random CAV: the random
    draw (n_concept of the pool), two disjoint random draws (the null), and train/test splits
    of each set (``held_out`` of each held out)."""

    def split(n: int, of: Tensor | None = None) -> tuple[Tensor, Tensor]:
        chosen = torch.randperm(n, generator=generator)
        chosen = chosen if of is None else of[chosen]
        return chosen[held_out:], chosen[:held_out]

    draws = []
    for _ in range(runs):
        pool = torch.randperm(n_random, generator=generator)
        first, second = pool[:n_concept], pool[n_concept : 2 * n_concept]
        other = torch.randperm(n_random, generator=generator)[:n_concept]
        names = ("concept", "random", "null_a", "null_b")
        sets = (None, other, first, second)
        draw = {}
        for name, of in zip(names, sets, strict=True):
            draw[f"{name}_train"], draw[f"{name}_test"] = split(n_concept, of)
        draws.append(draw)
    return draws


ROWS = ("scores", "random_scores", "accuracy", "random_accuracy")


def _layer_runs(
    name: str,
    grads: Tensor,
    pos: Tensor,
    neg: Tensor,
    draws: list[dict[str, Tensor]],
    l2: float,
    steps: int,
    tick: Callable[[int], Any],
) -> dict[str, Tensor]:
    """One layer's runs: per draw a concept CAV and a random-vs-random CAV, their held-out
    accuracies and TCAV scores (eq. 2) from the inputs' gradients ``grads`` (N, D)."""
    kept: dict[str, list[Tensor]] = {key: [] for key in ("concept", "null_a")}
    right: dict[str, list[Tensor]] = {key: [] for key in ("concept", "null_a")}
    for draw in draws:
        for kind, a, other in (("concept", pos, "random"), ("null_a", neg, "null_b")):
            v, says = cav(a[draw[f"{kind}_train"]], neg[draw[f"{other}_train"]], l2, steps)
            if float(v.norm()) == 0:
                pair = (
                    "the concept and random activations"
                    if kind == "concept"
                    else "two draws of random images (give more varied random images)"
                )
                raise RequestError(
                    f"layer {name!r}: {pair} cannot be told apart (the CAV is zero); "
                    "choose another layer"
                )
            hits = torch.cat([says(a[draw[f"{kind}_test"]]), ~says(neg[draw[f"{other}_test"]])])
            kept[kind].append(v)
            right[kind].append(hits.double().mean())
            tick(1)
    vectors, null_vectors = torch.stack(kept["concept"]), torch.stack(kept["null_a"])
    sensitivity = grads.double() @ vectors.T  # (N, runs): S_{C,k,l}(x), eq. 1
    return {
        "scores": (sensitivity > 0).double().mean(dim=0),
        "random_scores": (grads.double() @ null_vectors.T > 0).double().mean(dim=0),
        "accuracy": torch.stack(right["concept"]),
        "random_accuracy": torch.stack(right["null_a"]),
        "cavs": vectors.float(),
        "derivatives": sensitivity.float(),
    }


def tcav(
    model: Model | nn.Module,
    inputs: Any,
    concept: Any,
    random: Any,
    layer: Any = None,
    target: Any = None,
    runs: int = 10,
    seed: int = 0,
    alpha: float = 0.05,
    l2: float = 0.01,
    steps: int = 100,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Features:
    """How much ``target``'s score for ``inputs`` (images of that class) is moved by a concept,
    shown by ``concept`` images, at ``layer`` (a name, a module or a list; by default the CAM
    layer): the TCAV score of Kim et al. (2018), eq. 2, with its significance. A layer's
    output is flattened (all its channels and places are one vector); a layer called more
    than once in a forward pass is read at its last call.

    Args:
        inputs: images of the class tested (a tensor or images, as ``model.inputs`` takes).
        concept: at least 5 examples of the concept; one in five is held out to measure each
            CAV's accuracy.
        random: a pool of random images, at least twice as many as the concept's: each run
            draws as many as ``concept`` has, and the null CAVs two disjoint such draws.
        target: the class (index or label name) or ``Contrast``, whose score is derived.
        runs: CAVs per layer (and as many random-vs-random CAVs); at least 2.
        alpha: significance level, divided by the number of layers (Bonferroni).
        l2, steps: L2 weight and gradient steps of the logistic regression (:func:`cav`).

    ``data`` (one row per layer, in ``info["layers"]`` order): ``scores`` and
    ``random_scores`` (L, runs), ``mean``, ``std`` (over runs, unbiased), ``random_mean``,
    ``random_std``, ``p_values``, ``accuracy_p_values``, ``significant`` (L,: the paper's
    test) and ``passes`` (L,: significant, and the CAVs beat random-vs-random ones on held-out
    images; see the module's notes), ``accuracy`` and ``random_accuracy`` (L, runs) on the
    held-out images, ``cavs`` {layer: (runs, D)}, and ``derivatives`` {layer: (N, runs)} the
    directional derivatives S_{C,k,l}(x). The picture
    draws the mean scores with their standard deviations beside the random ones, a star on
    each layer that passes.
    """
    wrapped = as_model(model)
    x = wrapped.inputs(inputs)
    examples = wrapped.inputs(concept)
    pool = wrapped.inputs(random)
    runs = positive_int("runs", runs, minimum=2)
    steps = positive_int("steps", steps)
    positive_int("seed", seed, minimum=0)
    alpha, l2 = finite("alpha", alpha), finite("l2", l2)
    if not 0 < alpha < 1:
        raise RequestError(f"alpha must be in (0, 1), not {alpha}")
    if not l2 > 0:
        raise RequestError(f"l2 must be positive, not {l2}")
    if len(examples) < MIN_CONCEPT:
        raise RequestError(
            f"tcav needs at least {MIN_CONCEPT} concept images (one in five is held out), "
            f"not {len(examples)}"
        )
    if len(pool) < 2 * len(examples):
        raise RequestError(
            f"tcav needs at least twice as many random images as concept images "
            f"({2 * len(examples)}) for the random-vs-random CAVs, not {len(pool)}"
        )
    shapes = {tuple(t.shape[1:]) for t in (x, examples, pool)}
    if len(shapes) > 1:
        raise RequestError(
            f"inputs, concept and random images must have one shape, not {sorted(shapes)}"
        )
    goal = _target(wrapped, target)
    names = _layers(wrapped, layer, x)
    modules = {name: wrapped.layer(name) for name in names}
    held_out = max(1, len(examples) // 5)
    draws = _draws(runs, len(examples), len(pool), held_out, torch.Generator().manual_seed(seed))

    total = len(x) + len(examples) + len(pool)
    with (
        session(wrapped, x, batch_size, 16, progress, "tcav") as engine,
        engine.task(total),
    ):
        gradients = _gradients(engine, x, goal, modules)  # first: it checks the target
        concept_acts = _activations(engine, examples, modules)
        random_acts = _activations(engine, pool, modules)
        forwards = engine.forwards

    rows: dict[str, list[Tensor]] = {key: [] for key in ROWS}
    cavs, derivatives = {}, {}
    with progress_bar(2 * runs * len(names), "tcav CAVs", progress) as bar:
        for name, grads, pos, neg in zip(names, gradients, concept_acts, random_acts, strict=True):
            found = _layer_runs(name, grads, pos, neg, draws, l2, steps, bar.update)
            for key in ROWS:
                rows[key].append(found[key])
            cavs[name], derivatives[name] = found["cavs"], found["derivatives"]

    data: dict[str, Any] = {key: torch.stack(value) for key, value in rows.items()}
    data["mean"], data["std"] = data["scores"].mean(dim=1), data["scores"].std(dim=1)
    data["random_mean"] = data["random_scores"].mean(dim=1)
    data["random_std"] = data["random_scores"].std(dim=1)
    p_values = [t_test(s, r) for s, r in zip(data["scores"], data["random_scores"], strict=True)]
    data["p_values"] = torch.tensor(p_values, dtype=torch.float64)
    threshold = alpha / len(names)
    accuracy_p = [
        t_test(a, r) for a, r in zip(data["accuracy"], data["random_accuracy"], strict=True)
    ]
    data["accuracy_p_values"] = torch.tensor(accuracy_p, dtype=torch.float64)
    learnt = (data["accuracy"].mean(dim=1) > data["random_accuracy"].mean(dim=1)) & (
        data["accuracy_p_values"] < threshold
    )
    data["significant"] = data["p_values"] < threshold
    data["passes"] = data["significant"] & learnt
    data["cavs"], data["derivatives"] = cavs, derivatives
    description = goal.describe()
    shown = f"class {wrapped.label(description)}" if isinstance(goal, Class) else description
    picture = _bars(data, names, shown)
    info = {
        "layers": names,
        "layer": names[0] if len(names) == 1 else ", ".join(names),
        "target": description,
        "runs": runs,
        "inputs": len(x),
        "concept_images": len(examples),
        "random_images": len(pool),
        "held_out": held_out,
        "alpha": alpha,
        "threshold": threshold,
        "forwards": forwards,
        "per_layer": {
            name: {
                "score": float(data["mean"][i]),
                "std": float(data["std"][i]),
                "random_score": float(data["random_mean"][i]),
                "p_value": float(data["p_values"][i]),
                "significant": bool(data["significant"][i]),
                "passes": bool(data["passes"][i]),
                "accuracy": float(data["accuracy"][i].mean()),
                "accuracy_p_value": float(data["accuracy_p_values"][i]),
            }
            for i, name in enumerate(names)
        },
    }
    return Features("tcav", data, picture, info)


def _bars(data: dict[str, Any], names: list[str], target: Any) -> Any:
    """Mean TCAV scores per layer (blue) beside the random CAVs' (grey), standard deviations
    as error bars, a star over each layer that passes (significant, and its CAVs beat random
    ones) and the p-value under it."""
    figure, axes = viz.new_figure((max(4.0, 1.3 * len(names) + 2), 4))
    where = torch.arange(len(names)).double()
    width = 0.38
    axes.bar(
        (where - width / 2).numpy(),
        data["mean"].numpy(),
        width,
        yerr=data["std"].numpy(),
        capsize=3,
        label="concept",
    )
    axes.bar(
        (where + width / 2).numpy(),
        data["random_mean"].numpy(),
        width,
        yerr=data["random_std"].numpy(),
        capsize=3,
        color="0.7",
        label="random CAVs",
    )
    axes.axhline(0.5, color="0.4", linewidth=0.8, linestyle="--")
    for i, passes in enumerate(data["passes"].tolist()):
        top = float(data["mean"][i] + data["std"][i])
        if passes:
            axes.text(float(where[i]) - width / 2, top + 0.02, "*", ha="center", fontsize=14)
    p_text = [f"{n}\np={float(p):.2g}" for n, p in zip(names, data["p_values"], strict=True)]
    axes.set_xticks(where.tolist(), p_text, fontsize=8)
    axes.set_ylim(0, 1.3)
    axes.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.set_ylabel("TCAV score")
    axes.set_title(f"TCAV scores for {target} (* significant, CAVs beat random ones)", fontsize=10)
    axes.legend(fontsize=8, loc="upper center", ncol=2)
    return viz.figure_image(figure)
