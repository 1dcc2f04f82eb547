"""Image input: every common mode is converted and explained; unreadable input is refused
with a one-line error naming the problem."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import convlens as cl
from convlens.images import ImageError, to_pictures, to_rgb

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)


def saved(tmp_path, image: Image.Image, name: str, **kwargs) -> str:
    path = tmp_path / name
    image.save(path, **kwargs)
    return str(path)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", "png"), ("RGBA", "png"), ("P", "png"), ("I;16", "png"), ("CMYK", "jpg"), ("LA", "png")],
)
def test_modes_are_converted_to_rgb(tmp_path, mode, suffix):
    if mode == "I;16":
        image = Image.fromarray((RNG.integers(0, 65536, (40, 60))).astype(np.uint16))
        assert image.mode.startswith("I;16")
    else:
        image = Image.fromarray(RGB).convert(mode)
    path = saved(tmp_path, image, f"image.{suffix}")
    loaded = cl.load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (60, 40)
    if mode == "I;16":  # 16-bit values are scaled, not clipped to white
        values = np.asarray(loaded)[..., 0].astype(float)
        assert 60 < values.mean() < 200 and values.std() > 30
    model = cl.wrap(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3)), (16, 16))
    model.module(torch.zeros(1, 3, 16, 16))
    e = cl.explain(model, path, "saliency")
    assert e.attribution.shape == (1, 3, 16, 16)


def test_transparent_pixels_are_composited_over_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    assert np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).min() == 255


@pytest.mark.parametrize(
    "array",
    [
        RGB,
        RGB[..., 0],
        RGB.astype(np.float32) / 255,
        RGB.astype(np.uint16) * 257,
        RGB.transpose(2, 0, 1),
    ],
)
def test_arrays_are_accepted(array):
    assert np.array_equal(np.asarray(to_rgb(array))[..., 0], RGB[..., 0])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        cl.load_image(tmp_path / "nope.jpg")


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        cl.load_image(path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ImageError, match="not an image file"):
        cl.load_image(path)


def test_nan_image_array_is_refused():
    with pytest.raises(ImageError, match="NaN"):
        to_rgb(np.full((4, 4), np.nan))


def test_sample_images_are_rgb_photos():
    photos = cl.sample_images()
    assert {"chelsea", "coffee", "rocket", "china"} <= set(photos)
    assert all(p.mode == "RGB" and min(p.size) >= 200 for p in photos.values())


def test_to_pictures_undoes_the_normalisation_or_stretches():

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    picture = torch.from_numpy(RGB).permute(2, 0, 1)[None].float() / 255
    x = (picture - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert np.array_equal(to_pictures(x, mean, std)[0], RGB)
    gray = to_pictures(torch.linspace(-3, 5, 8).view(1, 1, 2, 4))
    assert gray.shape == (1, 2, 4, 3) and gray.dtype == np.uint8
    assert gray[0, 0, 0].tolist() == [0, 0, 0] and gray[0, 1, 3].tolist() == [255, 255, 255]
