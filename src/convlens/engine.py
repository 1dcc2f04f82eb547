"""The one door to the model: every model call of every method, metric and feature function.

:class:`Engine` owns, in one place, what must be the same everywhere:

* chunking by ``batch_size`` (the only knob) and the progress bar, which counts images;
* the count of images passed through the model (a gradient counts as one forward);
* device and dtype: inputs go to the model's device and floating dtype, outputs come back as
  float32 (on the model's device; explanations then move to the CPU);
* memory layout: channels-last where the model gives the same output on it (about 1.5x faster
  on CPUs), contiguous where its ``forward`` fails or differs (a ``.view`` flatten), decided
  once per model and input geometry by a probe of one image (:meth:`Engine.prepare`);
* model outputs: a tuple, list, namedtuple or dict output gives its logits (the ``logits``
  entry, else the first tensor), or what ``Model.output`` selects.

On top of the single call (:meth:`Engine.forward`) sit the two loops every method is built of:
:meth:`Engine.evaluate`, one pass that captures the layers a method needs, resolves
``Predicted()`` and scores the targets; and :meth:`Engine.stream`, the perturbation template
(for one input, stream perturbed batches made by a :class:`Sampler` and fold their scores), so
masks or noisy copies never all sit in memory at once.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from convlens.allocator import (  # noqa: F401 (re-exported: convlens.engine.*)
    _KEPT,
    _set_thresholds,
    default_batch_size,
    freed_memory_kept,
    keep_freed_memory,
    keeping_freed_memory,
)
from convlens.checks import RequestError, RequestTypeError, positive_int
from convlens.hooks import Captured, capture, frozen, scripted
from convlens.targets import (
    Target,
    channels_last_grid,
    layer_key,
    resolve_targets,
    score_rows,
    target_layers,
)

if TYPE_CHECKING:
    from convlens.model import Model

__all__ = [
    "Engine",
    "Pass",
    "Sampler",
    "Scored",
    "channels_last_grid",
    "default_batch_size",
    "freed_memory_kept",
    "keep_freed_memory",
    "keeping_freed_memory",
    "model_layout",
    "placement",
    "probe_images",
    "select_output",
    "session",
    "split",
]

log = logging.getLogger(__name__)


def model_layout(x: Tensor) -> Tensor:
    """A batch of images in the channels-last memory format, the layout models run on when they
    allow it. Values are unchanged; CPU convolutions run about 1.5 times faster on it, forward
    and backward (EfficientNet-Lite0 at batch 8: 39 vs 29 images/s forward+backward)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def split(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """``n`` items in balanced chunks of at most ``batch_size``, made one at a time:
    50 by 8 is 7 chunks of 7 or 8."""
    if n <= 0:
        return
    n_chunks = math.ceil(n / batch_size)
    previous = 0
    for i in range(1, n_chunks + 1):
        bound = (i * n + n_chunks // 2) // n_chunks  # round(i * n / n_chunks), exact for any n
        yield previous, bound
        previous = bound


# What a method scores: (targets, logits, captured layers) -> one number per row.
Score = Callable[[Any, Tensor, Mapping[Any, Tensor]], Tensor]


def select_output(output: Any, choice: Any = None) -> tuple[Tensor, str]:
    """The logits in a model's output, and where they were found.

    ``choice`` (``Model.output``) is a callable, an index or a key; without it a tensor is the
    logits, a mapping gives its ``"logits"`` entry (else its first tensor), an object with a
    ``logits`` attribute (Hugging Face outputs, namedtuples) that attribute, and a tuple or list
    its first tensor.
    """
    if choice is not None:
        if callable(choice):
            picked = choice(output)
        else:
            try:
                picked = output[choice]
            except (KeyError, IndexError, TypeError):
                keys = list(output) if isinstance(output, Mapping) else None
                have = f"keys {keys}" if keys is not None else f"a {type(output).__name__}"
                if keys is None and isinstance(output, (tuple, list)):
                    have = f"{len(output)} items"
                raise RequestError(
                    f"output={choice!r} does not select the logits: the model returns {have}"
                ) from None
        where = getattr(choice, "__name__", "output") if callable(choice) else f"[{choice!r}]"
        if not isinstance(picked, Tensor):
            raise RequestTypeError(
                f"the output selected by {where} is a {type(picked).__name__}, not a tensor"
            )
        return picked, where
    if isinstance(output, Tensor):
        return output, ""
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"], "['logits']"
        for key, value in output.items():
            if isinstance(value, Tensor):
                return value, f"[{key!r}]"
    elif isinstance(getattr(output, "logits", None), Tensor):
        return output.logits, ".logits"
    elif isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            if isinstance(value, Tensor):
                return value, f"[{i}]"
    raise RequestTypeError(
        f"the model returned a {type(output).__name__} with no tensor of logits; choose one "
        "with cl.wrap(module, ..., output=KEY or INDEX or FUNCTION)"
    )


@dataclass
class Pass:
    """One forward pass over a chunk, with what methods read from it.

    Attributes:
        inputs: the batch as given (a leaf that requires grad when the pass records a graph).
        output: the logits, float32 (float64 for a float64 model).
        targets: one target per row, ``Predicted()`` resolved on ``output``.
        scores: (N,) the targets' scores (in the graph when the pass records one).
        captured: the outputs of the layers asked for and of those the targets read.
    """

    inputs: Tensor
    output: Tensor
    targets: list[Target]
    scores: Tensor
    captured: Captured


class Sampler(ABC):
    """One input's perturbations for :meth:`Engine.stream`: ``n`` perturbed inputs made chunk
    by chunk (:meth:`batch`) and their scores folded chunk by chunk (:meth:`fold`), so they never
    all sit in memory. A mask-based method is its sampler and what it makes of the fold."""

    n: int

    @abstractmethod
    def batch(self, start: int, stop: int) -> tuple[Tensor, Any]:
        """Perturbed inputs ``start:stop``, and what :meth:`fold` needs to know of them."""

    @abstractmethod
    def fold(self, start: int, stop: int, scores: Tensor, made: Any) -> None:
        """Take the scores (stop - start,) of the inputs :meth:`batch` made (``made``)."""

    def around(self, made: Any) -> AbstractContextManager[Any]:
        """A context the chunk's forward runs in (Ablation-CAM edits a layer there)."""
        return nullcontext()


class Scored(Sampler):
    """A sampler whose fold keeps every perturbed input's score, in :attr:`scores` (n,), for
    the method to aggregate once the input's passes are done."""

    scores: Tensor

    def fold(self, start: int, stop: int, scores: Tensor, made: Any) -> None:
        if start == 0:
            self.scores = scores.new_empty(self.n)
        self.scores[start:stop] = scores


class _Made(Scored):
    """Inputs made by a function."""

    def __init__(self, n: int, make: Callable[[int, int], Tensor]) -> None:
        self.n, self.make = n, make

    def batch(self, start: int, stop: int) -> tuple[Tensor, Any]:
        return self.make(start, stop), None


S = TypeVar("S", bound=Sampler)


class Call(NamedTuple):
    """One module call the probe saw: the module, its output's shape and data pointer."""

    module: nn.Module
    shape: torch.Size | None
    pointer: int


# layers whose output is not a feature map of their own (what a classifier pools or drops)
_NOT_FEATURES = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Flatten,
)

# Per model: what the probe found for an input geometry (the layout and the layers called), and
# whether the model's output was announced.
_PROBES: weakref.WeakKeyDictionary[nn.Module, dict[Any, Any]] = weakref.WeakKeyDictionary()
_ANNOUNCED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class Engine:
    """Every model call of one explanation (or metric, or feature function) goes through here.

    Args:
        model: the :class:`convlens.Model` (a bare module wrapped by ``model.as_model``).
        batch_size: most images per model call.
        progress: ``True`` always shows a bar, ``False`` never, ``None`` shows one only for
            work that lasts longer than a second.
        description: the bar's label (the method's name).

    :meth:`prepare` decides the layout before the first call (:func:`session` does it).
    """

    def __init__(
        self, model: Model, batch_size: int, progress: bool | None = None, description: str = ""
    ) -> None:
        self.model = model
        self.batch_size = positive_int("batch_size", batch_size)
        self.progress = progress
        self.description = description
        self.forwards = 0
        self.layout = "contiguous"
        # the modules one forward pass calls, in the order they return (the probe's)
        self.calls: list[Call] = []
        self.output = ""  # where the logits were found in the output ("" for a tensor)
        self.device, self.dtype = placement(model.module)
        self._bar: tqdm | None = None
        self._total = 0

    # -- progress and counting ---------------------------------------------------------------------
    def count(self, images: int) -> None:
        """Record ``images`` images passed through the model (the bar advances by them)."""
        self.forwards += images
        if self._bar is not None:
            self._bar.update(images)

    @contextmanager
    def task(self, total: int) -> Iterator[None]:
        """One progress bar over ``total`` images through the model; nested tasks share the
        outer bar. Work that ends early (an adaptive search) completes the bar on exit."""
        if self._bar is not None or self.progress is False:
            yield
            return
        self._total = total
        self._bar = tqdm(
            total=total,
            desc=self.description,
            unit="img",
            delay=0 if self.progress else 1.0,
            leave=False,
            dynamic_ncols=True,
        )
        try:
            yield
        finally:
            self._bar.update(max(0, self._total - self._bar.n))
            self._bar.close()
            self._bar = None

    def expect(self, images: int) -> None:
        """Add ``images`` to the open bar's total (work whose size the first pass reveals)."""
        self._total += images
        if self._bar is not None:
            self._bar.total = self._total
            self._bar.refresh()

    def chunks(self, n: int, batch_size: int | None = None) -> Iterator[tuple[int, int]]:
        """Balanced ``(start, stop)`` chunks of ``n`` items, at most ``batch_size`` each."""
        return split(n, batch_size or self.batch_size)

    # -- the model call ----------------------------------------------------------------------------
    def prepare(self, x: Tensor) -> None:
        """Probe the model on one image shaped like ``x`` (before any hook is set): the layers
        it calls, in order, with their output shapes (:attr:`calls`), and the memory layout.

        Channels-last is kept where the image gives the same logits in both layouts; a model
        whose forward raises on it, or answers differently, runs contiguous. What the probe
        finds is remembered per model, its modules and the input's shape, dtype and device;
        a probe costs one forward of one image, two where the layout matters, counted.
        """
        module = self.model.module
        key = _layout_key(module, x)
        known = _PROBES.setdefault(module, {})
        if key not in known:
            known[key] = self._probe(x[:1].detach().to(device=self.device, dtype=self.dtype))
        self.layout, self.calls = known[key]

    def _probe(self, image: Tensor) -> tuple[str, list[Call]]:
        module = self.model.module
        calls: list[Call] = []
        held: list[Tensor] = []  # outputs stay alive during the probe: no pointer is reused

        def record(layer: nn.Module, _args: Any, out: Any) -> None:
            tensor = isinstance(out, Tensor)
            calls.append(
                Call(layer, out.shape if tensor else None, out.data_ptr() if tensor else 0)
            )
            if tensor:
                held.append(out)

        # TorchScript code hides its calls (and refuses hooks): no layers are known there. The
        # root is left out: what is remembered of a model must not hold the model itself (it
        # is the key of a weak dictionary)
        inner = [m for m in module.modules() if m is not module]
        handles = [] if scripted(module) else [m.register_forward_hook(record) for m in inner]
        try:
            with torch.no_grad():
                plain = self._logits(module(image.contiguous()))
        finally:
            for handle in handles:
                handle.remove()
        self.count(1)
        if image.dim() != 4 or image.shape[1] == 1:
            return "contiguous", calls
        with torch.no_grad():
            try:
                fast: Tensor | None = self._logits(module(model_layout(image)))
            except Exception:  # the model's forward cannot take channels-last tensors
                fast = None
        self.count(1)
        tolerance = 1e-3 if self.dtype in (torch.float32, torch.float64) else 3e-2
        same = (
            fast is not None
            and fast.shape == plain.shape
            and bool(((fast - plain).abs() <= tolerance * plain.abs().amax().clamp(min=1e-3)).all())
        )
        if not same:
            log.info("%s runs contiguous: channels-last raised or differed", type(module).__name__)
        return ("channels_last" if same else "contiguous"), calls

    def feature_map(self) -> nn.Module | None:
        """The last spatial feature map the classifier reads, at the outermost module that
        returns it (ResNet ``layer4``, VGG ``features``, Inception ``Mixed_7c``, Xception's final
        activation), from the probe: the last module whose output is (B, C, h, w) with
        h·w > 1, leaving out pooling and dropout layers; of the modules returning that very
        tensor, the one nearest the root. None where the probe saw no such map."""
        names = {id(m): name for name, m in self.model.module.named_modules() if name}
        maps = [
            call
            for call in self.calls
            if id(call.module) in names
            and not isinstance(call.module, _NOT_FEATURES)
            and call.shape is not None
            and len(call.shape) == 4
            and _area(call.shape) > 1
        ]
        after = self.calls[self.calls.index(maps[-1]) + 1 :] if maps else self.calls
        tokens = [
            names[id(c.module)]
            for c in after
            if id(c.module) in names and c.shape is not None and len(c.shape) == 3
            and c.shape[1] > 1
        ]  # fmt: skip
        if tokens:  # a transformer: its last feature maps are tokens (B, N, C)
            # the last block's first norm, as pytorch-grad-cam's documentation advises for
            # ViTs: the tokens the last attention mixes into the class token (later ones no
            # longer reach it)
            firsts = [name for name in tokens if name.endswith("norm1")]
            if firsts:
                return self.model.layer(firsts[-1])
            raise RequestError(
                "the model's last feature maps are tokens (B, N, C), not (B, C, h, w): pass "
                "layer=NAME (tokens on a square grid are reshaped; reshape= otherwise)"
            )
        if not maps:
            return None
        last = maps[-1]
        same = [c.module for c in maps if (c.shape, c.pointer) == (last.shape, last.pointer)]
        # nearest the root; among equals the last (an in-place activation after a norm)
        return min(reversed(same), key=lambda m: names[id(m)].count("."))

    def forward(self, x: Tensor, grad: bool = False) -> Tensor:
        """The logits for one batch (float32, or float64 for a float64 model), counted; with
        ``grad`` the call is recorded so that gradients reach ``x`` (or captured layers)."""
        with torch.set_grad_enabled(grad):
            output = self.model.module(self.place(x))
            logits = self._logits(output)
        self.count(len(x))
        return logits

    def place(self, x: Tensor) -> Tensor:
        """``x`` on the model's device and floating dtype, in its memory layout."""
        x = x.to(device=self.device, dtype=self.dtype)
        return model_layout(x) if self.layout == "channels_last" else x

    def piecewise(self, run: Callable[[], Any], images: int) -> Tensor:
        """Logits of ``run()``, a forward run piecewise (``convlens.incremental``), counted."""
        with torch.no_grad():
            logits = self._logits(run())
        self.count(images)
        return logits

    def _logits(self, output: Any) -> Tensor:
        logits, where = select_output(output, getattr(self.model, "output", None))
        if where and not self.output:
            self.output = where
            module = self.model.module
            if getattr(self.model, "output", None) is None and module not in _ANNOUNCED:
                _ANNOUNCED.add(module)
                warnings.warn(
                    f"{type(module).__name__} returns a {type(output).__name__}; convlens "
                    f"explains output{where} (shape {tuple(logits.shape)}). Choose another with "
                    "cl.wrap(module, ..., output=...)",
                    UserWarning,
                    stacklevel=4,
                )
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()

    # -- passes ------------------------------------------------------------------------------------
    def evaluate(
        self,
        x: Tensor,
        targets: Sequence[Target],
        layers: Mapping[Any, nn.Module] | None = None,
        grad: bool = False,
        score: Score = score_rows,
    ) -> Pass:
        """One pass over one chunk (at most ``batch_size`` rows): the outputs of ``layers`` and
        of the layers the targets read are captured, ``Predicted()`` is resolved and the
        targets are scored with ``score``. With ``grad`` the pass is recorded (``x`` becomes a
        leaf that requires grad if it is not one), so gradients reach inputs and layers."""
        units = self._units(targets)
        if grad and not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with capture({**(layers or {}), **units}) as captured:
            output = self.forward(x, grad=grad)
        resolved = resolve_targets(targets, output)
        with torch.set_grad_enabled(grad):
            scores = score(resolved, output, captured).to(output.dtype)
        return Pass(x, output, resolved, scores, captured)

    def _units(self, targets: Sequence[Target]) -> dict[Any, nn.Module]:
        """The inner layers the targets read (Channel, Neuron), by key."""
        return {layer_key(layer): self.model.layer(layer) for layer in target_layers(targets)}

    def clean(
        self, x: Tensor, targets: Sequence[Target], score: Score = score_rows
    ) -> tuple[Tensor, list[Target]]:
        """Scores of the unperturbed inputs (no gradients), in chunks, and the targets resolved
        on them."""
        scores, resolved = [], []
        for start, stop in self.chunks(len(x)):
            step = self.evaluate(x[start:stop], targets[start:stop], score=score)
            scores.append(step.scores)
            resolved += step.targets
        return torch.cat(scores), resolved

    def stream(
        self, sampler: Sampler, target: Target, score: Score = score_rows, rows: int | None = None
    ) -> Sampler:
        """The perturbation template for one input: ``sampler.n`` perturbed inputs, made and
        scored chunk by chunk without gradients, each chunk's scores folded into the sampler.
        ``rows`` (default the engine's batch size) bounds the samples per chunk: a sampler
        whose rows are made inside the model (Ablation-CAM from the layer on) takes more."""
        with capture(self._units([target])) as captured, torch.no_grad():
            for start, stop in self.chunks(sampler.n, rows):
                inputs, made = sampler.batch(start, stop)
                with sampler.around(made):
                    output = self.forward(inputs)
                scores = score(target, output, captured).to(output.dtype)
                sampler.fold(start, stop, scores, made)
        return sampler

    def perturb(
        self,
        targets: Sequence[Target],
        sampler: Callable[[int, Target], S],
        score: Score = score_rows,
    ) -> list[S]:
        """:meth:`stream` for each input ``i`` with the sampler ``sampler(i, targets[i])``; the
        samplers, folded, in input order."""
        samplers = []
        for i, target in enumerate(targets):  # made one at a time: each may hold masks
            samplers.append(sampler(i, target))
            self.stream(samplers[-1], target, score)
        return samplers

    def scores(
        self,
        n: int,
        make_inputs: Callable[[int, int], Tensor],
        target: Target,
        score: Score = score_rows,
    ) -> Tensor:
        """Scores (n,) of ``n`` inputs that ``make_inputs(start, stop)`` makes chunk by chunk."""
        collected = _Made(positive_int("n", n), make_inputs)
        self.stream(collected, target, score)
        return collected.scores


def _area(shape: Sequence[int]) -> int:
    """h * w of a 4-D feature map in either layout."""
    return shape[1] * shape[2] if channels_last_grid(shape) else shape[2] * shape[3]


def _layout_key(module: nn.Module, x: Tensor) -> tuple[Any, ...]:
    device, dtype = placement(module)
    return (tuple(map(id, module.modules())), tuple(x.shape[1:]), dtype, device)


def probe_images(module: nn.Module, x: Tensor) -> int:
    """Images the next call on ``module`` with inputs like ``x`` spends probing the model
    (:meth:`Engine.prepare`): 0 where it was probed before, else 2 (1 where the memory layout
    does not matter: inputs that are not 4-D, or have one channel)."""
    if _layout_key(module, x) in _PROBES.get(module, {}):
        return 0
    return 1 if x.dim() != 4 or x.shape[1] == 1 else 2


def placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of a module's first floating parameter or buffer (found
    without listing them all: this runs on every call)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock(module: nn.Module) -> threading.RLock:
    """The lock that serialises the sessions on one model: every session freezes the model and
    hooks its layers, so two at once on one model would see each other's state."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


@contextmanager
def session(
    model: Model,
    x: Tensor,
    batch_size: int | None = None,
    preferred: int = 8,
    progress: bool | None = None,
    description: str = "",
) -> Iterator[Engine]:
    """An engine for work on ``x`` with ``model``: freed memory kept for reuse, the model frozen
    (eval mode, parameters without gradients, all restored on exit) and gradients enabled
    (methods take them, also inside a caller's ``torch.no_grad()``); the model is probed.
    ``batch_size`` defaults to ``preferred`` (:func:`default_batch_size`).

    Sessions on one model are serialised (a per-model lock; the same thread may nest them):
    threads that explain one model at once get exactly the results of calls one after the
    other, and the model is left as it was. Sessions on different models run in parallel.
    """
    with _lock(model.module), freed_memory_kept(), frozen(model.module), torch.enable_grad():
        size = default_batch_size(preferred) if batch_size is None else batch_size
        engine = Engine(model, size, progress, description)
        engine.prepare(x)
        yield engine
