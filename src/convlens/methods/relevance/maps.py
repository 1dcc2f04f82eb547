"""What an LRP rule needs of a layer: its map as the forward called it, its transpose, and its
effective parameters (a following BatchNorm folded in).

A :class:`LinearMap` is one call a layer's forward made (F.conv2d with its strides, padding,
dilation and groups; F.linear; an average pooling), run with any weight the rule chooses, and
its transpose. Convolutions transpose with one transposed convolution in the tensors' own
memory layout, dense layers with one matrix product, everything else with autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens.checks import pair

__all__ = [
    "LINEAR",
    "LinearMap",
    "Merge",
    "affine_map",
    "bind",
    "fold",
    "per_row",
    "stabilise",
]

LINEAR = (nn.Conv2d, nn.Linear)  # the layers whose calls LRP gives a rule


def stabilise(z: Tensor, epsilon: float) -> Tensor:
    """z + epsilon * sign(z), the sign of a zero taken from its sign bit: never divides by zero
    (two passes over z, where sign() would need a third for its zeros)."""
    return z + torch.copysign(z.new_tensor(epsilon), z)


def per_row(t: Tensor) -> Tensor:
    """The sum of each row of a batch, in any memory layout (flatten would copy channels-last)."""
    return t.sum(dim=tuple(range(1, t.dim()))) if t.dim() > 1 else t


SDPA = (
    "query key value attn_mask dropout_p is_causal scale",
    (None, None, None, None, 0.0, False, None),
)


def attention_scale(call: dict[str, Any]) -> float:
    """The factor F.scaled_dot_product_attention (``call`` bound with :data:`SDPA`) puts on
    q k^T: its ``scale``, or 1/sqrt(d)."""
    return call["scale"] if call["scale"] is not None else call["query"].shape[-1] ** -0.5


def attention_mask(call: dict[str, Any], scores: Tensor) -> Tensor:
    """What F.scaled_dot_product_attention adds to ``scores`` before the softmax: -inf where
    a causal or boolean mask hides a position, a float mask as it is, else 0."""
    added = torch.zeros_like(scores[0])
    if call["is_causal"]:
        n, m = scores.shape[-2:]
        causal = torch.ones(n, m, dtype=torch.bool, device=scores.device).tril()
        added = added.masked_fill(~causal, float("-inf"))
    mask = call["attn_mask"]
    if mask is not None:
        added = (
            added.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else added + mask
        )
    return added


def bind(names: str, defaults: tuple, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a functional call by name."""
    call = dict(zip(names.split(), defaults, strict=True))
    call.update(zip(names.split(), args, strict=False))
    call.update(kwargs)
    return call


class LinearMap:
    """A layer's map as the forward called it: ``forward(x, weight, bias)`` is that call with
    the given parameters (W x + b; the call as it was where ``weight`` is None: pooling, a
    BatchNorm on its own) and ``transpose(signal, x, weight)`` is W^T signal, shaped like x.
    That is all an LRP rule needs of a layer. This base class transposes with autograd.

    ``padding`` maps a tensor over the layer's own inputs (shape ``inputs``) to the call's
    input, as the layer padded it before F.conv2d (EfficientNet's static padding, padding
    modes): z^B bounds and flat's connections belong to the inputs, never to the padding.
    """

    def __init__(self, call: Callable[[Tensor, Tensor | None, Tensor | None], Tensor]) -> None:
        self.call = call
        self.padding: Callable[[Tensor], Tensor] | None = None
        self.inputs: torch.Size | None = None
        # the input's channel dimension where the map may run on inputs stacked along it (with
        # its weights stacked along dimension 1); None where groups forbid it
        self.channel_dim: int | None = None
        self.non_negative = False  # the input is known to be >= 0 (a rectifier's output)

    def forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None = None) -> Tensor:
        return self.call(x, weight, bias)

    def transpose(self, signal: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (result,) = torch.autograd.grad(self.forward(leaf, weight), leaf, signal)
        return result

    def weigh(self, signal: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
        """x * W^T signal: each input's share of the signal (a new tensor)."""
        return x * self.transpose(signal, x, weight)

    def over_inputs(self, make: Callable[[torch.Size], Tensor], x: Tensor) -> Tensor:
        """``make(shape)`` over the layer's own inputs, padded as the call's input ``x``."""
        if self.padding is None or self.inputs is None:
            return make(x.shape)
        return self.padding(make(self.inputs))


class Conv2dMap(LinearMap):
    """F.conv2d with numeric padding: the transpose is one transposed convolution, in the
    layout of the input (``F.grad.conv2d_input`` would turn channels-last into a copy)."""

    def __init__(self, stride: Any, padding: Any, dilation: Any, groups: int) -> None:
        super().__init__(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups))
        self.args = (pair(stride), pair(padding), pair(dilation), groups)
        self.channel_dim = 1 if groups == 1 else None

    def transpose(self, signal: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
        stride, padding, dilation, groups = self.args
        return torch.ops.aten.convolution_backward(
            signal, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [True, False, False],
        )[0]  # fmt: skip

    def weigh(self, signal: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
        return self.transpose(signal, x, weight).mul_(x)  # the transpose is a new tensor


class DenseMap(LinearMap):
    """F.linear: the transpose is one matrix product."""

    def __init__(self) -> None:
        super().__init__(F.linear)
        self.channel_dim = -1

    def transpose(self, signal: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
        return signal @ weight

    def weigh(self, signal: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
        return self.transpose(signal, x, weight).mul_(x)  # the product is a new tensor


def affine_map(func: Callable, call: dict[str, Any]) -> LinearMap:
    """The map of a call to F.linear or F.conv2d (bound by :func:`bind`)."""
    if func is F.linear:
        return DenseMap()
    padding = call["padding"]
    stride, dilation, groups = call["stride"], call["dilation"], call["groups"]
    if padding == "valid":
        padding = 0
    if isinstance(padding, str):  # "same": autograd transposes whatever F.conv2d pads
        return LinearMap(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups))
    return Conv2dMap(stride, padding, dilation, groups)


class Merge:
    """One convolution call's parameters and the eval-mode batch norm merged into it (its
    F.batch_norm call's arguments but the input), folded once needed."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.bn: dict[str, Any] | None = None
        self.scaled: tuple[Tensor, Tensor] | None = None  # per output channel: s and the bias

    def folded(self) -> tuple[Tensor, Tensor]:
        """The folded weight w * s and bias (:func:`fold` has run). Each weight is scaled when
        its layer's rule needs it, so that one folded weight at a time is held."""
        scale, bias = self.scaled  # type: ignore[misc]
        return self.weight * scale.view(-1, *([1] * (self.weight.dim() - 1))), bias


def fold(merges: list[Merge]) -> None:
    """Fold each batch norm into its convolution: w * s and b * s + beta - mean * s with
    s = gamma / sqrt(var + eps). The per-channel arithmetic of all of them runs at once, on
    their concatenated statistics (a few operations per backward pass, not a few per layer);
    the weights are scaled by :meth:`Merge.folded`."""
    bns: list[dict[str, Any]] = [m.bn for m in merges if m.bn is not None]
    sizes = [len(bn["running_var"]) for bn in bns]
    like = bns[0]["running_var"]

    def joined(values: list[Tensor | None], default: float) -> Tensor | None:
        if all(v is None for v in values):
            return None
        pairs = zip(values, sizes, strict=True)
        return torch.cat([like.new_full((n,), default) if v is None else v for v, n in pairs])

    repeats = torch.tensor(sizes, device=like.device)
    eps = like.new_tensor([bn["eps"] for bn in bns]).repeat_interleave(repeats)
    scale = joined([bn["running_var"] for bn in bns], 1.0).add_(eps).rsqrt_()  # type: ignore[union-attr]
    gamma, beta = joined([bn["weight"] for bn in bns], 1.0), joined([bn["bias"] for bn in bns], 0.0)
    if gamma is not None:
        scale = scale.mul_(gamma)
    shift = joined([bn["running_mean"] for bn in bns], 0.0).mul_(scale).neg_()  # type: ignore[union-attr]
    if beta is not None:
        shift = shift.add_(beta)
    bias = joined([m.bias for m in merges], 0.0)
    if bias is not None:
        shift = shift.addcmul_(bias, scale)
    for m, s, b in zip(merges, scale.split(sizes), shift.split(sizes), strict=True):
        m.scaled = s, b
