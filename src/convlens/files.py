"""Atomic file writes: a reader (a browser, another process) never sees half a file."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["save_picture", "save_torch", "write_atomic"]


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_picture(picture: Any, path: str | os.PathLike) -> Path:
    """A PIL image, atomically, in the format of ``path``'s suffix."""
    buffer = io.BytesIO()
    picture.save(
        buffer, format=(Path(path).suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG")
    )
    return write_atomic(path, buffer.getvalue())


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save``, atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_atomic(path, buffer.getvalue())
