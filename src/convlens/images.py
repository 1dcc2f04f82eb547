"""Reading images and converting them to RGB, whatever their mode, size or dtype, and model
input batches back to pictures (:func:`to_pictures`).

Grayscale, RGBA, palette, 16-bit and CMYK inputs are converted rather than refused; unreadable
input (a missing file, a truncated JPEG, a text file named ``.png``) raises a one-line error.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from convlens.checks import RequestError, RequestTypeError

__all__ = ["ImageError", "ImageLike", "load_image", "sample_images", "to_pictures", "to_rgb"]

ImageLike = str | os.PathLike | Image.Image | np.ndarray


class ImageError(ValueError):
    """An input that cannot be read as an image."""


def load_image(path: str | os.PathLike, size: tuple[float, float] | None = None) -> Image.Image:
    """Read an image file as an RGB :class:`PIL.Image.Image`.

    ``size``, (height, width), says the picture will only be scaled down to cover that size
    (a model's input before its crop): the file may then be decoded at a lower resolution that
    still covers it, by a power of two (JPEG: at decoding, with ``draft``) or an integer factor
    (other formats: ``reduce`` right after decoding), so that a huge photo does not cost
    gigabytes for a small input. A picture larger than ``PIL.Image.MAX_IMAGE_PIXELS`` (a
    possible decompression bomb) is an :class:`ImageError`.

    Example:
        >>> img = cl.load_image("photo.jpg")
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image file")
    cover = _cover(size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if cover is not None:
                    img.draft(None, (cover[1], cover[0]))  # JPEG: decode at 1/2, 1/4 or 1/8
                img.load()  # decode now, so a truncated file fails here and not later
                return to_rgb(img, size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(
            f"cannot read {path}: a possible decompression bomb, more pixels than "
            f"PIL.Image.MAX_IMAGE_PIXELS allows ({str(error).split(',')[0]})"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read {path}: not an image file PIL recognises") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(
            f"cannot read {path}: the file is corrupt or truncated ({error})"
        ) from None


def _cover(size: tuple[float, float] | None) -> tuple[int, int] | None:
    """``size`` as whole pixels (height, width), or ``None``."""
    if size is None:
        return None
    height, width = (math.ceil(float(s)) for s in size)
    if height < 1 or width < 1:
        raise RequestError(f"size must be positive (height, width), not {tuple(size)}")
    return height, width


# modes whose pixels ``Image.reduce`` may average (a palette's indices may not be averaged)
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F"})


def _shrink(image: Image.Image, cover: tuple[int, int] | None) -> Image.Image:
    """``image`` reduced by the largest integer factor (2 or more) that still covers
    ``cover`` (height, width); unchanged otherwise."""
    if cover is None:
        return image
    factor = min(image.height // cover[0], image.width // cover[1])
    if factor < 2:
        return image
    return image.reduce(factor)


def _rgb_from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW given: make it HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(
            f"an image array must be HxW, HxWx3 or HxWx4, not shape {tuple(array.shape)}"
        )
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("the image array contains NaN or infinite values")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        array = np.clip(array.astype(np.int64) * (255 if array.dtype == bool else 1), 0, 255)
        array = array.astype(np.uint8)
    else:
        raise ImageError(f"unsupported image array dtype {array.dtype}")
    return to_rgb(Image.fromarray(array))


def to_rgb(image: ImageLike, size: tuple[float, float] | None = None) -> Image.Image:
    """Any image-like input as an 8-bit RGB PIL image.

    Accepts a path, a PIL image of any mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) or an array
    (HxW, HxWxC, or CxHxW; uint8, uint16, bool, or floats in [0, 1] or [0, 255]).
    Transparent pixels are composited over white. ``size`` (height, width): the picture will
    only be scaled down to cover it, so a much larger one may come back reduced by an integer
    factor that still covers it (see :func:`load_image`).
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, size)
    cover = _cover(size)
    if isinstance(image, np.ndarray):
        return _shrink(_rgb_from_array(image), cover)
    if not isinstance(image, Image.Image):
        raise RequestTypeError(
            f"expected an image path, PIL image or numpy array, not {type(image).__name__}"
        )
    if cover is not None and image.mode in _REDUCIBLE:
        image = _shrink(image, cover)  # before the conversion, which copies the picture
    rgb = _convert(image)
    return _shrink(rgb, cover) if cover is not None else rgb


def _convert(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # 16-bit grayscale PNG
        return _rgb_from_array(np.asarray(image, dtype=np.float64) / 65535.0)
    if image.mode == "I":  # 32-bit integer: 16-bit data when it exceeds 255
        array = np.asarray(image, dtype=np.float64)
        return _rgb_from_array(array / (65535.0 if array.max(initial=0) > 255 else 255.0))
    if image.mode == "F":
        return _rgb_from_array(np.asarray(image, dtype=np.float64))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def sample_images() -> dict[str, Image.Image]:
    """Photos bundled with scikit-image and scikit-learn (offline), by name.

    Example:
        >>> imgs = cl.sample_images(); imgs["chelsea"].size
        (451, 300)
    """
    import skimage.data
    from sklearn.datasets import load_sample_image

    photos = {name: getattr(skimage.data, name)() for name in ("chelsea", "coffee", "rocket")}
    photos["china"] = load_sample_image("china.jpg")
    return {name: to_rgb(array) for name, array in photos.items()}


def to_pictures(
    x: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """A (B, C, H, W) model-input batch as RGB pictures (B, H, W, 3) uint8.

    Undoes the normalisation when ``mean`` and ``std`` are known; otherwise each image is
    stretched to [0, 1]. One channel is shown as gray.
    """
    x = x.detach().float().cpu()
    if mean is not None and std is not None and x.shape[1] == len(mean):
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    else:
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        high = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - low) / (high - low).clamp(min=1e-12)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x[:, :3]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
