"""Context managers that touch a model for the length of one explanation, and always undo it.

* :func:`capture` records layer outputs with forward hooks (removed on exit), and
  :func:`edit_output` replaces one call's output (Ablation-CAM); :func:`batch_at` runs a pass
  at batch 1 up to one call of a module and at a larger batch from there on.
* :func:`override_rectifiers` changes the backward pass of every rectifier (guided backprop,
  deconvnet): ``nn.ReLU`` (also in place), ``nn.ReLU6``, a module called several times, and
  ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` / ``F.relu6`` / ``F.hardtanh(x, 0, c)`` called
  inside ``forward``. It is a :class:`torch.overrides.TorchFunctionMode`, so it sees each call,
  not each module, and nothing is written onto the user's modules.
* :func:`frozen` puts the model in eval mode with parameters that need no gradient, and restores
  every ``training`` flag and ``requires_grad`` afterwards, also when an exception interrupts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from convlens.checks import RequestError

__all__ = [
    "BackwardRule",
    "Captured",
    "OutputEdit",
    "Unbatchable",
    "batch_at",
    "call_order",
    "capture",
    "edit_output",
    "elementwise",
    "frozen",
    "override_rectifiers",
    "replace_rectifiers",
    "rules",
    "scripted",
]

# A rectifier's backward rule: (grad_output, through) -> grad_input, where ``through(g)`` passes
# ``g`` through the rectifier's true derivative (zero outside 0 < x, and x < upper for ReLU6).
BackwardRule = Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor]


class rules:
    """Backward rules for rectifiers."""

    @staticmethod
    def gradient(grad: Tensor, through: Callable[[Tensor], Tensor]) -> Tensor:
        """The true derivative (for tests)."""
        return through(grad)

    @staticmethod
    def guided(grad: Tensor, through: Callable[[Tensor], Tensor]) -> Tensor:
        """Guided backprop (Springenberg et al. 2015): positive signal, through active units."""
        return through(grad.clamp(min=0))

    @staticmethod
    def deconvnet(grad: Tensor, through: Callable[[Tensor], Tensor]) -> Tensor:
        """Deconvnet (Zeiler & Fergus 2014): rectify the backward signal, ignore the forward."""
        return grad.clamp(min=0)


class Captured(dict):
    """Layer outputs (or inputs) by key, with how often each layer was called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[Any, int] = {}
        self.order: list[Any] = []  # keys in the order of their most recent call


def scripted(module: nn.Module) -> bool:
    """Whether ``module`` is, or contains, TorchScript code (``torch.jit.script`` / ``trace``),
    whose inner calls Python hooks and function modes never see."""
    return any(isinstance(m, torch.jit.ScriptModule) for m in module.modules())


@contextmanager
def capture(layers: Mapping[Any, nn.Module], inputs: bool = False) -> Iterator[Captured]:
    """Record the output (or first input) of each module in ``layers``.

    A module called several times in one forward keeps its last call's tensor. Tensors keep
    their autograd graph, so ``torch.autograd.grad(score, captured[key])`` works. The rest of
    the forward pass gets a copy of a recorded output: an in-place operation after the layer
    (``nn.ReLU(inplace=True)``) changes the copy, never the tensor recorded. A layer inside
    TorchScript code is refused: its hooks would never fire.
    """
    for module in layers.values():
        if scripted(module):
            raise RequestError(
                f"cannot read layer {type(module).__name__}: it is TorchScript code, whose "
                "inner layers Python hooks never see; explain the Python model, or use a method "
                "that needs no layer (saliency, integrated_gradients, occlusion, ...)"
            )
    captured = Captured()
    handles = []
    try:
        for key, module in layers.items():

            def hook(_module: nn.Module, args: Any, output: Any, key: Any = key) -> Any:
                captured[key] = args[0] if inputs else output
                captured.calls[key] = captured.calls.get(key, 0) + 1
                if key in captured.order:
                    captured.order.remove(key)
                captured.order.append(key)
                return output.clone() if not inputs and isinstance(output, Tensor) else None

            handles.append(module.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def call_order(run: Callable[[], Any], among: Iterable[nn.Module]) -> list[nn.Module]:
    """The modules of ``among`` in the order the forward pass ``run()`` calls them (each once,
    at its first call)."""
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, _: order.append(m)) for m in among]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


class OutputEdit:
    """Replaces the output of one call of a module (see :func:`edit_output`)."""

    def __init__(self, edit: Callable[[Tensor], Tensor], call: int) -> None:
        self.edit, self.call, self.seen = edit, call, 0

    def reset(self) -> None:
        """Call before each forward pass: counting restarts."""
        self.seen = 0

    def __call__(self, _module: nn.Module, _args: Any, output: Tensor) -> Tensor | None:
        self.seen += 1
        return self.edit(output) if self.seen == self.call else None


@contextmanager
def edit_output(
    module: nn.Module, edit: Callable[[Tensor], Tensor], call: int = 1
) -> Iterator[OutputEdit]:
    """Within the block, the ``call``-th call of ``module`` in each forward returns ``edit(out)``.

    The yielded object's ``reset()`` must run before every forward pass (a reused module is
    called several times per pass; only the chosen call is edited).
    """
    editor = OutputEdit(edit, call)
    # first among the layer's hooks: what others record (a target on the layer) is the edit
    handle = module.register_forward_hook(editor, prepend=True)
    try:
        yield editor
    finally:
        handle.remove()


class Unbatchable(Exception):
    """A pass cannot take its batch at a layer (the reason is the message); ``early``: a module
    got the batch before the layer (:func:`batch_at`)."""

    def __init__(self, reason: str, early: bool = False) -> None:
        super().__init__(reason)
        self.early = early


@contextmanager
def batch_at(
    root: nn.Module, module: nn.Module, edit: Callable[[Tensor], Tensor], rows: int, call: int = 1
) -> Iterator[OutputEdit]:
    """Within the block, a forward pass of ``root`` on one input runs at batch 1 up to the
    ``call``-th call of ``module``, whose output becomes ``edit(out)`` of ``rows`` rows, and at
    ``rows`` from there on.

    ``root`` sees its input expanded to ``rows`` rows (a view, so code that reads the batch
    size from the input reads ``rows``), and so do the modules that contain ``module`` (a
    wrapper's inner network); the other modules that get that very tensor get the one row
    back. One of them that gets another tensor of ``rows`` rows before the edit raises
    :class:`Unbatchable`: the network would compute the batch before the layer.
    """
    state: dict[str, Any] = {"wide": None, "narrow": None, "reached": False}

    def widen(_root: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], Tensor) or len(args[0]) != 1:
            return None  # not one input: nothing to widen (the edit's batch check decides)
        state.update(narrow=args[0], wide=args[0].expand(rows, *args[0].shape[1:]), reached=False)
        return (state["wide"], *args[1:])

    def narrow(child: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if state["reached"] or state["wide"] is None:
            return None
        wide, one = state["wide"], state["narrow"]
        args = tuple(one if a is wide else a for a in args)
        kwargs = {k: one if v is wide else v for k, v in kwargs.items()}
        for value in (*args, *kwargs.values()):
            if rows > 1 and isinstance(value, Tensor) and value.dim() and len(value) == rows:
                raise Unbatchable(
                    f"{type(child).__name__} gets the input's batch before the layer", early=True
                )
        return args, kwargs

    def reached(output: Tensor) -> Tensor:
        state["reached"] = True
        return edit(output)

    names = {id(m): name for name, m in root.named_modules()}
    inside = names.get(id(module), "")
    children = [
        m for m in root.modules() if m is not root and not inside.startswith(names[id(m)] + ".")
    ]
    handles = [root.register_forward_pre_hook(widen)]
    try:
        handles += [m.register_forward_pre_hook(narrow, with_kwargs=True) for m in children]
        with edit_output(module, reached, call) as editor:
            yield editor
    finally:
        for handle in handles:
            handle.remove()


class _Rectifier(torch.autograd.Function):
    """max(0, x) (or min(max(0, x), upper)) whose backward is a replaceable rule."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, upper: float | None, rule: BackwardRule) -> Tensor:
        out = torch.relu(x) if upper is None else F.hardtanh(x, 0.0, upper)
        # The output, not x, is saved: x may be overwritten by an in-place rectifier. The output
        # tells the same story: 0 < out < upper exactly where 0 < x < upper.
        ctx.save_for_backward(out)
        ctx.upper, ctx.rule = upper, rule
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (out,) = ctx.saved_tensors
        upper = ctx.upper

        def through(g: Tensor) -> Tensor:  # PyTorch's own fused derivative kernels
            if upper is None:
                return torch.ops.aten.threshold_backward(g, out, 0)
            return torch.ops.aten.hardtanh_backward(g, out, 0.0, upper)

        return ctx.rule(grad, through), None, None


_RELU = {F.relu, torch.relu, Tensor.relu}
_RELU_INPLACE = {torch.relu_, Tensor.relu_, F.relu_}


RectifierFunction = Callable[[Tensor, "float | None"], Tensor]

# Elementwise nonlinearities that are not rectifiers (modules call these functions): a method
# whose backward rule is defined for rectifiers must not let them pass a plain gradient.
NONLINEARITIES = {
    F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.elu, F.selu, F.celu, F.softplus, F.mish,
    F.leaky_relu, F.logsigmoid, F.softsign, F.tanhshrink, F.sigmoid, F.tanh, torch.sigmoid,
    torch.tanh, Tensor.sigmoid, Tensor.tanh, torch.sigmoid_, torch.tanh_, Tensor.sigmoid_,
    Tensor.tanh_,
}  # fmt: skip
# Calls another function answers for: (func, args, kwargs) -> result
Other = Callable[[Callable[..., Any], tuple, dict], Any]


def elementwise(
    func: Callable[..., Tensor], args: tuple, kwargs: dict
) -> tuple[Tensor, Callable[[Tensor], Tensor], bool]:
    """A call of a :data:`NONLINEARITIES` function as its input, the out-of-place function of
    one tensor it computes, and whether the call was in place (``sigmoid_``, ``inplace=True``)."""
    x, rest = args[0], args[1:]
    options = {k: v for k, v in kwargs.items() if k != "inplace"}
    name = getattr(func, "__name__", "")
    inplace = bool(kwargs.get("inplace", False)) or name.endswith("_")
    plain = getattr(torch, name.rstrip("_")) if name.endswith("_") else func
    return x, lambda t: plain(t, *rest, **options), inplace


class _RectifierMode(TorchFunctionMode):
    """Every rectifier call, max(0, x) or min(max(0, x), upper), goes to ``apply(x, upper)``;
    ``seen`` (if given) receives each result."""

    def __init__(
        self,
        apply: RectifierFunction,
        seen: Callable[[Tensor], None] | None = None,
        other: Other | None = None,
    ) -> None:
        super().__init__()
        self.apply, self.seen, self.other = apply, seen, other

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if self.other is not None and func in NONLINEARITIES:
            return self.other(func, args, kwargs)
        upper: float | None = None
        if func in _RELU or func in _RELU_INPLACE:
            inplace = func in _RELU_INPLACE or bool(kwargs.get("inplace", False))
        elif func is F.relu6:
            upper, inplace = 6.0, bool(kwargs.get("inplace", False))
        elif func is F.hardtanh:
            low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            upper = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            inplace = args[3] if len(args) > 3 else bool(kwargs.get("inplace", False))
            if low != 0:  # a true hardtanh, not a clipped rectifier
                if self.other is not None:
                    return self.other(func, args, kwargs)
                return func(*args, **kwargs)
        else:
            return func(*args, **kwargs)
        x = args[0]
        out = self.apply(x, upper)
        result = x.copy_(out) if inplace else out
        if self.seen is not None:
            self.seen(result)
        return result


@contextmanager
def override_rectifiers(
    rule: BackwardRule,
    seen: Callable[[Tensor], None] | None = None,
    refuse: str | None = None,
    other: Other | None = None,
) -> Iterator[None]:
    """Within the block, every rectifier's backward pass follows ``rule``; ``seen`` (if given)
    receives every rectifier's output, a tensor known to be non-negative. With ``refuse`` (the
    method's name), any other elementwise nonlinearity (SiLU, GELU, hard-swish, a sigmoid
    gate, ...) stops the forward pass with a one-line error naming it: the rule is defined for
    rectifiers, and elsewhere the method would silently be the plain gradient. With ``other``,
    such calls are computed by ``other(func, args, kwargs)`` instead (LRP passes relevance
    through them).

    Example:
        >>> with override_rectifiers(rules.guided):
        ...     grad = torch.autograd.grad(model(x)[:, c].sum(), x)[0]
    """

    def refusal(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        raise RequestError(
            f"{refuse} defines its backward rule for rectifiers (ReLU, ReLU6); this model also "
            f"applies {getattr(func, '__name__', func)}, through which it would pass the plain "
            "gradient; use saliency, integrated_gradients or smoothgrad"
        )

    apply = lambda x, upper: _Rectifier.apply(x, upper, rule)  # noqa: E731
    with _RectifierMode(apply, seen, refusal if refuse else other):
        yield


@contextmanager
def replace_rectifiers(apply: RectifierFunction, other: Other | None = None) -> Iterator[None]:
    """Within the block, every rectifier (``nn.ReLU``, ``nn.ReLU6``, ``F.relu``, ...; also in
    place) is computed by ``apply(x, upper)``, ``upper`` None for ReLU, and every other
    elementwise nonlinearity (:data:`NONLINEARITIES`) by ``other(func, args, kwargs)`` if given:
    for methods whose backward needs more than the gradient rule of
    :func:`override_rectifiers` (DeepLIFT)."""
    with _RectifierMode(apply, other=other):
        yield


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter, both restored on exit.

    Freezing the parameters means the backward pass computes only what an explanation needs
    (gradients with respect to inputs or activations) and never writes a parameter's ``.grad``.
    """
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        if any(training for _, training in modes):
            module.eval()  # the module's own eval(): custom train() overrides are respected
        for p, requires_grad in flags:
            if requires_grad:
                p.requires_grad_(False)
        yield module
    finally:
        for m, training in modes:
            if m.training != training:
                m.training = training
        for p, requires_grad in flags:
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
