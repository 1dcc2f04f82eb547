"""The base class every explanation method derives from.

A method is one class with one ``@register``: it declares its parameters' defaults and
implements :meth:`Method.explain`. The plumbing it shares (target layers to capture, the engine,
the seeded generator) lives here, so methods contain only their own mathematics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from convlens.checks import RequestTypeError
from convlens.engine import Engine
from convlens.hooks import capture
from convlens.model import Model
from convlens.targets import Target, layer_key, target_layers

__all__ = ["Method"]


class Method(ABC):
    """An explanation method: parameters in, one attribution per input out.

    Class attributes:
        name, family: set by ``@register``.
        description: one line for ``convlens methods``.
        defaults: every parameter the method takes, with its default.
        reduction: how ``Explanation.heatmap`` reduces channels.
        batch_size: default number of images per model call.
        random: whether the method draws random numbers (then ``seed`` matters).
        uses_layer: whether the method takes ``layer``.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = {}
    reduction: str = "max_abs"
    batch_size: ClassVar[int] = 8
    random: ClassVar[bool] = False
    uses_layer: ClassVar[bool] = False

    def __init__(self, model: Model, engine: Engine, params: Mapping[str, Any], seed: int = 0):
        self.model = model
        self.engine = engine
        self.params = dict(params)
        self.seed = seed
        self.extras: dict[str, Any] = {}

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

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with the call's ``seed`` (reproducible bit for bit)."""
        return torch.Generator(device="cpu").manual_seed(self.seed)

    def capturing(self, targets: Sequence[Target]) -> AbstractContextManager[dict[Any, Tensor]]:
        """Capture the inner layers that ``targets`` read (``Channel``, ``Neuron``)."""
        layers: dict[Any, nn.Module] = {
            layer_key(layer): self.model.layer(layer) for layer in target_layers(targets)
        }
        return capture(layers)

    @abstractmethod
    def explain(self, x: Tensor, targets: list[Target]) -> tuple[Tensor, list[Target]]:
        """Attributions for the batch ``x`` and the resolved targets (one per input).

        ``targets`` may still contain ``Predicted()``: the method resolves it from its first
        forward pass of the clean input (``convlens.targets.resolve_targets``).
        """
