"""Atomic file writes: a reader (a browser, another process) never sees half a file, and a
folder written as one unit (a report) replaces the previous one in one step
(:func:`replace_folder`). Also the checks of an output path made before any work
(:func:`check_output`), and :func:`printable` for showing user-supplied names on a terminal.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

from convlens.checks import RequestError

__all__ = [
    "check_output",
    "make_staging_folder",
    "printable",
    "replace_folder",
    "save_picture",
    "save_torch",
    "write_atomic",
]


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


# -- output paths, checked before any work ---------------------------------------------------------


def printable(text: Any) -> str:
    """``text`` with control characters (terminal escape sequences, newlines), bidirectional
    overrides and undecodable bytes shown as ``\\x1b``-style escapes: safe to print to a
    terminal as one line. Other text, backslashes included, is unchanged."""
    text = str(text)
    out = []
    for char in text:
        code = ord(char)
        category = unicodedata.category(char)
        if category in ("Cc", "Cs") or 0x202A <= code <= 0x202E or 0x2066 <= code <= 0x2069:
            if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode)
                out.append(f"\\x{code - 0xDC00:02x}")
            elif code <= 0xFF:
                out.append(f"\\x{code:02x}")
            else:
                out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(path.anchor or ".")


def check_output(path: str | os.PathLike, kind: str = "file", what: str = "--out") -> Path:
    """Refuse, before any work, an output path that cannot be written: a file where a folder
    is needed (``kind="folder"``) or a folder where a file is needed (``kind="file"``), a path
    under a file, or one whose nearest existing folder is not writable. Returns the path."""
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', not {kind!r}")
    path = Path(path)
    shown = printable(path)
    if str(path) == "":
        raise RequestError(f"{what} is empty")
    if path.exists():
        if kind == "folder" and not path.is_dir():
            raise RequestError(f"{what} {shown} exists and is not a folder")
        if kind == "file" and path.is_dir():
            raise RequestError(f"{what} {shown} is a folder; give a file name")
    ancestor = _existing_ancestor(path.parent if kind == "file" else path)
    if not ancestor.is_dir():
        raise RequestError(f"{what} {shown} is not usable: {printable(ancestor)} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RequestError(f"{what} {shown} is not writable: no permission to write in "
                           f"{printable(ancestor)}")  # fmt: skip
    return path


def make_staging_folder(target: str | os.PathLike) -> Path:
    """A fresh, empty folder beside ``target`` (created with the usual permissions), where a
    unit of files is written before :func:`replace_folder` moves it to ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.convlens-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # as mkdir() would create it, not mkdtemp's 0700
    return staging


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange):
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise OSError(code, os.strerror(code), str(second))
    return True


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the folder ``new`` to ``target``, replacing a previous ``target`` folder as a whole
    in one step where the system allows (an empty or absent target: ``rename``; a full one:
    an atomic exchange on Linux, else two renames, the previous folder put back if the second
    fails or is interrupted). The previous folder is deleted afterwards."""
    new, target = Path(new), Path(target)
    try:
        os.rename(new, target)  # target absent, or an empty folder
        return target
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now the previous folder
        return target
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.previous-"))
    os.rmdir(old)  # a free name beside target
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target
