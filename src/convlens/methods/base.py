"""The base class every explanation method derives from.

A method is one class with one ``@register``: it declares its parameters' defaults and the
``extras`` it reports, and implements :meth:`Method.explain`, which returns a :class:`Result`.
Everything a method does to the model goes through its engine (``self.engine``: chunking,
counting, device, dtype, layout, output selection, the first pass and the perturbation loop),
so a method file holds only its mathematics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from convlens.checks import RequestTypeError
from convlens.engine import Engine
from convlens.model import Model
from convlens.targets import Target

__all__ = ["Method", "Result"]


@dataclass
class Result:
    """What a method returns: the attribution, the targets it explained, and what it decided.

    Attributes:
        attribution: (B, 1 or C, H, W) at input resolution.
        targets: one resolved target per input.
        resolved: what the method chose itself, as data (the layer, the base method's
            parameters, the game actually played, ...); ``params`` stays what the caller asked.
        extras: method-specific results, each key documented in the method's ``extras``.
        reduction: the heat map's channel reduction where it is not the class's own
            (SmoothGrad takes its base method's).
    """

    attribution: Tensor
    targets: list[Target]
    resolved: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    reduction: str | None = None


class Method(ABC):
    """An explanation method: parameters in, one attribution per input out.

    Class attributes:
        name, family: set by ``@register``.
        description: one line for ``convlens methods``.
        defaults: every parameter the method takes, with its default.
        extras: the keys of ``Explanation.extras`` the method fills, each with its meaning.
        reduction: how ``Explanation.heatmap`` reduces channels.
        batch_size: default number of images per model call.
        random: whether the method draws random numbers (then ``seed`` matters).
        uses_layer: whether the method takes ``layer``.
        passes: the forward passes per image, as a formula of the parameters (for
            ``convlens methods``); backward passes are as many where the method takes gradients.
        reads_inside: whether the method changes backward rules or reads inner layers, which
            TorchScript code hides from Python (the method is refused on scripted models).
        prediction_only: whether the method explains only each input's predicted class (its
            question is about the prediction); other class targets are refused.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = {}
    extras: ClassVar[Mapping[str, str]] = {}
    reduction: ClassVar[str] = "max_abs"
    batch_size: ClassVar[int] = 8
    random: ClassVar[bool] = False
    uses_layer: ClassVar[bool] = False
    reads_inside: ClassVar[bool] = False
    prediction_only: ClassVar[bool] = False
    passes: ClassVar[str] = "1 forward and backward pass"

    def __init__(self, engine: Engine, params: Mapping[str, Any], seed: int = 0):
        self.engine = engine
        self.model: Model = engine.model
        self.params: Mapping[str, Any] = dict(params)
        self.seed = seed

    @classmethod
    def resolve_params(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``given``; unknown names raise an error listing valid ones."""
        unknown = sorted(set(given) - set(cls.defaults))
        if unknown:
            valid = ", ".join(sorted(cls.defaults)) or "(none)"
            raise RequestTypeError(
                f"method {cls.name!r} got unknown parameter(s) {', '.join(unknown)}; "
                f"it takes: {valid}"
            )
        return {**cls.defaults, **given}

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        """Raise a :class:`~convlens.checks.RequestError` naming the first bad value among
        ``params`` (from :meth:`resolve_params`), before any work is done. Subclasses extend
        it with their own parameters."""
        return None

    @classmethod
    def check_targets(cls, targets: Sequence[Target]) -> None:
        """Refuse, before any work, targets the method cannot explain (``Predicted()`` is
        still unresolved here)."""
        return None

    @classmethod
    def needs_python(cls, params: Mapping[str, Any]) -> bool:
        """Whether the method, with ``params``, must see the model's Python code
        (:attr:`reads_inside`)."""
        return cls.reads_inside

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with the call's ``seed`` (reproducible bit for bit)."""
        return torch.Generator(device="cpu").manual_seed(self.seed)

    @abstractmethod
    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        """Attributions for the batch ``x`` (one target per input; ``Predicted()`` targets are
        resolved by the method's first pass, ``Engine.evaluate``)."""
