"""What the nodes of a ``torch.fx`` graph do to the spatial layout of a feature map.

The core of incremental occlusion (:mod:`convlens.incremental`; Nakandala, Kumar &
Papakonstantinou 2019, "Incremental and Approximate Inference for Faster Occlusion-based Deep
CNN Explanations", SIGMOD): which operations are *local* — an output pixel reads a known window
of input pixels (:class:`Window`: convolutions, pooling, constant padding) or only the same
pixel (:func:`is_pointwise`: normalisation in eval mode, activations, elementwise arithmetic,
concatenation along channels) — and how a graph node is run, on values or on shapes alone
(meta tensors, parameters included), with in-place operations on a copy.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["Window", "call", "conv_macs", "is_pointwise", "mutates", "shape_only", "through",
           "window_of"]  # fmt: skip

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout2d,
)  # fmt: skip
_POINTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu,
    F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.softplus, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.clamp,
    torch.clip, torch.square, operator.add, operator.sub, operator.mul, operator.truediv,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.neg, torch.add,
    torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}  # fmt: skip
_POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
    "clamp_max", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs",
    "exp", "square", "contiguous",
}  # fmt: skip
_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _pair(value: Any) -> tuple[int, int]:
    value = (value,) if isinstance(value, int) else tuple(value)
    return value[0], value[-1]


# argument names and defaults of builtins whose Python signature is hidden
_SIGNATURES: dict[Any, dict[str, Any]] = {
    F.conv2d: {"input": None, "weight": None, "bias": None, "stride": 1, "padding": 0,
               "dilation": 1, "groups": 1},
    F.max_pool2d: {"input": None, "kernel_size": None, "stride": None, "padding": 0,
                   "dilation": 1, "ceil_mode": False, "return_indices": False},
    F.avg_pool2d: {"input": None, "kernel_size": None, "stride": None, "padding": 0,
                   "ceil_mode": False, "count_include_pad": True, "divisor_override": None},
}  # fmt: skip


def _arguments(node: fx.Node, env: Callable[[fx.Node], Any] = lambda n: n) -> dict[str, Any]:
    """The arguments of a ``call_function`` node by name (node values read through ``env``)."""
    args = fx.node.map_arg(node.args, env)
    kwargs = fx.node.map_arg(node.kwargs, env)
    known = _SIGNATURES.get(node.target)
    if known is not None:
        return {**known, **dict(zip(known, args, strict=False)), **kwargs}
    bound = inspect.signature(node.target).bind(*args, **kwargs)  # type: ignore[arg-type]
    bound.apply_defaults()
    return dict(bound.arguments)


@dataclass(frozen=True)
class Window:
    """A local operation that maps regions: output rows [a, a + h) read input rows
    [a s - before, (a + h - 1) s - before + extent), the input padded with ``fill``."""

    source: fx.Node
    extent: tuple[int, int]
    stride: tuple[int, int]
    before: tuple[int, int]
    fill: float
    # the layer on an input crop, without padding, reading its weights through the second
    # argument (an operand's value)
    apply: Callable[[Tensor, Callable[[fx.Node], Any]], Tensor]


def through(
    a: Tensor, b: Tensor, extent: int, stride: int, before: int, size: int, clip: bool = True
) -> tuple[Tensor, Tensor]:
    """Output indices [lo, hi) whose window reads any of input indices [a, b) (per position;
    empty where lo >= hi), inside [0, ``size``), or beyond it without ``clip``."""
    lo = -torch.div(extent - 1 - a - before, stride, rounding_mode="floor")  # ceil division
    hi = torch.div(b - 1 + before, stride, rounding_mode="floor") + 1
    return (lo.clamp(min=0), hi.clamp(max=size)) if clip else (lo, hi)


def mutates(node: fx.Node, graph: fx.GraphModule) -> bool:
    """Whether the node changes its first operand in place."""
    if node.op == "call_module":
        return bool(getattr(graph.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_function":
        if node.target in _IN_PLACE or node.kwargs.get("inplace") is True:
            return True
        try:  # F.relu(x, True): the flag passed by position
            if _arguments(node).get("inplace") is True:
                return True
        except (TypeError, ValueError):  # a builtin without a Python signature
            pass
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    return False


def shape_only(node: fx.Node) -> bool:
    """Whether the node reads only its operand's shape (``x.size(0)``, ``x.shape``)."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and (
        node.target is len or (node.target is getattr and node.args[1:2] in (("shape",), ("ndim",)))
    )


def _meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, Tensor) else value


def _on_meta(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose parameters and buffers are meta tensors (the module
    itself is left as it is)."""
    twin = copy.copy(module)
    twin._parameters = {k: _meta(v) for k, v in module._parameters.items()}  # type: ignore[assignment]
    twin._buffers = {k: _meta(v) for k, v in module._buffers.items()}
    twin._modules = {k: _on_meta(m) for k, m in module._modules.items() if m is not None}
    return twin


def call(node: fx.Node, graph: fx.GraphModule, args: tuple, kwargs: dict, clone: bool,
         meta: bool = False) -> Any:  # fmt: skip
    """One node of the graph on the given operands (the first one copied with ``clone``: the
    node changes it in place); with ``meta``, on meta tensors (shapes only: parameters too)."""
    if meta:
        args = tuple(fx.node.map_aggregate(args, _meta))
        kwargs = {k: fx.node.map_aggregate(v, _meta) for k, v in kwargs.items()}
        if node.op == "get_attr":
            return _meta(call(node, graph, args, kwargs, clone))
        if node.op == "call_module":
            module = graph.get_submodule(str(node.target))
            if type(module) in (nn.BatchNorm2d, *_POINTWISE_MODULES):
                return args[0]  # the same shape
            return _on_meta(module)(*args, **kwargs)
    if clone and args and isinstance(args[0], Tensor):
        args = (args[0].clone(), *args[1:])
    if node.op == "call_module":
        return graph.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "get_attr":
        value: Any = graph
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value
    raise ValueError(f"cannot run node {node.op}")


def conv_macs(node: fx.Node, graph: fx.GraphModule, cache: dict[fx.Node, Any]) -> float:
    """Multiply-adds of a convolution node at batch 1 (0 for other nodes)."""
    if node.op == "call_module" and type(graph.get_submodule(str(node.target))) is nn.Conv2d:
        weight = graph.get_submodule(str(node.target)).weight
    elif node.op == "call_function" and node.target is F.conv2d:
        weight = _arguments(node, cache.__getitem__)["weight"]
    else:
        return 0.0
    return float(cache[node].numel() * weight[0].numel())


def _fits(
    inputs: Tensor, out: Tensor, extent: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], ceil: bool = False,
) -> bool:  # fmt: skip
    """Whether the output size is the one the window's geometry gives."""
    for size, o, e, s, p in zip(inputs.shape[-2:], out.shape[-2:], extent, stride, padding,
                                strict=True):  # fmt: skip
        span = size + 2 * p - e
        if o != span // s + 1 and not (ceil and o == -(-span // s) + 1):
            return False
    return True


Reader = Callable[[fx.Node], Any]  # an operand's value


def _conv(source: fx.Node, a: dict[str, Any], inputs: Tensor, out: Tensor,
          again: Callable[[Reader], dict[str, Any]]) -> Window | None:  # fmt: skip
    """A convolution (``F.conv2d``'s arguments ``a``; ``again(value)`` reads them at run
    time) on crops: padding 0, the halo read."""
    weight, groups = a["weight"], a["groups"]
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        return None
    kernel, dilation = _pair(weight.shape[-2:]), _pair(a["dilation"])
    extent = (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)
    padding = a["padding"]
    if padding == "valid":
        padding = 0
    elif padding == "same":
        padding = ((extent[0] - 1) // 2, (extent[1] - 1) // 2)
    stride, padding = _pair(a["stride"]), _pair(padding)
    if not _fits(inputs, out, extent, stride, padding):
        return None

    def apply(patch: Tensor, value: Callable[[fx.Node], Any]) -> Tensor:
        b = again(value)
        return F.conv2d(patch, b["weight"], b["bias"], stride, 0, dilation, groups)

    return Window(source, extent, stride, padding, 0.0, apply)


def _pool(
    source: fx.Node, a: dict[str, Any], is_max: bool, inputs: Tensor, out: Tensor
) -> Window | None:
    """Max or average pooling (``F.max_pool2d``'s or ``F.avg_pool2d``'s arguments ``a``)."""
    kernel, padding = _pair(a["kernel_size"]), _pair(a["padding"])
    stride = _pair(a["stride"] or a["kernel_size"])
    if is_max:
        if a["return_indices"]:
            return None
        dilation = _pair(a["dilation"])
        extent = (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)
        if not _fits(inputs, out, extent, stride, padding, ceil=a["ceil_mode"]):
            return None  # beyond the map max pooling reads -inf: ceil_mode is exact

        def apply(patch: Tensor, _: Any) -> Tensor:
            return F.max_pool2d(patch, kernel, stride, 0, dilation)

        return Window(source, extent, stride, padding, -math.inf, apply)
    if (any(padding) and not a["count_include_pad"]) or not _fits(
        inputs, out, kernel, stride, padding
    ):
        return None  # a divisor that depends on the position
    divisor = a["divisor_override"]

    def average(patch: Tensor, _: Any) -> Tensor:
        return F.avg_pool2d(patch, kernel, stride, 0, False, True, divisor)

    return Window(source, kernel, stride, padding, 0.0, average)


def _pad(source: fx.Node, pad: Sequence[int], value: float) -> Window:
    """Constant padding (left, right[, top, bottom]): a shift, ``value`` beyond the map."""
    before = (pad[2] if len(pad) == 4 else 0, pad[0])
    return Window(source, (1, 1), (1, 1), before, value, lambda patch, _: patch)


def is_pointwise(node: fx.Node, graph: fx.GraphModule) -> bool:
    """Whether the node is elementwise over the map (or a concatenation along channels)."""
    if node.op == "call_module":
        module = graph.get_submodule(str(node.target))
        if type(module) is nn.BatchNorm2d:
            return not module.training and module.running_mean is not None
        return type(module) in _POINTWISE_MODULES and not module.training
    if node.op == "call_method":
        return node.target in _POINTWISE_METHODS
    if node.op != "call_function":
        return False
    if node.target in (torch.cat, torch.concat):  # along channels
        return (node.args[1:2] or (node.kwargs.get("dim", 0),))[0] in (1, -3)
    if node.target in (F.dropout, F.batch_norm):
        return _arguments(node)["training"] is False
    return node.target in _POINTWISE_FUNCTIONS


def window_of(node: fx.Node, graph: fx.GraphModule, cache: dict[fx.Node, Any]) -> Window | None:
    """The region map of a convolution, pooling or constant padding, else None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, inputs, out = node.args[0], cache[node.args[0]], cache[node]
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        return None
    if node.op == "call_module":
        m = graph.get_submodule(str(node.target))
        if len(node.args) != 1 or node.kwargs:
            return None
        if type(m) is nn.Conv2d and m.padding_mode == "zeros":
            a = {"weight": m.weight, "bias": m.bias, "stride": m.stride,
                 "padding": m.padding, "dilation": m.dilation, "groups": m.groups}  # fmt: skip
            return _conv(source, a, inputs, out, lambda _: a)
        if type(m) in (nn.MaxPool2d, nn.AvgPool2d):
            return _pool(source, vars(m), type(m) is nn.MaxPool2d, inputs, out)
        if type(m) in (nn.ZeroPad2d, nn.ConstantPad2d):
            return _pad(source, m.padding, float(getattr(m, "value", 0.0)))
        return None
    if node.op != "call_function":
        return None
    if node.target in (F.conv2d, F.max_pool2d, F.avg_pool2d, F.pad):
        a = _arguments(node, cache.__getitem__)
        if node.target is F.conv2d:
            return _conv(source, a, inputs, out, lambda value: _arguments(node, value))
        if node.target is F.pad:
            if a["mode"] != "constant" or len(a["pad"]) not in (2, 4):
                return None
            return _pad(source, a["pad"], float(a["value"] or 0.0))
        return _pool(source, a, node.target is F.max_pool2d, inputs, out)
    return None
