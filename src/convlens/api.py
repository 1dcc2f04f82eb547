"""``explain``: the one entry point that runs any registered method on any classifier."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from convlens.checks import RequestError, RequestTypeError, positive_int
from convlens.engine import session
from convlens.explanation import Explanation
from convlens.hooks import scripted
from convlens.model import Model, as_model
from convlens.registry import get_method, list_methods
from convlens.targets import Class, Contrast, TargetSpec, check_target_spec, target_layers

__all__ = ["explain"]


def explain(
    model: Model | nn.Module,
    x: Any,
    method: str = "gradcam",
    target: TargetSpec = None,
    layer: Any = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    **method_params: Any,
) -> Explanation:
    """Explain the model's output for ``x`` with one method.

    Args:
        model: a :class:`convlens.Model`, or a bare ``nn.Module`` (then ``x`` must be a
            preprocessed tensor).
        x: a (B, C, H, W) tensor, or (for a ``Model``) an image path, PIL image, array or list.
        method: a registered name (``convlens.list_methods()``).
        target: ``None`` (each input's predicted class), an int, a list of ints (one per
            input), a label name, or a ``convlens.targets`` object (``Contrast(p, q)``, ...).
        layer: the layer for methods that take one (name or module).
        batch_size: most images per model call. The default is the method's own (16 for
            perturbation methods, Score-CAM and Ablation-CAM; 8 for gradient methods). During the
            call glibc keeps freed memory for reuse (``convlens.engine.freed_memory_kept``),
            which makes batched model calls 2-3x faster on Linux; elsewhere at most 8.
        seed: seed of random methods; the same seed gives the same result bit for bit.
        progress: ``True``/``False`` to force the progress bar on or off; ``None`` shows it for
            work longer than a second.
        **method_params: the method's own parameters (``steps``, ``n_samples``, ...).

    The model is left as it was found: parameters, ``requires_grad``, ``.grad``, training
    flags and hooks, also when an exception interrupts the method.

    Example:
        >>> model = cl.load_model()
        >>> e = cl.explain(model, cl.sample_images()["chelsea"], method="saliency")
        >>> e.overlay().save("saliency.png")
    """
    wrapped = as_model(model)
    method_cls = get_method(method)
    given = dict(method_params)
    if layer is not None:
        if not method_cls.uses_layer:
            raise RequestTypeError(f"method {method!r} does not take a layer")
        given["layer"] = layer
    params = method_cls.resolve_params(given)
    method_cls.check(params)
    if method_cls.needs_python(params) and scripted(wrapped.module):
        usable = [name for name in list_methods() if not get_method(name).reads_inside]
        raise RequestError(
            f"{method} changes backward rules or reads inner layers, which TorchScript code "
            "hides from Python (it would silently give a wrong map); on a scripted model use "
            f"{', '.join(usable)}, or explain the Python model"
        )
    seed = positive_int("seed", seed, minimum=0)
    inputs = wrapped.inputs(x).clone()
    targets = check_target_spec(target, len(inputs), wrapped.labels)
    method_cls.check_targets(targets)
    layers = params.get("layer")
    for spec in layers if isinstance(layers, (list, tuple)) else [layers]:
        if spec is not None:
            wrapped.layer(spec)  # a wrong name is refused before any work
    for unit in target_layers(targets):
        wrapped.layer(unit)
    start = time.perf_counter()
    with session(wrapped, inputs, batch_size, method_cls.batch_size, progress, method) as engine:
        instance = method_cls(engine, params, seed)
        result = instance.explain(inputs, targets)
    seconds = time.perf_counter() - start

    attribution = result.attribution.detach().to(device="cpu", dtype=torch.float32).contiguous()
    _check_attribution(attribution, inputs, method)
    record = {**params, "batch_size": engine.batch_size}
    if method_cls.random:
        record["seed"] = seed
    resolved = {"layout": engine.layout, **result.resolved}
    if engine.output:
        resolved["output"] = engine.output
    layer_used = resolved.get("layer")
    return Explanation(
        attribution=attribution,
        method=method,
        targets=[t.describe() for t in result.targets],
        layer=", ".join(layer_used) if isinstance(layer_used, list) else layer_used,
        params=record,
        seconds=seconds,
        forwards=engine.forwards,
        inputs=inputs.detach().to(device="cpu", dtype=torch.float32),
        reduction=result.reduction or method_cls.reduction,
        extras=result.extras,
        labels=[_label(wrapped, t) for t in result.targets],
        display=wrapped.to_display(inputs),
        resolved=resolved,
    )


def _label(model: Model, target: Any) -> str | None:
    if isinstance(target, Class) and isinstance(target.index, int):
        return model.label(target.index)
    if isinstance(target, Contrast):
        return f"{model.label(int(target.p))} rather than {model.label(int(target.q))}"
    return None


def _check_attribution(attribution: Tensor, inputs: Tensor, method: str) -> None:
    if (
        attribution.dim() != 4
        or attribution.shape[0] != inputs.shape[0]
        or (attribution.shape[-2:] != inputs.shape[-2:])
    ):
        raise RuntimeError(
            f"method {method!r} returned an attribution of shape {tuple(attribution.shape)} "
            f"for inputs of shape {tuple(inputs.shape)}"
        )
