"""``explain``: the one entry point that runs any registered method on any classifier."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from convlens.checks import RequestTypeError
from convlens.engine import Engine, default_batch_size, freed_memory_kept
from convlens.explanation import Explanation
from convlens.hooks import frozen
from convlens.model import Model, as_model
from convlens.registry import get_method
from convlens.targets import Class, Contrast, TargetSpec, check_target_spec

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
    inputs = wrapped.inputs(x).clone()
    targets = check_target_spec(target, len(inputs), wrapped.labels)
    start = time.perf_counter()
    with freed_memory_kept():
        if batch_size is None:
            batch_size = default_batch_size(method_cls.batch_size)
        engine = Engine(batch_size, progress, method)
        instance = method_cls(wrapped, engine, params, seed)
        # methods take gradients: a caller's torch.no_grad() block must not break them
        with frozen(wrapped.module), torch.enable_grad():
            attribution, resolved = instance.explain(inputs, targets)
    seconds = time.perf_counter() - start

    attribution = attribution.detach().to(device="cpu", dtype=torch.float32).contiguous()
    _check_attribution(attribution, inputs, method)
    record = {**instance.params, "batch_size": engine.batch_size}
    if method_cls.random:
        record["seed"] = seed
    layer_used = instance.params.get("layer")
    if isinstance(layer_used, (list, tuple)):
        layer_used = ", ".join(
            item if isinstance(item, str) else wrapped.layer_name(item) for item in layer_used
        )
    return Explanation(
        attribution=attribution,
        method=method,
        targets=[t.describe() for t in resolved],
        layer=layer_used
        if layer_used is None or isinstance(layer_used, str)
        else wrapped.layer_name(layer_used),
        params=record,
        seconds=seconds,
        forwards=engine.forwards,
        inputs=inputs.detach().to(device="cpu", dtype=torch.float32),
        reduction=instance.reduction,
        extras=instance.extras,
        labels=[_label(wrapped, t) for t in resolved],
        display=wrapped.to_display(inputs),
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
