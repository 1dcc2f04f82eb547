"""What an explanation explains: target objects, and resolution of ``int`` / list / name / ``None``.

Every target reduces the model's output (and, for inner units, one layer's activation) to one
scalar per input. ``Predicted()`` and class names are resolved once, on the clean input, into
concrete targets; the methods then score perturbed or interpolated copies against those.

Example:
    >>> from convlens.targets import Class, Contrast
    >>> cl.explain(model, img, "saliency", target=Contrast("tabby", "tiger cat"))
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from convlens.checks import RequestError, RequestTypeError

__all__ = [
    "Channel",
    "Class",
    "Contrast",
    "Neuron",
    "Predicted",
    "Target",
    "TargetSpec",
    "channels_first",
    "channels_last_grid",
    "check_class",
    "check_classes",
    "check_target_spec",
    "layer_key",
    "layer_of",
    "probability_scores",
    "resolve_targets",
    "score_rows",
    "target_layers",
]


class Target(ABC):
    """One scalar per input, computed from the logits or from one layer's activation.

    Targets on an inner unit also have a ``layer`` field (read with :func:`layer_of`).
    """

    @abstractmethod
    def score(self, output: Tensor, activation: Tensor | None) -> Tensor:
        """Scores of shape (N,) for N rows of ``output`` (and of ``activation`` for inner units)."""

    def describe(self) -> Any:
        """A JSON-friendly description recorded in :class:`~convlens.Explanation`."""
        return repr(self)


def check_class(index: int, n_classes: int) -> None:
    """Raise a clear error when ``index`` is not one of ``n_classes`` classes."""
    if not 0 <= index < n_classes:
        raise RequestError(
            f"target class {index} is out of range: the model has {n_classes} classes "
            f"(0-{n_classes - 1})"
        )


def check_classes(target: Target, labels: Sequence[str] | None) -> None:
    """Refuse a :class:`Class` or :class:`Contrast` target whose class indices lie outside
    the model's ``labels`` (without labels, the first forward pass tells)."""
    indices = [target.index] if isinstance(target, Class) else []
    indices += [target.p, target.q] if isinstance(target, Contrast) else []
    for index in indices:
        if isinstance(index, int) and labels is not None:
            check_class(index, len(labels))


@dataclass(frozen=True)
class Class(Target):
    """The logit of class ``index`` (an int, or a label name resolved against ``model.labels``)."""

    index: int | str

    def score(self, output: Tensor, activation: Tensor | None) -> Tensor:
        if not isinstance(self.index, int):
            raise TypeError(f"class {self.index!r} must be resolved to an index first")
        check_class(self.index, output.shape[-1])
        return output[:, self.index]

    def describe(self) -> Any:
        return self.index


@dataclass(frozen=True)
class Predicted(Target):
    """The class the model predicts for the clean input (resolved into :class:`Class`)."""

    def score(self, output: Tensor, activation: Tensor | None) -> Tensor:
        raise TypeError("Predicted() must be resolved against the clean input's output first")

    def describe(self) -> Any:
        return "predicted"


@dataclass(frozen=True)
class Contrast(Target):
    """Logit ``p`` minus logit ``q``: "why p rather than q" (contrastive explanations)."""

    p: int | str
    q: int | str

    def score(self, output: Tensor, activation: Tensor | None) -> Tensor:
        if not isinstance(self.p, int) or not isinstance(self.q, int):
            raise TypeError("contrast classes must be resolved to indices first")
        check_class(self.p, output.shape[-1])
        check_class(self.q, output.shape[-1])
        return output[:, self.p] - output[:, self.q]

    def describe(self) -> Any:
        return {"contrast": [self.p, self.q]}


def _layer_name(layer: str | nn.Module | None) -> str:
    return layer if isinstance(layer, str) else type(layer).__name__


@dataclass(frozen=True, eq=False)
class Channel(Target):
    """Mean activation of channel ``channel`` of an inner ``layer`` (over its spatial positions)."""

    layer: str | nn.Module
    channel: int

    def score(self, output: Tensor, activation: Tensor | None) -> Tensor:
        activation = channels_first(_need_activation(self, activation))
        if not 0 <= self.channel < activation.shape[1]:
            raise RequestError(
                f"channel {self.channel} is out of range: layer {_layer_name(self.layer)!r} "
                f"has {activation.shape[1]} channels"
            )
        return activation[:, self.channel].reshape(activation.shape[0], -1).mean(dim=1)

    def describe(self) -> Any:
        return {"channel": [_layer_name(self.layer), self.channel]}


@dataclass(frozen=True, eq=False)
class Neuron(Target):
    """One unit ``(channel, y, x)`` of an inner ``layer``'s activation."""

    layer: str | nn.Module
    channel: int
    y: int
    x: int

    def score(self, output: Tensor, activation: Tensor | None) -> Tensor:
        activation = channels_first(_need_activation(self, activation))
        if activation.dim() != 4:
            raise RequestError(
                f"Neuron needs a spatial layer; {_layer_name(self.layer)!r} outputs "
                f"shape {tuple(activation.shape)}"
            )
        _, c, h, w = activation.shape
        if not (0 <= self.channel < c and 0 <= self.y < h and 0 <= self.x < w):
            raise RequestError(
                f"neuron ({self.channel}, {self.y}, {self.x}) is out of range for layer "
                f"{_layer_name(self.layer)!r} with {c} channels of {h}x{w}"
            )
        return activation[:, self.channel, self.y, self.x]

    def describe(self) -> Any:
        return {"neuron": [_layer_name(self.layer), self.channel, self.y, self.x]}


def channels_last_grid(shape: Sequence[int]) -> bool:
    """Whether a 4-D output is (B, h, w, C), as Swin-style transformers and permuted
    LayerNorms give, rather than (B, C, h, w): its middle sides agree and the last differs."""
    return len(shape) == 4 and shape[1] == shape[2] and shape[2] != shape[3]


def channels_first(activation: Tensor) -> Tensor:
    """An inner layer's output with its channels in dimension 1: Swin-style grids (B, h, w, C)
    and tokens (B, N, C) are turned; feature maps (B, C, h, w) stay as they are."""
    if activation.dim() == 4 and channels_last_grid(activation.shape):
        return activation.permute(0, 3, 1, 2)
    return activation.transpose(1, 2) if activation.dim() == 3 else activation


def _need_activation(target: Target, activation: Tensor | None) -> Tensor:
    if activation is None:
        raise RequestError(
            f"{target.describe()} reads layer {_layer_name(layer_of(target))!r}, which the "
            "forward pass did not call"
        )
    return activation


TargetSpec = int | str | Target | Sequence[int | str | Target] | None


def _label_index(name: str, labels: Sequence[str] | None) -> int:
    if labels is None:
        raise RequestError(f"target {name!r} is a class name, but the model has no labels")
    try:
        return list(labels).index(name)
    except ValueError:
        close = difflib.get_close_matches(name, labels, n=5)
        hint = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
        raise RequestError(f"unknown label {name!r}{hint}") from None


def _concrete(item: int | str | Target | None, labels: Sequence[str] | None) -> Target:
    """A target with label names turned into indices (``Predicted`` is left for later)."""
    if item is None:
        return Predicted()
    if isinstance(item, bool):
        raise RequestTypeError(f"target must be an int, a label name or a Target, not {item!r}")
    if not isinstance(item, (int, str, Target)) and hasattr(item, "__index__"):
        item = int(item.__index__())  # a NumPy or torch integer
    if isinstance(item, int):
        if item < 0:
            raise RequestError(f"target class {item} is out of range: class indices start at 0")
        return Class(item)
    if isinstance(item, str):
        return Class(_label_index(item, labels))
    if isinstance(item, Class) and isinstance(item.index, str):
        return Class(_label_index(item.index, labels))
    if isinstance(item, Contrast):
        p, q = (_concrete(c, labels) for c in (item.p, item.q))
        assert isinstance(p, Class) and isinstance(q, Class)
        return Contrast(p.index, q.index)
    if isinstance(item, Target):
        return item
    raise RequestTypeError(
        f"target must be None, an int, a label name, a list of them or a convlens.targets "
        f"object, not {type(item).__name__}"
    )


def check_target_spec(
    spec: TargetSpec, n_inputs: int, labels: Sequence[str] | None
) -> list[Target]:
    """Validate a user's ``target`` and return one target per input (``Predicted`` unresolved)."""
    if isinstance(spec, (list, tuple)):
        if len(spec) != n_inputs:
            raise RequestError(
                f"target is a list of {len(spec)} items but there are {n_inputs} inputs; "
                "give one target per input"
            )
        return [_concrete(item, labels) for item in spec]
    if isinstance(spec, Tensor) or type(spec).__module__ == "numpy":  # arrays and scalars
        return check_target_spec(spec.tolist(), n_inputs, labels)  # type: ignore[union-attr]
    return [_concrete(spec, labels)] * n_inputs


def resolve_targets(targets: Sequence[Target], output: Tensor) -> list[Target]:
    """Replace ``Predicted()`` by the class predicted in ``output`` (one row per target)."""
    if not any(isinstance(t, Predicted) for t in targets):
        return list(targets)
    predicted = output.detach().argmax(dim=-1).tolist()
    return [
        Class(c) if isinstance(t, Predicted) else t for t, c in zip(targets, predicted, strict=True)
    ]


def layer_of(target: Target) -> str | nn.Module | None:
    """The inner layer a target reads, or ``None`` for targets on the model's output."""
    return getattr(target, "layer", None)


def target_layers(targets: Sequence[Target]) -> list[str | nn.Module]:
    """The inner layers the targets read, each once, in order."""
    layers: list[str | nn.Module] = []
    for t in targets:
        layer = layer_of(t)
        if layer is not None and not any(layer is seen for seen in layers):
            layers.append(layer)
    return layers


def score_rows(
    targets: Target | Sequence[Target],
    output: Tensor,
    activations: dict[Any, Tensor] | None = None,
) -> Tensor:
    """Scores (N,): one target for all rows, or ``targets[i]`` for row ``i``."""
    activations = activations or {}
    if isinstance(targets, Target):
        return targets.score(output, activations.get(layer_key(layer_of(targets))))
    first = targets[0]
    if all(t == first for t in targets):
        return first.score(output, activations.get(layer_key(layer_of(first))))
    if all(isinstance(t, Class) for t in targets):
        index = torch.tensor([t.index for t in targets], device=output.device)  # type: ignore[attr-defined]
        for t in targets:
            check_class(t.index, output.shape[-1])  # type: ignore[attr-defined]
        return output.gather(1, index[:, None])[:, 0]
    return torch.cat(
        [
            t.score(output[i : i + 1], _row(activations.get(layer_key(layer_of(t))), i))
            for i, t in enumerate(targets)
        ]
    )


def probability_scores(
    target: Target | Sequence[Target], output: Tensor, activations: dict[Any, Tensor] | None = None
) -> Tensor:
    """Scores on class probabilities (softmax of the logits) for class and contrast targets, as
    RISE and Score-CAM define them; inner-unit targets keep their raw values."""
    first = target if isinstance(target, Target) else target[0]
    if isinstance(first, (Class, Contrast)):
        output = output.softmax(dim=-1)
    return score_rows(target, output, activations)


def scorer(name: str) -> Callable[..., Tensor]:
    """The score function called ``name``: ``"probability"`` (:func:`probability_scores`) or
    ``"logit"`` (:func:`score_rows`, the raw output)."""
    if name == "probability":
        return probability_scores
    if name == "logit":
        return score_rows
    raise RequestError(f"score must be 'probability' or 'logit', not {name!r}")


def layer_key(layer: str | nn.Module | None) -> Any:
    return layer if layer is None or isinstance(layer, str) else id(layer)


def _row(activation: Tensor | None, i: int) -> Tensor | None:
    return None if activation is None else activation[i : i + 1]
