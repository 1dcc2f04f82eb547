"""DeepLIFT (rescale rule), DeepSHAP and GradientSHAP (expected gradients).

DeepLIFT runs each input together with its reference in one model call, [inputs; references],
and replaces the backward pass of every rectifier and max pooling by DeepLIFT's multipliers.
GradientSHAP streams its rows (input, reference, point on the path, noise) chunk by chunk,
drawing each chunk's random numbers when the chunk is made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from convlens.baselines import check_baseline, make_baseline
from convlens.checks import RequestError, RequestTypeError, finite, positive_int
from convlens.hooks import Captured, elementwise, replace_rectifiers
from convlens.methods.base import Method, Result
from convlens.methods.relevance.maps import SDPA, attention_mask, attention_scale, bind
from convlens.registry import register
from convlens.targets import Predicted, Target, score_rows

__all__ = ["DeepLift", "GradientShap", "deeplift_context", "shap_draws"]

DELTA_EPS = 1e-10  # |x - x0| below which a multiplier falls back to the derivative


class _Rescale(torch.autograd.Function):
    """A rectifier on a batch [inputs; references] whose backward uses DeepLIFT's rescale
    multiplier (f(x) - f(x0)) / (x - x0) for both halves (the derivative where x = x0).

    The multiplier is computed in the forward, from x as it is then (the model may change x
    in place afterwards: an in-place rectifier, x += skip), and only it is kept: half the
    batch, where a copy of x would be all of it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, upper: float | None) -> Tensor:
        out = torch.relu(x) if upper is None else torch.clamp(x, 0.0, upper)
        with torch.no_grad():
            xi, xr = x.detach().chunk(2)
            yi, yr = out.detach().chunk(2)
            dx = xi - xr
            multiplier = torch.sub(yi, yr).div_(dx)
            # where x = x0, the derivative: 1 in the linear range, else 0 (PyTorch's own
            # backward kernels, on a broadcast one)
            one = xi.new_ones(()).expand_as(xi)
            derivative = (
                torch.ops.aten.threshold_backward(one, xi, 0)
                if upper is None
                else torch.ops.aten.hardtanh_backward(one, xi, 0.0, upper)
            )
            close = dx.abs_() <= DELTA_EPS  # (x0 = x in half precision too, where it is 0)
            ctx.multiplier = torch.where(close, derivative, multiplier, out=multiplier)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return (grad.unflatten(0, (2, -1)) * ctx.multiplier).flatten(0, 1), None


class _MaxPoolDelta(torch.autograd.Function):
    """Max pooling on [inputs; references] whose backward satisfies summation-to-delta: in each
    window, the output change y - y0 goes to the inputs' maximum (its part above the
    reference's maximum, max(y, y0) - y0) and to the reference's maximum (the rest,
    y - max(y, y0)), then is divided by each position's x - x0 (the gradient where x = x0)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, args: tuple) -> Tensor:
        out = F.max_pool2d(x, *args)
        ctx.save_for_backward(x)
        # the output is kept apart: the model may add to it in place (Xception's x += skip)
        ctx.args, ctx.out = args, out.detach().clone()
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        args = ctx.args
        _, indices = F.max_pool2d(x, *args, return_indices=True)
        y, y0 = ctx.out.chunk(2)
        top = torch.max(y, y0)
        delta = torch.cat([top - y0, y - top])
        # the score reads the inputs' half only: its signal serves both argmax positions
        grad = torch.cat([grad.chunk(2)[0]] * 2)
        # scatter-add, not max_unpool: with overlapping windows one position can win several
        spread = torch.zeros_like(x).flatten(2)
        spread.scatter_add_(2, indices.flatten(2), (grad * delta).flatten(2))
        spread = spread.view_as(x)
        inputs_part, references_part = spread.chunk(2)
        share = inputs_part + references_part
        xi, xr = x.chunk(2)
        dx = xi - xr
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(F.max_pool2d(leaf, *args), leaf, grad)
        multiplier = torch.where(
            dx.abs() < DELTA_EPS, gradient.chunk(2)[0], share / torch.where(dx == 0, 1, dx)
        )
        return torch.cat([multiplier, multiplier]), None


class _RescaleAny(torch.autograd.Function):
    """Any elementwise nonlinearity f (SiLU, GELU, sigmoid, tanh, hard-swish, ...) on a batch
    [inputs; references], with the rescale multiplier (f(x) - f(x0)) / (x - x0) (Shrikumar
    et al. 2017, section 3.5.1: the rule for every elementwise nonlinearity), the derivative
    where x = x0."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.x, ctx.f = x.detach().clone(), f
        return f(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, f = ctx.x, ctx.f
        xi, xr = x.chunk(2)
        with torch.enable_grad():
            leaf = xi.detach().requires_grad_(True)
            (derivative,) = torch.autograd.grad(f(leaf).sum(), leaf)
        yi, yr = f(xi), f(xr)
        dx = xi - xr
        same = (dx.abs() < DELTA_EPS) | ~torch.isfinite(dx)  # equal, or both masked (-inf)
        multiplier = torch.where(same, derivative, (yi - yr) / torch.where(same, 1, dx))
        return grad * torch.cat([multiplier, multiplier]), None


def _nonlinearity(func: Callable[..., Tensor], args: tuple, kwargs: dict) -> Tensor:
    """An elementwise nonlinearity call under DeepLIFT's rescale rule (in place if asked)."""
    x, compute, inplace = elementwise(func, args, kwargs)
    out = _RescaleAny.apply(x, compute)
    return x.copy_(out) if inplace else out


_MAX_POOL = (
    "input kernel_size stride padding dilation ceil_mode return_indices",
    (None, None, None, 0, 1, False, False),
)
_PRODUCTS = {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__}
_IN_PLACE_PRODUCTS = {Tensor.mul_, Tensor.__imul__}
_MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm}
_QUOTIENTS = {torch.div, Tensor.div, Tensor.__truediv__}
_SOFTMAXES = {F.softmax, torch.softmax, Tensor.softmax}
_LAYER_NORM = "input normalized_shape weight bias eps", (None, None, None, None, 1e-5)
# operations whose output change DeepLIFT has no rule to split here: of one varying input
# (other normalisations) and of two (fused attention, einsum)
_WITHOUT_RULE_1 = {F.group_norm, F.instance_norm, F.log_softmax}
_WITHOUT_RULE_2 = {torch.einsum, F.multi_head_attention_forward}


def _pair_mean(t: Tensor) -> Tensor:
    """(t + t0) / 2 for each half of a [inputs; references] batch, on both halves."""
    mean = sum(t.detach().chunk(2)) / 2
    return torch.cat([mean, mean])


def _bilinear(op: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> Tensor:
    """op(a, b) for a bilinear ``op`` (a product, a product of matrices) whose change splits
    as op(Δa, (b + b0)/2) + op((a + a0)/2, Δb): the Shapley values of its two factors, exact
    for any a, b (the output is op(a, b) itself; only the multipliers are these)."""
    linear = op(a, _pair_mean(b)) + op(_pair_mean(a), b)
    return linear + (op(a.detach(), b.detach()) - linear).detach()


def _softmax(z: Tensor, dim: int) -> Tensor:
    """softmax as exp (rescale rule), a sum and a reciprocal (rescale rule) and a product
    (Shapley split): exact summation-to-delta; the shift for stability is the same for an
    input and its reference, so it changes nothing."""
    peak = z.detach().amax(dim=dim, keepdim=True)
    shift = torch.maximum(*peak.chunk(2))  # the same for an input and its reference
    e = _RescaleAny.apply(z - torch.cat([shift, shift]), torch.exp)
    return _bilinear(
        torch.mul, e, _RescaleAny.apply(e.sum(dim=dim, keepdim=True), torch.reciprocal)
    )


def _layer_norm(call: dict[str, Any]) -> Tensor:
    """LayerNorm as centring (linear), a variance (the Shapley split of c·c), an inverse square
    root (rescale rule) and a product (Shapley split): exact summation-to-delta."""
    x = call["input"]
    dims = tuple(range(-len(call["normalized_shape"]), 0))
    c = x - x.mean(dim=dims, keepdim=True)
    variance = _bilinear(torch.mul, c, c).mean(dim=dims, keepdim=True)
    y = _bilinear(torch.mul, c, _RescaleAny.apply(variance + call["eps"], torch.rsqrt))
    if call["weight"] is not None:
        y = y * call["weight"]
    return y if call["bias"] is None else y + call["bias"]


class _DeltaMode(TorchFunctionMode):
    """DeepLIFT's rules beyond single-input nonlinearities, on a batch [inputs; references]:
    products of two varying tensors (squeeze-and-excitation gates, attention's products of
    matrices) split their change by the Shapley values of their factors (:func:`_bilinear`),
    quotients are products with a reciprocal, and softmax and LayerNorm are computed from
    those pieces (:func:`_softmax`, :func:`_layer_norm`), so attributions sum to
    f(x) - f(x0) through transformers too; operations without a rule are refused by name."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        varying = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
        if func is F.max_pool2d and varying:  # nn.MaxPool2d or the function, as Inception
            call = bind(*_MAX_POOL, args, kwargs)
            if not call["return_indices"]:
                names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
                return _MaxPoolDelta.apply(call["input"], tuple(call[n] for n in names))
        if (func in _WITHOUT_RULE_1 and varying) or (func in _WITHOUT_RULE_2 and len(varying) > 1):
            raise RequestError(
                f"deeplift has no rule for {func.__name__} of varying tensors in this model, so "
                "its attributions would not sum to f(x) - f(x0); use integrated_gradients or "
                "gradient_shap"
            )
        if func is F.layer_norm and varying:
            return _layer_norm(bind(*_LAYER_NORM, args, kwargs))
        if func is F.scaled_dot_product_attention and varying:  # timm's fused attention
            call = bind(*SDPA, args, kwargs)
            if not call["dropout_p"] and not kwargs.get("enable_gqa"):
                q, k = call["query"] * attention_scale(call), call["key"].transpose(-2, -1)
                scores = _bilinear(torch.matmul, q, k)
                scores = scores + attention_mask(call, scores)  # the same for every pair
                return _bilinear(torch.matmul, _softmax(scores, -1), call["value"])
        if func in _SOFTMAXES and varying:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            return _softmax(args[0], dim)
        if len(varying) == 2 and len(args) == 2 and self._paired(*args):
            a, b = args
            if func in _PRODUCTS or func in _IN_PLACE_PRODUCTS:
                out = _bilinear(torch.mul, a, b)
                return a.copy_(out) if func in _IN_PLACE_PRODUCTS else out
            if func in _MATMULS:
                return _bilinear(torch.matmul, a, b)
            if func in _QUOTIENTS:
                return _bilinear(torch.mul, a, _RescaleAny.apply(b, torch.reciprocal))
        return func(*args, **kwargs)

    @staticmethod
    def _paired(a: Tensor, b: Tensor) -> bool:
        """Both tensors hold a batch [inputs; references] (pairs along their first dimension)."""
        return a.dim() > 0 and b.dim() > 0 and a.shape[0] == b.shape[0] and a.shape[0] % 2 == 0


@contextmanager
def deeplift_context(module: nn.Module) -> Iterator[None]:
    """DeepLIFT's rules while the block runs ``module`` on a batch [inputs; references]: the
    rescale rule on every rectifier and elementwise nonlinearity, summation-to-delta through
    max pooling, the Shapley split of products (gates); other operations without a rule are
    refused by name."""

    rescale = replace_rectifiers(lambda x, upper: _Rescale.apply(x, upper), _nonlinearity)
    with rescale, _DeltaMode():
        yield


def _reference_set(value: Any, x: Tensor, what: str) -> Tensor:
    """A set of references (K, C, H, W) matching the inputs ``x``."""
    references = torch.as_tensor(value).detach().to(x)
    if references.dim() != 4 or references.shape[1:] != x.shape[1:]:
        shape = ", ".join(map(str, x.shape[1:]))
        raise RequestError(
            f"{what} needs a baseline set of shape (K, {shape}), not {tuple(references.shape)}"
        )
    if not bool(torch.isfinite(references).all()):
        raise RequestError("the baseline set contains NaN or infinite values")
    return references


def _paired(m: int) -> Callable[[list[Target], Tensor, Captured], Tensor]:
    """Scores of a pair batch [inputs; references] of ``m`` rows each: both halves on the
    inputs' targets, so that ``Predicted()`` is what each input predicts."""

    def score(resolved: list[Target], output: Tensor, captured: Captured) -> Tensor:
        return score_rows(resolved[:m] * 2, output, captured)

    return score


@register("deeplift", "relevance")
class DeepLift(Method):
    """DeepLIFT with the rescale rule (Shrikumar, Greenside & Kundaje 2017, "Learning
    Important Features Through Propagating Activation Differences", ICML).

    Attributions (x - x0) * m sum to f(x) - f(x0) ("summation-to-delta"). ``baseline``: zero,
    mean, blur, a number or a tensor. With ``shap=True``, ``baseline`` is a set of K references
    (K, C, H, W) and the attributions are averaged over them: DeepSHAP (Lundberg & Lee 2017,
    "A Unified Approach to Interpreting Model Predictions", NeurIPS, section 4.2).

    Each model call holds pairs of an input and a reference as [inputs; references]: the
    pairs are chunked by max(1, batch_size // 2), so a call holds at most
    max(batch_size, 2) images, and 2 x inputs x K images pass in all. ``Predicted()`` is
    resolved on the inputs' half. Targets on inner units (``Channel``, ``Neuron``) work: the
    attributions then sum to the unit's change.
    """

    description = "DeepLIFT rescale rule, or DeepSHAP over a baseline set (Shrikumar et al. 2017)"
    passes: ClassVar[str] = "2 forward and backward passes (input and baseline; 2 per reference)"
    reads_inside = True
    reduction = "sum"
    defaults: ClassVar[dict[str, Any]] = {"baseline": "zero", "shap": False}
    extras: ClassVar[dict[str, str]] = {
        "delta": "per input: the target's score at the input minus at the reference "
        "(averaged over the references with shap=True), to which the attribution sums",
    }

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        if not isinstance(params["shap"], bool):
            raise RequestTypeError(f"shap must be True or False, not {params['shap']!r}")
        if params["shap"] and not (
            isinstance(params["baseline"], Tensor) and params["baseline"].dim() == 4
        ):
            raise RequestError(
                "shap=True needs a reference set as baseline: a tensor (K, C, H, W), not "
                f"{params['baseline']!r}"
            )
        check_baseline(params["baseline"])

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        if self.params["shap"]:
            references = _reference_set(self.params["baseline"], x, "shap=True")
        else:
            references = make_baseline(self.params["baseline"], x)
        k = len(references) if self.params["shap"] else 1
        pairs = len(x) * k  # pair p: input p // k with reference p % k (or the input's own)
        total = torch.zeros_like(x)
        deltas = torch.zeros(len(x), dtype=torch.float64)
        targets = list(targets)
        with self.engine.task(2 * pairs):
            for start, stop in self.engine.chunks(pairs, max(1, self.engine.batch_size // 2)):
                index = torch.arange(start, stop)
                rows = index // k
                inputs = x[rows]
                reference = references[index % k] if self.params["shap"] else references[rows]
                m = stop - start

                chunk_targets = [targets[int(i)] for i in rows]
                with deeplift_context(self.model.module):
                    step = self.engine.evaluate(
                        torch.cat([inputs, reference]),
                        chunk_targets * 2,
                        grad=True,
                        score=_paired(m),
                    )
                (grad,) = torch.autograd.grad(step.scores[:m].sum(), step.inputs)
                total.index_add_(0, rows.to(x.device), (inputs - reference) * grad[:m])
                delta = (step.scores[:m] - step.scores[m:]).detach().double().cpu()
                deltas.index_add_(0, rows, delta)
                for j, i in enumerate(rows.tolist()):
                    targets[i] = step.targets[j]
        attribution, delta = total / k, deltas / k
        half = self.engine.dtype not in (torch.float32, torch.float64)
        _check_summation(attribution, delta, 0.1 if half else 0.01)
        return Result(attribution, targets, extras={"delta": delta.tolist()})


def _check_summation(attribution: Tensor, delta: Tensor, rtol: float) -> None:
    """Summation-to-delta holds wherever every operation has a rule; where it misses by more
    than ``rtol`` of f(x) - f(x0) (1%; 10% for half-precision models), an operation without one
    passed a plain gradient: refuse rather than show a wrong map."""
    sums = attribution.sum(dim=tuple(range(1, attribution.dim()))).double().cpu()
    off = (sums - delta).abs()
    bad = off > rtol * delta.abs() + 1e-6 * (1 + delta.abs().max())
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise RequestError(
            f"deeplift's attributions sum to {sums[i]:.4g}, not f(x) - f(x0) = {delta[i]:.4g} "
            f"(input {i}): the model has an operation without a DeepLIFT rule (e.g. a maximum "
            "over a tensor, amax); use integrated_gradients or gradient_shap"
        )


def shap_draws(
    generator: torch.Generator,
    rows: int,
    references: int | None,
    shape: tuple[int, ...],
    stdev: float,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """GradientSHAP's random draws for the next ``rows`` rows, drawn row by row: each row's
    reference index (when the references are a set of ``references``), its point on the path
    (uniform in [0, 1], float64) and its input noise (N(0, stdev^2), when stdev > 0), in that
    order. Row by row, the stream does not depend on how the rows are chunked."""
    index = torch.empty(rows, dtype=torch.long) if references is not None else None
    alpha = torch.empty(rows, dtype=torch.float64)
    noise = torch.empty((rows, *shape)) if stdev > 0 else None
    for r in range(rows):
        if index is not None:
            index[r] = torch.randint(0, references, (1,), generator=generator)[0]
        alpha[r] = torch.rand(1, generator=generator, dtype=torch.float64)[0]
        if noise is not None:
            noise[r] = torch.randn(shape, generator=generator)
    return index, alpha, None if noise is None else noise.mul_(stdev)


@register("gradient_shap", "relevance")
class GradientShap(Method):
    """GradientSHAP / expected gradients (Lundberg & Lee 2017; Erion et al. 2021, "Improving
    performance of deep learning models with axiomatic attribution priors and expected
    gradients", Nature Machine Intelligence).

    For each of ``n_samples`` rows per input: a reference drawn from ``baseline`` (a set
    (K, C, H, W): any 4-D tensor is taken as a set; or zero/mean/blur/a number, one reference
    per input), a point x0 + alpha (x' - x0) with alpha ~ U(0, 1) and
    x' = x plus Gaussian noise of std ``stdev``; the attribution is the mean of
    (x' - x0) * gradient at the point. Rows (input by input, n_samples each) stream through
    the engine in chunks of ``batch_size``; each chunk's draws are made with it, row by row
    (:func:`shap_draws`), so results do not depend on ``batch_size``. ``Predicted()`` is
    resolved on the clean inputs first (one more pass over those inputs).
    """

    description = "expected gradients over a baseline distribution (Lundberg & Lee 2017)"
    passes: ClassVar[str] = "1 + n_samples forward and backward passes (21)"
    reduction = "sum"
    random = True
    defaults: ClassVar[dict[str, Any]] = {"baseline": "zero", "n_samples": 20, "stdev": 0.0}

    @classmethod
    def check(cls, params: Mapping[str, Any]) -> None:
        positive_int("n_samples", params["n_samples"])
        if finite("stdev", params["stdev"]) < 0:
            raise RequestError(f"stdev must be non-negative, not {params['stdev']!r}")
        check_baseline(params["baseline"])

    def explain(self, x: Tensor, targets: list[Target]) -> Result:
        n, stdev = int(self.params["n_samples"]), float(self.params["stdev"])
        baseline = self.params["baseline"]
        shared = isinstance(baseline, Tensor) and baseline.dim() == 4
        if shared:  # a distribution of references: each row draws one
            references = _reference_set(baseline, x, "gradient_shap with a 4-D baseline")
        else:  # one reference per input
            references = make_baseline(baseline, x)
        targets = list(targets)
        unresolved = [i for i, t in enumerate(targets) if isinstance(t, Predicted)]
        generator = self.generator()
        total = torch.zeros_like(x)
        with self.engine.task(len(unresolved) + len(x) * n):
            if unresolved:
                _, resolved = self.engine.clean(x[unresolved], [targets[i] for i in unresolved])
                for i, t in zip(unresolved, resolved, strict=True):
                    targets[i] = t
            for start, stop in self.engine.chunks(len(x) * n):
                rows = torch.arange(start, stop) // n
                index, alpha, noise = shap_draws(
                    generator,
                    stop - start,
                    len(references) if shared else None,
                    tuple(x.shape[1:]),
                    stdev,
                )
                inputs = x[rows] if noise is None else x[rows] + noise.to(x)
                reference = references[index if index is not None else rows]
                a = alpha.to(x).view(-1, *([1] * (x.dim() - 1)))
                points = (reference + a * (inputs - reference)).detach()
                step = self.engine.evaluate(points, [targets[int(i)] for i in rows], grad=True)
                (grad,) = torch.autograd.grad(step.scores.sum(), step.inputs)
                total.index_add_(0, rows.to(x.device), (inputs - reference) * grad)
        return Result(total / n, targets)
