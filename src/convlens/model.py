"""``Model``: an ``nn.Module`` classifier with its preprocessing, labels and layer lookup.

Example:
    >>> model = cl.wrap(my_cnn, input_size=(224, 224), labels=["benign", "malignant"])
    >>> x = model.preprocess(cl.load_image("lesion.jpg"))     # (1, 3, 224, 224)
    >>> model.predict(x)                                       # probabilities
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlens.checks import RequestError, RequestTypeError, finite
from convlens.engine import placement, session
from convlens.images import ImageLike, to_pictures, to_rgb

__all__ = ["Model", "as_model", "check_input", "size_pair", "wrap"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_input(x: Tensor, channels: int | None = None) -> Tensor:
    """Validate a preprocessed batch: a finite floating tensor of shape (B, C, H, W)."""
    if not isinstance(x, Tensor):
        raise RequestTypeError(f"expected a tensor of shape (B, C, H, W), not {type(x).__name__}")
    if x.dim() == 3:
        raise RequestError(
            f"input has shape {tuple(x.shape)}; a batch of shape (B, C, H, W) is needed "
            "(add a batch dimension with x[None])"
        )
    if x.dim() != 4:
        raise RequestError(f"input must have shape (B, C, H, W), not {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise RequestError("input batch is empty")
    if channels is not None and x.shape[1] != channels:
        raise RequestError(f"input has {x.shape[1]} channels; the model expects {channels}")
    if not x.is_floating_point():
        raise RequestTypeError(f"input must be a floating-point tensor, not {x.dtype}")
    if not torch.isfinite(x).all():
        bad = "NaN" if torch.isnan(x).any() else "infinite values"
        raise RequestError(f"input contains {bad}")
    return x


class Model:
    """A classifier with everything needed to explain it.

    Attributes:
        module: the ``nn.Module``, in eval mode.
        labels: class names, or ``None``.
        input_size: (H, W) the module expects, or ``None`` for a bare module (no preprocessing).
        mean, std: per-channel normalisation applied by :meth:`preprocess`.
        cam_layer: name of the default layer for CAM methods.
        output: which part of the module's output holds the logits, where it returns a tuple,
            dict or other object: an index, a key or a function of the output; ``None`` takes
            the ``logits`` entry or the first tensor (see ``convlens.engine.select_output``).
    """

    def __init__(
        self,
        module: nn.Module,
        input_size: tuple[int, int] | None = (224, 224),
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        labels: Sequence[str] | None = None,
        cam_layer: str | None = None,
        crop: float = 0.875,
        name: str | None = None,
        output: Any = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise RequestTypeError(f"expected an nn.Module, not {type(module).__name__}")
        if not 0 < finite("crop", crop) <= 1:
            raise RequestError(f"crop must be in (0, 1], not {crop}")
        self.module = module  # its train flag stays the caller's: explaining runs in eval mode
        self.input_size = size_pair(input_size)
        self.mean = _per_channel("mean", mean)
        self.std = _per_channel("std", std)
        if (self.mean is None) != (self.std is None) or (
            self.mean is not None and self.std is not None and len(self.mean) != len(self.std)
        ):
            raise RequestError(
                f"mean and std need one value per channel each, not {mean!r} and {std!r}"
            )
        if self.std is not None and any(s <= 0 for s in self.std):
            raise RequestError(f"std must be positive, not {std!r}")
        if labels is not None and (
            isinstance(labels, str) or not all(isinstance(label, str) for label in labels)
        ):
            raise RequestTypeError(f"labels must be a list of class names, not {labels!r}")
        self.labels = list(labels) if labels is not None else None
        self.crop = crop
        self.name = name or type(module).__name__
        if cam_layer is not None:
            self.layer(cam_layer)  # fail early on a wrong name
        self.cam_layer = cam_layer
        self.output = output

    @property
    def channels(self) -> int:
        """Channels of the model's input: one per ``mean`` value (3 without normalisation)."""
        return len(self.mean) if self.mean is not None else 3

    def __repr__(self) -> str:
        n_labels = len(self.labels) if self.labels else None
        return f"Model({self.name}, input_size={self.input_size}, labels={n_labels})"

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x)

    @property
    def device(self) -> torch.device:
        """The device of the module's first floating parameter or buffer (the CPU without)."""
        return placement(self.module)[0]

    # -- preprocessing -------------------------------------------------------------------------
    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Images (paths, PIL images or arrays, one or a list) as a normalised (B, C, H, W) batch
        (C = 3, or 1 for a model with one ``mean`` and ``std``).

        Resizes the shorter side to ``input_size / crop``, centre-crops ``input_size`` and
        normalises with ``mean`` and ``std``.
        """
        if self.input_size is None:
            raise RequestError(
                "this model has no preprocessing (a bare nn.Module); pass a preprocessed "
                "tensor, or use cl.wrap(module, input_size=..., mean=..., std=...)"
            )
        if isinstance(images, (list, tuple)):
            if not images:
                raise RequestError("no images given")
            return torch.cat([self.preprocess(image) for image in images])
        height, width = self.input_size  # decode no larger than needed (JPEG draft, reduce)
        picture = to_rgb(images, size=(height / self.crop, width / self.crop))
        if self.channels == 1:  # a grayscale model: one channel, as its one mean and std say
            picture = picture.convert("L")
        array = np.asarray(picture, dtype=np.float32).copy()
        x = torch.from_numpy(array).view(*array.shape[:2], -1).permute(2, 0, 1)[None] / 255.0
        scale = max(height / x.shape[-2], width / x.shape[-1]) / self.crop
        size = (max(height, round(x.shape[-2] * scale)), max(width, round(x.shape[-1] * scale)))
        antialias = size[0] < x.shape[-2]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        return self.normalise(x[..., top : top + height, left : left + width]).contiguous()

    def normalise(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Pictures in [0, 1], (B, 3, H, W) or already (B, C, H, W), as the model takes them,
        without cropping (so that masks drawn on them stay aligned): scaled to ``size`` (H, W)
        when given (bilinear, antialiased when shrinking), made grey for a one-channel model
        (the ITU-R 601-2 luma of PIL's ``"L"`` mode) and normalised with ``mean`` and ``std``
        (unchanged without them)."""
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
            x = F.interpolate(
                x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink
            )
        if self.channels == 1 and x.shape[1] == 3:
            luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
            x = torch.einsum("bchw,c->bhw", x, luma)[:, None]
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def inputs(self, x: Any) -> Tensor:
        """Validated input batch on the model's device: a tensor, or images to preprocess."""
        if not isinstance(x, Tensor):
            if self.input_size is None:
                raise RequestTypeError(
                    "a bare nn.Module takes a preprocessed tensor of shape (B, C, H, W); "
                    "wrap it with cl.wrap(...) to pass images"
                )
            x = self.preprocess(x)
        # float64 or float16 tensors become float32; the engine casts to the model's own dtype
        channels = self.channels if self.mean is not None else None
        return check_input(x, channels).detach().to(device=self.device, dtype=torch.float32)

    def to_display(self, x: Tensor) -> np.ndarray:
        """The batch as RGB pictures (B, H, W, 3) uint8, undoing the normalisation."""
        return to_pictures(x, self.mean, self.std)

    # -- prediction ---------------------------------------------------------------------------
    def predict(self, x: Any, batch_size: int | None = None) -> Tensor:
        """Class probabilities (B, K) for a batch or images, through the engine (in batches,
        eval mode meanwhile; every module's train flag is restored afterwards)."""
        x = self.inputs(x)
        with session(self, x, batch_size, progress=False) as engine:
            chunks = [engine.forward(x[start:stop]) for start, stop in engine.chunks(len(x))]
        return torch.cat(chunks).softmax(dim=-1).cpu()

    def label(self, index: int) -> str:
        """The name of class ``index`` (its number when the model has no labels)."""
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return str(index)

    # -- layers ---------------------------------------------------------------------------------
    def layer(self, name: str | nn.Module) -> nn.Module:
        """The submodule called ``name`` (dotted path, as in ``named_modules()``)."""
        if isinstance(name, nn.Module):
            if not any(name is m for m in self.module.modules()):
                raise RequestError(f"module {type(name).__name__} is not part of {self.name}")
            return name
        modules = self._named_modules()
        if name not in modules:
            modules = self._named_modules(refresh=True)  # the model may have changed
        if name in modules:
            return modules[name]
        close = difflib.get_close_matches(str(name), modules, n=5, cutoff=0.5)
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)][-5:]
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise RequestError(
            f"unknown layer {name!r} in {self.name}.{hint} Candidates include the last "
            f"convolutions: {', '.join(convs) or '(none)'}; model.module.named_modules() "
            "lists all."
        )

    def layer_name(self, module: nn.Module) -> str:
        """The dotted name of a submodule (its class name if it is not part of the model)."""
        for refresh in (False, True):
            names = {id(m): n for n, m in self._named_modules(refresh).items()}
            if id(module) in names:
                return names[id(module)]
        return type(module).__name__

    def _named_modules(self, refresh: bool = False) -> dict[str, nn.Module]:
        cached = self.__dict__.get("_module_names")
        if refresh or cached is None or cached[0] is not self.module:
            modules = dict(self.module.named_modules())
            modules.pop("", None)
            cached = (self.module, modules)
            self.__dict__["_module_names"] = cached
        return cached[1]


def size_pair(value: Any) -> tuple[int, int] | None:
    """``(H, W)`` from a pair or one int (a square), checked."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise RequestTypeError(f"input_size must be an int or (height, width), not {value!r}")
    if min(pair) < 1:
        raise RequestError(f"input_size must be positive, not {value!r}")
    return pair  # type: ignore[return-value]


def _per_channel(name: str, values: Any) -> tuple[float, ...] | None:
    """Per-channel numbers (mean, std), each finite."""
    if values is None:
        return None
    if isinstance(values, (int, float)):
        values = (values,)
    numbers = tuple(finite(name, v) for v in values)
    if not numbers:
        raise RequestError(f"{name} needs one value per channel, not {values!r}")
    return numbers


def wrap(
    module: nn.Module,
    input_size: int | tuple[int, int] = (224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    labels: Sequence[str] | None = None,
    cam_layer: str | None = None,
    crop: float = 0.875,
    output: Any = None,
) -> Model:
    """Wrap any ``nn.Module`` classifier (logits out) with its preprocessing and labels.

    Example:
        >>> model = cl.wrap(resnet, labels=my_labels)
        >>> cl.explain(model, "photo.jpg", method="integrated_gradients")
    """
    return Model(
        module, input_size, mean, std, labels, cam_layer=cam_layer, crop=crop, output=output
    )


def as_model(model: Model | nn.Module) -> Model:
    """A :class:`Model` for ``model``; a bare module gets no preprocessing and no labels."""
    if isinstance(model, Model):
        return model
    if isinstance(model, nn.Module):
        bare = Model.__new__(Model)
        bare.module = model  # not put in eval mode here: explain() does that for its duration
        bare.input_size = bare.mean = bare.std = bare.labels = bare.cam_layer = None
        bare.output = None
        bare.crop, bare.name = 1.0, type(model).__name__
        return bare
    raise RequestTypeError(f"expected a convlens.Model or an nn.Module, not {type(model).__name__}")
