"""The backward pass that propagates relevance: a function mode over the model's forward.

While the forward runs, a TorchFunctionMode sees every call: each F.conv2d / F.linear with a
layer's weight, F.batch_norm and average pooling is computed by an autograd function whose
backward redistributes relevance by the layer's rule (:mod:`.rules`), running the very call the
layer made (its strides, groups, dilation; its padding, inside F.conv2d or as a separate F.pad
that the backward undoes). Rectifiers pass relevance through unchanged, max pooling routes it
to the winner, and residual additions written as ``a + b`` inside ``forward`` split it in
proportion to the two terms (so do ``mean`` reductions). A BatchNorm that reads a
convolution's output is folded into that convolution's parameters for its rule (the modules
themselves are never changed). What biases, stabilisers and constant paddings absorb is
counted, layer by layer, in a :class:`Ledger`, so that input relevance + absorbed = the
target's score.

Everything happens inside :func:`lrp_context`; no module is swapped and no hook is left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from convlens.checks import RequestError
from convlens.hooks import elementwise, override_rectifiers

from .maps import (
    LINEAR,
    SDPA,
    LinearMap,
    Merge,
    affine_map,
    attention_mask,
    attention_scale,
    bind,
    fold,
    per_row,
    stabilise,
)
from .rules import Epsilon, Rule

__all__ = ["Ledger", "lrp_context"]

# A composite's choice: the rule of each call of a convolution or dense layer, asked in the
# order the forward calls them (so the first call is the input layer).
Rules = Callable[[nn.Module], Rule]


class Ledger:
    """Relevance absorbed (per input) by biases and stabilisers, and a re-entrance flag.

    Each layer reports what it received and what it passed on; ``absorbed`` is the sum of the
    differences. Relevance passed on is usually received by the next layer unchanged (the very
    tensor): such a pair cancels and is never summed. Only what is received from elsewhere (an
    accumulation of branches, the target's score) and what is passed on but never received
    as it is (into such accumulations, or the input relevance) is summed, in double precision.
    """

    KEPT = 8  # tensors passed on and awaited; older ones are summed and let go

    def __init__(self) -> None:
        self.inside = False
        self._sums: list[Tensor] = []  # per-input sums: + received, - passed on
        self._pending: dict[int, Tensor] = {}

    def add(self, before: Tensor, *after: Tensor) -> None:
        """A layer received ``before`` and passed on ``after``."""
        if self._pending.get(id(before)) is before:
            del self._pending[id(before)]
        else:
            self._sums.append(per_row(before).double())
        for t in after:
            self._pending[id(t)] = t
        while len(self._pending) > self.KEPT:
            self._settle(next(iter(self._pending)))

    def _settle(self, key: int) -> None:
        self._sums.append(-per_row(self._pending.pop(key)).double())

    @property
    def absorbed(self) -> Tensor | None:
        for key in list(self._pending):
            self._settle(key)
        return torch.stack(self._sums).detach().sum(0) if self._sums else None


class _Layer(torch.autograd.Function):
    """Computes a layer's output (``compute(x)``, without recording it); its backward
    redistributes relevance to the input (``step(x, relevance)``)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        compute: Callable[[Tensor], Tensor],
        step: Callable[[Tensor, Tensor], Tensor],
    ) -> Tensor:
        ctx.save_for_backward(x)
        ctx.step = step
        return compute(x)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return ctx.step(x, relevance), None, None


class _Padded(torch.autograd.Function):
    """Constant padding (``compute(x)``, F.pad without cropping) as a layer of the ledger: the
    relevance on its border is what the constant absorbs (nothing, for zeros: every rule puts
    relevance on an input in proportion to it), the rest goes back to x."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        compute: Callable[[Tensor], Tensor],
        ledger: Ledger,
        pad: tuple[int, ...],
    ) -> Tensor:
        ctx.ledger, ctx.pad, ctx.shape = ledger, pad, x.shape
        return compute(x)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor | None, ...]:
        inner = relevance
        for k in range(len(ctx.pad) // 2):  # F.pad's pairs, from the last dimension on
            inner = inner.narrow(-1 - k, ctx.pad[2 * k], ctx.shape[-1 - k])
        ctx.ledger.add(relevance, inner)
        return inner, None, None, None


class _Through(torch.autograd.Function):
    """Computes a merged BatchNorm's output; relevance passes to its input unchanged (the
    convolution before it redistributes it with the BatchNorm folded into its parameters)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        return compute(x)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None]:
        return relevance, None


class _Proportional(torch.autograd.Function):
    """A bias-free linear operation (a sum of two terms, a mean): each input receives relevance
    in proportion to its contribution, x * dz/dx * R / z."""

    @staticmethod
    def forward(
        ctx: Any, op: Callable[..., Tensor], epsilon: float, ledger: Ledger, *inputs: Tensor
    ) -> Tensor:
        ctx.op, ctx.epsilon, ctx.ledger = op, epsilon, ledger
        ctx.save_for_backward(*inputs)
        return op(*inputs)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Any, ...]:
        inputs = ctx.saved_tensors
        if ctx.op is torch.add:  # dz/dx = 1: no autograd needed
            signal = relevance / stabilise(torch.add(*inputs), ctx.epsilon)
            shares = [t * signal for t in inputs]
        else:
            leaves = [t.detach().requires_grad_(True) for t in inputs]
            with torch.enable_grad():
                z = ctx.op(*leaves)
                grads = torch.autograd.grad(z, leaves, relevance / stabilise(z, ctx.epsilon))
            shares = [t.detach() * g for t, g in zip(leaves, grads, strict=True)]
        ctx.ledger.add(relevance, *shares)
        return (None, None, None, *shares)


class _Joined(torch.autograd.Function):
    """A concatenation of varying tensors and constants (a class token): each part gets its
    own slice of relevance; what falls on constants is absorbed, like a bias's share."""

    @staticmethod
    def forward(ctx: Any, ledger: Ledger, dim: int, varying: list[bool], *parts: Tensor) -> Tensor:
        ctx.ledger, ctx.dim, ctx.varying = ledger, dim, varying
        ctx.sizes = [p.shape[dim] for p in parts]
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Any, ...]:
        shares = relevance.split(ctx.sizes, ctx.dim)
        passed = [s for s, v in zip(shares, ctx.varying, strict=True) if v]
        ctx.ledger.add(relevance, *passed)
        kept = (s if v else None for s, v in zip(shares, ctx.varying, strict=True))
        return (None, None, None, *kept)


_ADDS = {Tensor.__add__, Tensor.__radd__, Tensor.add, torch.add}
_ADDS_IN_PLACE = {Tensor.__iadd__, Tensor.add_}  # ResNet's ``out += identity``
_MEANS = {Tensor.mean, torch.mean}
_PRODUCTS = {Tensor.__mul__, Tensor.__rmul__, Tensor.mul, torch.mul}
_PRODUCTS_IN_PLACE = {Tensor.__imul__, Tensor.mul_}
_QUOTIENTS = {Tensor.__truediv__, Tensor.div, torch.div}
_MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm}


class _Gate(torch.autograd.Function):
    """signal x gate (a squeeze-and-excitation gate): all relevance to the signal, none to
    the gate, the signal-take-all rule of Arras et al. 2017 ("Explaining Recurrent Neural
    Network Predictions in Sentiment Analysis", WASSA) for multiplicative gates."""

    @staticmethod
    def forward(ctx: Any, signal: Tensor, gate: Tensor) -> Tensor:
        return signal * gate

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None]:
        return relevance, None


_CONV = "input weight bias stride padding dilation groups", (None, None, None, 1, 0, 1, 1)
_LINEAR = "input weight bias", (None, None, None)
_LAYER_NORM = "input normalized_shape weight bias eps", (None, None, None, None, 1e-5)
_BATCH_NORM = (
    "input running_mean running_var weight bias training momentum eps",
    (None, None, None, None, None, False, 0.1, 1e-5),
)


class _LRPMode(TorchFunctionMode):
    """Replaces, while the forward runs, each operation by one whose backward propagates
    relevance: F.conv2d / F.linear with a layer's weight (its rule), F.batch_norm (merged into
    the convolution it follows, or epsilon), average pooling (epsilon), additions of two
    same-shape tensors and means (proportional). F.pad is recorded, so that a convolution
    knows the padding its layer applied."""

    def __init__(
        self, layers: dict[int, nn.Module], rules: Rules, ledger: Ledger, epsilon: float
    ) -> None:
        super().__init__()
        self.layers, self.rules, self.ledger, self.epsilon = layers, rules, ledger, epsilon
        self.plain = Epsilon(epsilon)  # for operations without parameters of their own
        self.handled: dict[nn.Module, int] = {}  # calls each layer made through its rule
        self.produced: dict[int, tuple[Tensor, Merge]] = {}
        self.merges: list[Merge] = []  # with a batch norm, not yet folded
        self.pads: dict[int, tuple[Tensor, torch.Size, Callable[[Tensor], Tensor]]] = {}
        self.non_negative: dict[int, Tensor] = {}  # rectifiers' outputs (and their paddings)
        self.handlers: dict[Any, Callable[..., Tensor | None]] = {
            F.conv2d: self._affine,
            F.linear: self._affine,
            F.batch_norm: self._batch_norm,
            F.avg_pool2d: self._pool,
            F.adaptive_avg_pool2d: self._pool,
            F.pad: self._pad,
            **dict.fromkeys(_ADDS | _ADDS_IN_PLACE, self._add),
            **dict.fromkeys(_MEANS, self._mean),
            **dict.fromkeys(_PRODUCTS | _PRODUCTS_IN_PLACE | _QUOTIENTS, self._product),
            F.layer_norm: self._layer_norm,
            **dict.fromkeys(_MATMULS, self._attention),
            torch.cat: self._cat,
            F.scaled_dot_product_attention: self._fused_attention,
        }

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        handler = self.handlers.get(func)
        if handler is not None and not self.ledger.inside and torch.is_grad_enabled():
            result = handler(func, args, kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)

    def clear(self) -> None:
        """Forget what the forward noted; the merges stay, for a backward pass to fold."""
        self.produced.clear()
        self.pads.clear()
        self.non_negative.clear()

    def rectified(self, out: Tensor) -> None:
        """Note a rectifier's output: the layers that read it skip the sign test."""
        self.non_negative[id(out)] = out

    def _known_non_negative(self, x: Tensor) -> bool:
        known = self.non_negative.pop(id(x), None)
        return known is x

    def _layer(
        self,
        x: Tensor,
        compute: Callable[[Tensor], Tensor],
        rule: Rule,
        linear_map: LinearMap,
        effective: Callable[[], tuple[Tensor | None, Tensor | None]],
    ) -> Tensor:
        """The layer's output ``compute(x)`` as a _Layer whose backward applies ``rule`` through
        ``linear_map`` with the ``effective`` parameters (a BatchNorm folded in)."""
        ledger = self.ledger

        def step(x: Tensor, relevance: Tensor) -> Tensor:
            ledger.inside = True
            try:
                r = rule(linear_map, x, relevance, *effective())
            finally:
                ledger.inside = False
            ledger.add(relevance, r)
            return r

        return _Layer.apply(x, compute, step)

    def _affine(self, func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
        call = bind(*(_LINEAR if func is F.linear else _CONV), args, kwargs)
        layer = self.layers.get(id(call["weight"]))
        if layer is None:
            return None
        self.handled[layer] = self.handled.get(layer, 0) + 1
        linear_map = affine_map(func, call)
        padded = self.pads.pop(id(call["input"]), None)
        if padded is not None and padded[0] is call["input"]:
            linear_map.inputs, linear_map.padding = padded[1], padded[2]
        linear_map.non_negative = self._known_non_negative(call["input"])
        merge = Merge(call["weight"], call["bias"])

        def effective() -> tuple[Tensor | None, Tensor | None]:
            if merge.bn is None:
                return merge.weight, merge.bias
            if merge.scaled is None:  # the first folded layer of the backward folds them all
                fold(self.merges)
                self.merges.clear()
            return merge.folded()

        rest = {k: v for k, v in call.items() if k != "input"}
        rule = self.rules(layer)
        out = self._layer(call["input"], lambda t: func(t, **rest), rule, linear_map, effective)
        if func is F.conv2d:
            self.produced[id(out)] = (out, merge)
        return out

    def _batch_norm(self, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        call = bind(*_BATCH_NORM, args, kwargs)
        source = self.produced.pop(id(call["input"]), None)
        if (
            source is not None
            and source[0] is call["input"]
            and not call["training"]
            and call["running_var"] is not None
        ):
            rest = {k: v for k, v in call.items() if k != "input"}
            source[1].bn = rest  # not the input: its graph holds the merge
            self.merges.append(source[1])
            return _Through.apply(call["input"], lambda x: func(x, **rest))
        return self._pool(func, args, kwargs)

    def _pool(self, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        """Epsilon on an operation without parameters of its own to fold or clamp."""
        x, *rest = args
        linear_map = LinearMap(lambda t, w, b: func(t, *rest, **kwargs))
        compute = lambda t: func(t, *rest, **kwargs)  # noqa: E731
        return self._layer(x, compute, self.plain, linear_map, lambda: (None, None))

    def _pad(self, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        x, *rest = args
        call = bind("input pad mode value", (None, None, "constant", None), args, kwargs)
        pad = tuple(call["pad"])
        compute = lambda t: func(t, *rest, **kwargs)  # noqa: E731
        if call["mode"] == "constant" and min(pad, default=0) >= 0:
            out = _Padded.apply(x, compute, self.ledger, pad)
        else:
            out = func(*args, **kwargs)
        self.pads[id(out)] = (out, x.shape, compute)
        if self._known_non_negative(x) and (
            call["mode"] != "constant" or (call["value"] or 0) >= 0
        ):
            self.rectified(out)  # zeros (or copies of its values) around a rectifier's output
        return out

    def _add(self, func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
        if len(args) != 2 or kwargs:
            return None
        a, b = args
        if not (
            isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dim() > 1
        ):
            return None
        if func in _ADDS_IN_PLACE:  # the sum is written into a; the split keeps a's old values
            return a.copy_(_Proportional.apply(torch.add, self.epsilon, self.ledger, a.clone(), b))
        return _Proportional.apply(torch.add, self.epsilon, self.ledger, a, b)

    def _mean(self, func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
        if not (isinstance(args[0], Tensor) and args[0].dim() > 1):
            return None
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = kwargs.get("keepdim", False)

        def mean(t: Tensor) -> Tensor:
            return t.mean(dim=dims, keepdim=keep) if dims is not None else t.mean()

        return _Proportional.apply(mean, self.epsilon, self.ledger, args[0])

    def _layer_norm(self, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        """LayerNorm with its standard deviation held fixed, a linear map (centring and
        scaling) plus its bias, under the epsilon rule: the LN-rule of Ali et al. 2022, "XAI
        for Transformers: Better Explanations through Conservative Propagation" (ICML)."""
        call = bind(*_LAYER_NORM, args, kwargs)
        x, gamma, beta = call["input"], call["weight"], call["bias"]
        dims = tuple(range(-len(call["normalized_shape"]), 0))
        sigma = (x.var(dim=dims, unbiased=False, keepdim=True) + call["eps"]).sqrt().detach()

        def centred(t: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
            y = (t - t.mean(dim=dims, keepdim=True)) / sigma
            y = y if gamma is None else y * gamma
            return y if b is None else y + b

        rest = {k: v for k, v in call.items() if k != "input"}
        compute = lambda t: func(t, **rest)  # noqa: E731
        return self._layer(x, compute, self.plain, LinearMap(centred), lambda: (None, beta))

    def _cat(self, func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
        parts = list(args[0]) if args else list(kwargs.get("tensors", []))
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        varying = [isinstance(p, Tensor) and p.requires_grad for p in parts]
        if all(varying) or not any(varying) or not all(isinstance(p, Tensor) for p in parts):
            return None
        return _Joined.apply(self.ledger, dim, varying, *parts)

    def _fused_attention(self, func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
        """F.scaled_dot_product_attention (timm's fused attention) as its pieces: the weights
        softmax(q k^T s) held fixed, a linear map of the values (the AH-rule, as below)."""
        call = bind(*SDPA, args, kwargs)
        if call["dropout_p"] or kwargs.get("enable_gqa"):
            return None
        q, k = call["query"], call["key"]
        scores = q @ k.transpose(-2, -1) * attention_scale(call)
        weights = (scores + attention_mask(call, scores)).softmax(dim=-1).detach()
        linear = LinearMap(lambda t, w, bias: weights @ t)
        return self._layer(
            call["value"], lambda t: weights @ t, self.plain, linear, lambda: (None, None)
        )

    def _attention(self, func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
        """Attention weights (a softmax output) times values: the weights held fixed, the
        product is a linear map of the values under the epsilon rule, and no relevance goes
        to the weights (the AH-rule of Ali et al. 2022). Other products of matrices keep
        their gradient."""
        if len(args) != 2 or kwargs:
            return None
        a, b = args

        def softmax(t: Any) -> bool:
            return isinstance(t, Tensor) and type(t.grad_fn).__name__.startswith("Softmax")

        if softmax(a) and isinstance(b, Tensor) and b.requires_grad:
            weights = a.detach()
            linear = LinearMap(lambda t, w, bias: func(weights, t))
            return self._layer(
                b, lambda t: func(weights, t), self.plain, linear, lambda: (None, None)
            )
        if softmax(b) and isinstance(a, Tensor) and a.requires_grad:
            weights = b.detach()
            linear = LinearMap(lambda t, w, bias: func(t, weights))
            return self._layer(
                a, lambda t: func(t, weights), self.plain, linear, lambda: (None, None)
            )
        return None

    def _product(self, func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
        """A product with a constant (a layer scale) or a quotient by one passes relevance
        unchanged (the epsilon rule of a map without bias); a product of a signal and a smaller
        gate that broadcasts over it gives all relevance to the signal (:class:`_Gate`).
        Other products keep their gradient, and LRP's conservation check then says so."""
        if len(args) != 2 or kwargs:
            return None
        a, b = args
        varying = [isinstance(t, Tensor) and t.requires_grad for t in (a, b)]
        if func in _QUOTIENTS and varying != [True, False]:
            return None
        inplace = func in _PRODUCTS_IN_PLACE
        source = a.clone() if inplace else a
        if all(varying):
            if a.numel() == b.numel():
                return None
            signal, gate = (source, b) if a.numel() > b.numel() else (b, source)
            out = _Gate.apply(signal, gate)
        elif any(varying):
            x, c = (source, b) if varying[0] else (b, source)
            out = _Through.apply(x, lambda t: func(t, c) if x is source else func(c, t))
        else:
            return None
        return a.copy_(out) if inplace else out


def _pass_through(grad: Tensor, through: Callable[[Tensor], Tensor]) -> Tensor:
    return grad


def _activation(func: Callable[..., Tensor], args: tuple, kwargs: dict) -> Tensor:
    """An elementwise activation (SiLU, GELU, hard-swish, sigmoid, ...) passes relevance
    through unchanged, as rectifiers do (zennit's Pass rule)."""
    x, compute, inplace = elementwise(func, args, kwargs)
    out = _Through.apply(x, compute)
    return x.copy_(out) if inplace else out


@contextmanager
def lrp_context(
    module: nn.Module, rules: Rules, ledger: Ledger, epsilon: float = 1e-6
) -> Iterator[None]:
    """Within the block, the backward pass of ``module`` propagates relevance (the backward of
    a forward made within the block: it may run after the block, free of its function modes).

    ``rules(layer)`` gives the rule of each call of a convolution or linear layer, asked in
    the order the forward makes them (a composite's chooser, :mod:`.composites`); average
    pooling and a BatchNorm that does not follow a convolution use epsilon. A BatchNorm that
    reads a convolution's output directly is merged into that convolution's rule (its
    parameters are folded in for the backward pass; the module is not touched). A function
    mode sees the calls, recognising each layer by its weight tensor; a weight computed at
    each call (a parametrization such as weight_norm) is recognised by a forward pre-hook,
    with parametrizations cached for the block. No module is swapped and no hook is left
    behind. A layer whose forward does not call F.conv2d / F.linear with its weight is refused
    by name (relevance would pass it as a plain gradient).
    """
    names = {m: name for name, m in module.named_modules() if isinstance(m, LINEAR)}
    layers = {id(m.weight): m for m in names}
    mode = _LRPMode(layers, rules, ledger, epsilon)
    ran: dict[nn.Module, int] = {}

    def computed_weight(layer: nn.Module, args: Any) -> None:
        layers[id(layer.weight)] = layer

    def check(layer: nn.Module, args: Any, out: Any) -> None:
        """Each call of a layer must have gone through its rule: a layer whose forward does
        not call F.conv2d / F.linear with its weight would pass a plain gradient, silently."""
        if not torch.is_grad_enabled() or ledger.inside:
            return
        if layer in computed:
            layers.pop(id(layer.weight), None)
        ran[layer] = ran.get(layer, 0) + 1
        if mode.handled.get(layer, 0) < ran[layer]:
            raise RequestError(
                f"LRP cannot apply its rule to layer {names[layer]!r} "
                f"({type(layer).__name__}): its forward did not call F.conv2d / F.linear with "
                "the layer's weight"
            )

    computed = {
        m
        for m in names
        if parametrize.is_parametrized(m, "weight") or not isinstance(m.weight, nn.Parameter)
    }
    handles = [m.register_forward_pre_hook(computed_weight) for m in computed]
    handles += [m.register_forward_hook(check) for m in names]
    try:
        rectifiers = override_rectifiers(_pass_through, mode.rectified, other=_activation)
        with parametrize.cached(), rectifiers, mode:
            yield
    finally:
        for handle in handles:
            handle.remove()
        mode.clear()
